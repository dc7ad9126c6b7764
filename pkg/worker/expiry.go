package worker

import (
	"context"
	"encoding/json"
	"log/slog"
	"time"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// expiryDeleteTimeout bounds the deletion of one expired VM.
const expiryDeleteTimeout = 5 * time.Minute

// expiryRetryDelay is how long a failed deletion of an expired VM waits
// before the next attempt, so that a VM the backend cannot remove does not
// add a failed task every ExpiryInterval.
const expiryRetryDelay = 30 * time.Second

// expiryLoop deletes the expired VMs this worker owns, at once (so VMs
// that expired while the worker was down go first) and then every
// ExpiryInterval, until ctx ends.
func (w *Worker) expiryLoop(ctx context.Context) {
	defer close(w.expiryDone)
	t := time.NewTicker(w.cfg.ExpiryInterval)
	defer t.Stop()
	for {
		w.expire(ctx)
		select {
		case <-ctx.Done():
			w.expiring.Wait()
			return
		case <-t.C:
		}
	}
}

// expire starts the deletion of every expired VM of this worker that is
// not already being deleted by an earlier round. VMs still being created
// wait for their create task to end, which is what moves them on.
func (w *Worker) expire(ctx context.Context) {
	now := time.Now().UTC()
	vms, err := w.store.ListVMs(ctx, storage.VMFilter{Owner: w.cfg.ID, ExpiredBy: &now})
	if err != nil {
		if ctx.Err() == nil {
			w.log.Warn("listing expired vms", "err", err)
		}
		return
	}
	for _, vm := range vms {
		if vm.State == types.VMPending || vm.State == types.VMCreating {
			continue
		}
		w.inflightMu.Lock()
		next, busy := w.inflight[vm.ID]
		busy = busy && (next.IsZero() || now.Before(next))
		if !busy {
			w.inflight[vm.ID] = time.Time{}
		}
		w.inflightMu.Unlock()
		if busy {
			continue
		}
		w.expiring.Go(func() {
			// A deletion under way finishes even when the worker stops, so
			// that no VM is left half deleted.
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), expiryDeleteTimeout)
			defer cancel()
			ok := w.expireVM(dctx, vm)
			w.inflightMu.Lock()
			if ok {
				delete(w.inflight, vm.ID)
			} else {
				w.inflight[vm.ID] = time.Now().Add(expiryRetryDelay)
			}
			w.inflightMu.Unlock()
		})
	}
}

// expireVM deletes one expired VM the way a vm:delete task would, and
// records it as such a task, so that the VM's history says what happened.
// It reports whether the VM is gone. A VM whose OnExpiry is
// types.ExpiryPause is paused instead (expirePause).
func (w *Worker) expireVM(ctx context.Context, vm *types.VM) bool {
	if vm.OnExpiry == types.ExpiryPause {
		return w.expirePause(ctx, vm)
	}
	return w.expireDelete(ctx, vm)
}

// expireDelete deletes an expired VM, recorded as a vm:delete task.
func (w *Worker) expireDelete(ctx context.Context, vm *types.VM) bool {
	return w.expiryTask(ctx, vm, types.TaskVMDelete, "deleting", func(log *slog.Logger) (map[string]any, error) {
		return w.moveVM(ctx, log, vm.ID, types.VMDeleting, types.VMDeleted, "deleting", w.vmm.DeleteVM)
	})
}

