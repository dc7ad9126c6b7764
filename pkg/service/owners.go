package service

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// DeadAfterDefault is how long a worker may go without a heartbeat before
// the service treats it as dead (WithDeadAfter).
const DeadAfterDefault = 60 * time.Second

// WithDeadAfter sets how long a VM's owner worker may go without a
// heartbeat before calls on the VM fail at once with types.ErrUnavailable
// (the VM is then marked types.VMLost and its open tasks failed), and
// before ListWorkers shows the worker unhealthy. Set it to the workers'
// worker.dead_after. Default DeadAfterDefault; d <= 0 keeps it.
func WithDeadAfter(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.deadAfter = d
		}
	}
}

// silent reports whether a worker's last heartbeat is older than deadAfter.
func (s *Service) silent(w *types.Worker) bool {
	return time.Since(w.LastSeen) > s.opts.deadAfter
}

// ownerGone checks, with one read of the owner's heartbeat row, whether vm
// belongs to a worker that stopped reporting, or is already lost. If so it
// marks the owner's VMs lost (when the owner is silent), fails the VM's
// open tasks and returns the reason (msg); otherwise msg is empty. VMs
// without an owner, or already being deleted or gone, are never checked.
func (s *Service) ownerGone(ctx context.Context, vm *types.VM) (msg string, err error) {
	switch {
	case vm.Owner == "":
		return "", nil
	case vm.State == types.VMDeleting, vm.State == types.VMDeleted, vm.State == types.VMFailed:
		return "", nil
	}
	w, err := s.store.GetWorker(ctx, vm.Owner)
	switch {
	case errors.Is(err, types.ErrNotFound):
		// An owner that never reported cannot be judged by its heartbeat.
		if vm.State != types.VMLost {
			return "", nil
		}
		msg = cmp.Or(vm.Error, fmt.Sprintf("owner worker %s has not reported", vm.Owner))
	case err != nil:
		return "", fmt.Errorf("checking the owner of vm %s: %w", vm.ID, err)
	case s.silent(w):
		msg = types.OwnerSilent(w.ID, w.LastSeen)
	case vm.State == types.VMLost:
		// The owner is back but has not taken the VM back yet (it does so
		// when it starts).
		msg = cmp.Or(vm.Error, types.OwnerSilent(w.ID, w.LastSeen))
		return msg, s.failVMTasks(ctx, vm.ID, msg)
	default:
		return "", nil
	}
	if w != nil {
		moved, err := s.store.MarkOwnerVMsLost(ctx, w.ID, msg)
		if err != nil {
			return "", fmt.Errorf("marking the vms of silent worker %s lost: %w", w.ID, err)
		}
		for _, m := range moved {
			if m.ID == vm.ID {
				continue
			}
			if err := s.failVMTasks(ctx, m.ID, msg); err != nil {
				return "", err
			}
		}
		if len(moved) > 0 {
			s.opts.logger.Warn("owner worker is silent; its vms are lost", "worker_id", w.ID, "vms", len(moved), "last_seen", w.LastSeen)
		}
	}
	return msg, s.failVMTasks(ctx, vm.ID, msg)
}

// failVMTasks fails every open task of a lost VM with msg, takes them out
// of their queues and wakes their waiters.
func (s *Service) failVMTasks(ctx context.Context, vmID, msg string) error {
	ended, err := s.store.FailOpenTasks(ctx, vmID, "", msg)
	if err != nil {
		return fmt.Errorf("failing the tasks of lost vm %s: %w", vmID, err)
	}
	for _, t := range ended {
		if t.Queue != "" {
			if err := s.queue.Cancel(ctx, t.ID, t.Queue); err != nil {
				// The row already says failed; a worker that takes the task
				// later finds it ended.
				s.opts.logger.Warn("removing a lost vm's task from its queue", "task_id", t.ID, "vm_id", vmID, "err", err)
			}
		}
		if s.notifier != nil {
			_ = s.notifier.NotifyTask(ctx, t.ID)
		}
	}
	return nil
}

// lostError is the answer to a call on a VM whose owner is gone.
func lostError(what, vmID, msg string) error {
	return fmt.Errorf("%w: cannot %s vm %s: %s; wait for the worker to return (it takes its vms back when it starts), or delete the vm with `aether-cli vm delete %s`",
		types.ErrUnavailable, what, vmID, msg, vmID)
}

// checkOwner returns lostError when vm's owner is gone (see ownerGone).
func (s *Service) checkOwner(ctx context.Context, vm *types.VM, what string) error {
	msg, err := s.ownerGone(ctx, vm)
	if err != nil {
		return err
	}
	if msg != "" {
		return lostError(what, vm.ID, msg)
	}
	return nil
}

// errMoved: a lost VM changed state between reading it and deleting it.
var errMoved = fmt.Errorf("%w: the vm changed state meanwhile; try again", types.ErrConflict)

// deleteLost deletes a VM whose owner is gone, if it is: the VM is moved
// from lost to deleting and a delete task is queued for the owner, which
// finishes it when it returns (its leftovers are on its host only). done
// says whether the VM was such a one (then the delete task is submitted,
// or err says why not).
func (s *Service) deleteLost(ctx context.Context, id uuid.UUID, vm *types.VM) (done bool, err error) {
	msg, err := s.ownerGone(ctx, vm)
	if err != nil || msg == "" {
		return err != nil, err
	}
	moved, err := s.store.UpdateOwnedVMState(ctx, vm.ID, vm.Owner, types.VMLost, types.VMDeleting, msg)
	if err != nil {
		return true, fmt.Errorf("deleting lost vm %s: %w", vm.ID, err)
	}
	if !moved {
		return true, errMoved
	}
	t, err := queue.NewVMDeleteTask(id.String(), queue.VMDeletePayload{VMID: vm.ID})
	if err != nil {
		return true, err
	}
	t.Result, _ = json.Marshal(map[string]string{"vm_id": vm.ID,
		"note": msg + "; the vm is marked deleting and its owner finishes the delete when it returns"})
	s.opts.logger.Info("delete of a lost vm recorded for its owner", "vm_id", vm.ID, "task_id", t.ID, "worker_id", vm.Owner)
	return true, s.submit(ctx, t, queue.EnqueueOptions{Queue: queue.WorkerQueue(vm.Owner), MaxRetry: deleteMaxRetry, Timeout: deleteTimeout})
}
