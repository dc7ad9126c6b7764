package worker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// markDeadOwners marks lost the VMs of every other worker whose last
// heartbeat is older than Config.DeadAfter, and fails the open tasks of
// each VM it moved with the reason (removing them from their queues and
// waking their waiters), so that nobody waits on a worker that is gone.
// The caller holds the sweeper lock (one worker at a time). Idempotent: a
// VM already lost is not moved again. It goes on past one worker's or one
// VM's failure and returns them all.
func (w *Worker) markDeadOwners(ctx context.Context) error {
	workers, err := w.store.ListWorkers(ctx)
	if err != nil {
		return fmt.Errorf("listing workers: %w", err)
	}
	var errs []error
	for _, o := range workers {
		if o.ID == w.cfg.ID || time.Since(o.LastSeen) <= w.cfg.DeadAfter {
			continue
		}
		msg := types.OwnerSilent(o.ID, o.LastSeen)
		moved, err := w.store.MarkOwnerVMsLost(ctx, o.ID, msg)
		if err != nil {
			errs = append(errs, fmt.Errorf("marking the vms of worker %s lost: %w", o.ID, err))
			continue
		}
		for _, vm := range moved {
			w.log.Warn("vm lost: its owner worker is silent", "vm_id", vm.ID, "owner", o.ID, "last_seen", o.LastSeen)
			if err := w.failLostTasks(ctx, vm.ID, msg); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// failLostTasks fails the open tasks of a lost VM with msg, removes them
// from Asynq and wakes their waiters.
func (w *Worker) failLostTasks(ctx context.Context, vmID, msg string) error {
	ended, err := w.store.FailOpenTasks(ctx, vmID, "", msg)
	if err != nil {
		return fmt.Errorf("failing the tasks of lost vm %s: %w", vmID, err)
	}
	for _, t := range ended {
		if w.enqueuer != nil && t.Queue != "" {
			if err := w.enqueuer.Cancel(ctx, t.ID, t.Queue); err != nil {
				// The row says failed already; whoever takes the task
				// later finds it ended.
				w.log.Warn("removing a lost vm's task from its queue", "vm_id", vmID, "task_id", t.ID, "err", err)
			}
		}
		if w.notifier != nil {
			_ = w.notifier.NotifyTask(ctx, t.ID)
		}
	}
	return nil
}

// adoptLost takes back the VMs this worker owns that were marked lost
// while it was away: one the backend still runs (seen, the backend's list)
// becomes running again, any other failed with the reason, so that
// Reconcile removes its leftovers like those of any failed VM. A VM that
// was deleted while lost is in deleting, not lost: its queued delete task
// finishes it. Each move is conditional (lost and still this worker's), so
// a concurrent delete wins.
func (w *Worker) adoptLost(ctx context.Context, seen map[string]vmm.VMStatus) error {
	lost, err := w.store.ListVMs(ctx, storage.VMFilter{Owner: w.cfg.ID, States: []types.VMState{types.VMLost}})
	if err != nil {
		return fmt.Errorf("listing lost vms: %w", err)
	}
	var errs []error
	for _, vm := range lost {
		to, detail := types.VMFailed, "its worker was away and the backend no longer has it; delete it"
		if st, ok := seen[vm.ID]; ok {
			switch st.State {
			case types.VMRunning:
				to, detail = types.VMRunning, ""
			case types.VMPaused, types.VMSuspended:
				to, detail = st.State, ""
			case types.VMStopped:
				// Stopped before its worker went away (or while): it
				// is still whole, and can be started again.
				to, detail = types.VMStopped, ""
			default:
				detail = fmt.Sprintf("its worker was away and the vm is %s in the backend", st.State)
				if st.Detail != "" {
					detail += ": " + st.Detail
				}
				detail += "; delete it"
			}
		}
		moved, err := w.store.UpdateOwnedVMState(ctx, vm.ID, w.cfg.ID, types.VMLost, to, detail)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("taking back lost vm %s: %w", vm.ID, err))
		case moved && to == types.VMRunning:
			w.log.Info("took back a lost vm", "vm_id", vm.ID)
		case moved:
			w.log.Warn("lost vm did not survive its worker's absence", "vm_id", vm.ID, "detail", detail)
		}
	}
	return errors.Join(errs...)
}
