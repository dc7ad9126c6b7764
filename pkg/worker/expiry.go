package worker

import (
	"context"
	"encoding/json"
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
// It reports whether the VM is gone.
func (w *Worker) expireVM(ctx context.Context, vm *types.VM) bool {
	id := uuid.New().String()
	log := w.log.With("task_id", id, "type", types.TaskVMDelete, "vm_id", vm.ID)
	now := time.Now().UTC()
	payload, _ := json.Marshal(map[string]string{"vm_id": vm.ID})
	task := &types.Task{ID: id, Type: types.TaskVMDelete, VMID: vm.ID, Payload: payload, State: types.TaskRunning,
		Attempts: 1, CreatedAt: now, UpdatedAt: now}
	if err := w.store.CreateTask(ctx, task); err != nil {
		log.Warn("recording the deletion of an expired vm", "err", err)
		return false
	}
	log.Info("vm expired; deleting it", "expired_at", vm.ExpiresAt)
	res, err := w.moveVM(ctx, log, vm.ID, types.VMDeleting, types.VMDeleted, "deleting", w.vmm.DeleteVM)
	if err != nil {
		log.Warn("deleting expired vm", "err", err)
		w.update(ctx, id, storage.TaskUpdate{State: ptr(types.TaskFailed), Error: ptr(err.Error())})
		w.metrics.taskEnded(string(types.TaskVMDelete), types.TaskFailed)
		return false
	}
	res["note"], res["worker_id"] = "expired", w.cfg.ID
	w.update(ctx, id, storage.TaskUpdate{State: ptr(types.TaskSucceeded), Result: result(res), Error: ptr("")})
	w.metrics.taskEnded(string(types.TaskVMDelete), types.TaskSucceeded)
	return true
}