// expirePause pauses an expired VM whose OnExpiry is types.ExpiryPause, as
// E2B's autoPause does: a running VM is suspended to disk where the
// backend can (freeing its memory), its vCPUs paused elsewhere, recorded
// as a vm:suspend or vm:pause task; then its expiry is cleared, so it
// waits to be resumed (and given a new TTL) or deleted. A paused,
// suspended or stopped VM only loses its expiry; a failed one (or one
// being deleted) is deleted, as it would be without the option: there is
// nothing to keep. It reports whether that is done.
//
// vm is re-read first and its expiry cleared only if nobody changed it
// meanwhile: a TTL extended (or a resume with a new TTL) between the
// listing and the pause wins.
func (w *Worker) expirePause(ctx context.Context, listed *types.VM) bool {
	vm, err := w.store.GetVM(ctx, listed.ID)
	if err != nil {
		w.log.Warn("re-reading an expired vm", "vm_id", listed.ID, "err", err)
		return false
	}
	if vm.ExpiresAt == nil || time.Now().Before(*vm.ExpiresAt) {
		return true // extended or cleared meanwhile
	}
	switch vm.State {
	case types.VMRunning:
		typ, to := types.TaskVMSuspend, types.VMSuspended
		if !w.vmm.Capabilities().Suspend {
			typ, to = types.TaskVMPause, types.VMPaused
		}
		ok := w.expiryTask(ctx, vm, typ, "pausing", func(*slog.Logger) (map[string]any, error) {
			snap, err := w.snapshotter()
			if err != nil {
				return nil, err
			}
			op := snap.Pause
			if to == types.VMSuspended {
				op = snap.Suspend
			}
			start := time.Now()
			if err := op(ctx, vm.ID); err != nil {
				return nil, err
			}
			if err := w.setState(ctx, vm.ID, to, ""); err != nil {
				return nil, err
			}
			return map[string]any{"vm_id": vm.ID, "state": to, "took_ms": time.Since(start).Milliseconds()}, nil
		})
		if !ok {
			return false
		}
	case types.VMPaused, types.VMSuspended, types.VMStopped:
	default:
		return w.expireDelete(ctx, vm)
	}
	// Cleared only if it is still the expiry acted on.
	cur, err := w.store.GetVM(ctx, vm.ID)
	if err == nil && (cur.ExpiresAt == nil || !cur.ExpiresAt.Equal(*vm.ExpiresAt)) {
		return true
	}
	if _, err := w.store.SetVMExpiry(ctx, vm.ID, nil); err != nil {
		w.log.Warn("clearing the expiry of a paused vm", "vm_id", vm.ID, "err", err)
		return false
	}
	return true
}

// expiryTask runs op on an expired VM, recorded as a task of type typ
// (what names it in the log: "deleting", "pausing"), and reports whether
// it succeeded. The task's result is op's, noted as an expiry's.
func (w *Worker) expiryTask(ctx context.Context, vm *types.VM, typ types.TaskType, what string, op func(log *slog.Logger) (map[string]any, error)) bool {
	id := uuid.New().String()
	log := w.log.With("task_id", id, "type", typ, "vm_id", vm.ID)
	now := time.Now().UTC()
	payload, _ := json.Marshal(map[string]string{"vm_id": vm.ID})
	// WorkerID lets this worker's next run fail the row if it dies first
	// (reclaim): no queue holds it.
	task := &types.Task{ID: id, Type: typ, VMID: vm.ID, Payload: payload, State: types.TaskRunning,
		Attempts: 1, WorkerID: w.cfg.ID, CreatedAt: now, UpdatedAt: now}
	if err := w.store.CreateTask(ctx, task); err != nil {
		log.Warn("recording the "+what+" of an expired vm", "err", err)
		return false
	}
	log.Info("vm expired; "+what+" it", "expired_at", vm.ExpiresAt)
	res, err := op(log)
	if err != nil {
		log.Warn(what+" expired vm", "err", err)
		w.update(ctx, id, storage.TaskUpdate{State: ptr(types.TaskFailed), Error: ptr(err.Error())})
		w.metrics.taskEnded(string(typ), types.TaskFailed)
		return false
	}
	res["note"], res["worker_id"] = "expired", w.cfg.ID
	w.update(ctx, id, storage.TaskUpdate{State: ptr(types.TaskSucceeded), Result: result(res), Error: ptr("")})
	w.metrics.taskEnded(string(typ), types.TaskSucceeded)
	return true
}
