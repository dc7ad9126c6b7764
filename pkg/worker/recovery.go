package worker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hibiken/asynq"

	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Recovery after crashes and Redis restarts (docs/reliability.md).
//
// PostgreSQL is the source of truth for tasks; Asynq on Redis only carries
// them. Three mechanisms keep the two in step:
//   - the sweeper enqueues again, under the same id, every open task that
//     Asynq no longer knows (Redis restarted without its data);
//   - a worker that starts takes back the tasks its previous run was
//     running (killed with -9) at once, instead of waiting for their
//     Asynq leases to lapse;
//   - a worker that stops records the outcome of its in-flight tasks
//     before it returns, and leaves the commands it ran going in their
//     guests, for the next run to reattach to.

// queueRecovery is what the Redis queue offers for recovery; a notifier
// without it (tests' fakes) gets none.
type queueRecovery interface {
	Known(ctx context.Context, queueName, id string) (bool, string, error)
	ExpireLeases(ctx context.Context, queueName string, ids ...string) (int, error)
	OutputSent(ctx context.Context, taskID string) (stdout, stderr int64, ended bool, err error)
}

// sweeperLock names the lock that makes one worker at a time sweep.
const sweeperLock = "aetherium-worker-sweeper"

// lostGrace is how long a task row may be open before the sweeper asks
// Asynq about it: the service records a task before it enqueues it. It can
// be short: enqueueing a task Asynq already has is a no-op, so a sweep
// that races a slow enqueue does no harm.
var lostGrace = 2 * time.Second

// sweepBatch bounds the tasks one sweep looks at.
const sweepBatch = 200

// sweepLoop runs sweep every SweepInterval until ctx ends.
func (w *Worker) sweepLoop(ctx context.Context, done chan<- struct{}) {
	defer close(done)
	t := time.NewTicker(w.cfg.SweepInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			w.sweep(ctx)
		}
	}
}

// sweep does, under the sweeper lock, the cluster-wide bookkeeping that
// one worker at a time must do: marking dead owners' VMs lost and
// enqueueing again the tasks Asynq lost.
func (w *Worker) sweep(ctx context.Context) {
	sctx, cancel := context.WithTimeout(ctx, max(w.cfg.SweepInterval, 5*time.Second))
	defer cancel()
	_, err := w.store.RunExclusive(sctx, sweeperLock, func(ctx context.Context) error {
		return errors.Join(w.markDeadOwners(ctx), w.requeueLost(ctx))
	})
	if err != nil && ctx.Err() == nil {
		w.log.Warn("sweeping", "err", err)
	}
}

// requeueLost enqueues again every open task that Asynq does not know, in
// the queue it was in and under its id (so that a copy Asynq still has, or
// gets meanwhile, is not doubled: Enqueue of a known id is a no-op).
func (w *Worker) requeueLost(ctx context.Context) error {
	if w.recovery == nil || w.enqueuer == nil {
		return nil
	}
	before := time.Now().Add(-lostGrace)
	open, err := w.store.ListOpenTasks(ctx, storage.OpenTaskFilter{UpdatedBefore: &before, Limit: sweepBatch})
	if err != nil {
		return err
	}
	var errs []error
	for _, t := range open {
		if t.Queue == "" {
			continue // recorded before tasks carried their queue
		}
		known, state, err := w.recovery.Known(ctx, t.Queue, t.ID)
		if err != nil {
			return err // Redis is down: the next sweep tries again
		}
		if known {
			if state == asynq.TaskStateArchived.String() {
				// Asynq gave up on it, but the last attempt's outcome was
				// not recorded (its worker died as it failed).
				msg := fmt.Sprintf("the task was given up after %d attempts without a recorded outcome", t.Attempts)
				w.update(ctx, t.ID, storage.TaskUpdate{State: ptr(types.TaskFailed), Error: &msg})
			}
			continue
		}
		if err := w.enqueuer.Enqueue(ctx, t, queue.RecoveryOptions(t)); err != nil {
			errs = append(errs, fmt.Errorf("enqueueing lost task %s again: %w", t.ID, err))
			continue
		}
		w.update(ctx, t.ID, storage.TaskUpdate{State: ptr(types.TaskPending)})
		w.metrics.recovered.WithLabelValues("requeued").Inc()
		w.log.Warn("the queue had lost a task; enqueued it again", "task_id", t.ID, "type", t.Type, "queue", t.Queue, "was", t.State)
	}
	return errors.Join(errs...)
}

// reclaim takes back the tasks this worker's previous run was running when
// it died: their Asynq leases are ended, so that Asynq's recoverer (which
// runs as the task server starts) retries them at once. It must run before
// the task server starts, while no task of this worker can be running.
func (w *Worker) reclaim(ctx context.Context) error {
	if w.recovery == nil {
		return nil
	}
	mine, err := w.store.ListOpenTasks(ctx, storage.OpenTaskFilter{WorkerID: w.cfg.ID, States: []types.TaskState{types.TaskRunning}})
	if err != nil {
		return err
	}
	byQueue := map[string][]string{}
	for _, t := range mine {
		q := t.Queue
		if q == "" {
			// No queue: a task this worker ran in-process (an expiry's
			// delete or pause), which died with the previous run and
			// nothing retries under this id (the expiry makes a new
			// task), or one recorded before tasks carried their queue.
			known, _, err := w.recovery.Known(ctx, w.Queue(), t.ID)
			if err != nil {
				return err
			}
			if !known {
				msg := fmt.Sprintf("worker %s stopped before this task finished; it ran outside the queue (an expiry's), so it is not retried as this task: the expiry acts again if the VM is still due", w.cfg.ID)
				w.update(ctx, t.ID, storage.TaskUpdate{State: ptr(types.TaskFailed), Error: &msg})
				w.metrics.taskEnded(string(t.Type), types.TaskFailed)
				w.log.Warn("failed a task the previous run ran outside the queue", "task_id", t.ID, "type", t.Type, "vm_id", t.VMID)
				continue
			}
			q = w.Queue()
		}
		byQueue[q] = append(byQueue[q], t.ID)
	}
	total := 0
	for q, ids := range byQueue {
		n, err := w.recovery.ExpireLeases(ctx, q, ids...)
		if err != nil {
			return err
		}
		total += n
	}
	if total > 0 {
		w.metrics.recovered.WithLabelValues("reclaimed").Add(float64(total))
		w.log.Warn("took back the tasks the previous run was running", "tasks", total)
	}
	return nil
}

// retryDelay is how long Asynq waits before retrying a failed attempt. A
// task whose worker died (its lease expired, or was ended by reclaim) runs
// again at once; other failures back off from 1 s, doubling up to 20 s, so
// that an outage of PostgreSQL of a minute costs a few retries, not the
// minutes of Asynq's default.
func retryDelay(n int, err error, _ *asynq.Task) time.Duration {
	if errors.Is(err, asynq.ErrLeaseExpired) {
		return 0
	}
	return min(time.Second<<min(n, 5), 20*time.Second)
}
