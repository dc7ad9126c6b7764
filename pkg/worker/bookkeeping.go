package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"

	"github.com/aetherium/aetherium-core/internal/faults"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// permanent reports whether err can never succeed on retry.
func permanent(err error) bool {
	return errors.Is(err, types.ErrInvalid) || errors.Is(err, types.ErrNotFound) ||
		errors.Is(err, types.ErrConflict) || errors.Is(err, types.ErrNotSupported) ||
		errors.Is(err, types.ErrOutcomeUnknown) || errors.Is(err, asynq.SkipRetry)
}

// errShutdown is the cause of the contexts of the attempts a stopping
// worker interrupts once its drain time is over. Asynq has requeued those
// tasks without counting an attempt, so they are not failures.
var errShutdown = errors.New("the worker stopped while the task ran; the task runs again on the next worker, and a command left running in its guest is reattached to, not run again")

// stoppingKey carries, in an attempt's context, the flag its worker sets
// when it begins to stop (see interrupted).
type stoppingKey struct{}

// stopping reports whether the worker running the attempt of ctx is
// stopping.
func stopping(ctx context.Context) bool {
	f, ok := ctx.Value(stoppingKey{}).(*atomic.Bool)
	return ok && f.Load()
}

// interrupted reports whether an attempt ended because its worker stopped:
// Asynq cancels the context of the attempts still running when the drain
// time is over (with context.Canceled, the same as a cancelled task, so
// the worker's own flag tells the two apart).
func interrupted(ctx context.Context, err error) bool {
	return errors.Is(err, vmm.ErrDetached) ||
		(ctx.Err() != nil && (stopping(ctx) || errors.Is(context.Cause(ctx), errShutdown)))
}

// final reports whether a failing attempt is the task's last one, so the
// handler must clean up instead of leaving the work for a retry. An
// attempt its stopping worker interrupted is never the last.
func final(ctx context.Context, err error) bool {
	if interrupted(ctx, err) {
		return false
	}
	retry, _ := asynq.GetRetryCount(ctx)
	maxRetry, _ := asynq.GetMaxRetry(ctx)
	return permanent(err) || retry >= maxRetry
}

// taskHandler is a plain task handler: it does the task's work and returns
// its result. Recording the attempt is left to the bookkeeping middleware,
// which hands it log (with the task's id and type) and receives the result.
type taskHandler func(ctx context.Context, t *asynq.Task, log *slog.Logger) (map[string]any, error)

// attempt carries one attempt of a task between the bookkeeping middleware
// and the taskHandler it wraps, through ctx: asynq.Handler returns only an
// error.
type attempt struct {
	log    *slog.Logger
	result map[string]any
}

type attemptKey struct{}

// ProcessTask implements asynq.Handler.
func (h taskHandler) ProcessTask(ctx context.Context, t *asynq.Task) error {
	a, ok := ctx.Value(attemptKey{}).(*attempt)
	if !ok {
		// A mux without Worker.bookkeeping would run tasks unrecorded.
		return fmt.Errorf("task type %s: handler run without the worker's bookkeeping middleware", t.Type())
	}
	res, err := h(ctx, t, a.log)
	a.result = res
	return err
}

// bookkeeping is the middleware, applied once to the mux, that records what
// every task does: its state transitions in storage, notifications to its
// waiters, the metrics, skipping tasks that already ended (redelivery after
// a crash), and asynq.SkipRetry for permanent errors. Handlers that are not
// taskHandlers (asynq's not-found handler) pass through unrecorded.
func (w *Worker) bookkeeping(next asynq.Handler) asynq.Handler {
	if _, ok := next.(taskHandler); !ok {
		return next
	}
	return asynq.HandlerFunc(func(ctx context.Context, t *asynq.Task) error {
		return w.track(ctx, t, next)
	})
}

// track runs one attempt of a task through next; see bookkeeping.
func (w *Worker) track(ctx context.Context, t *asynq.Task, next asynq.Handler) error {
	w.attempts.Add(1)
	defer w.attempts.Done()
	ctx = context.WithValue(ctx, stoppingKey{}, &w.stopping)
	id, _ := asynq.GetTaskID(ctx)
	retry, _ := asynq.GetRetryCount(ctx)
	log := w.log.With("task_id", id, "type", t.Type())
	rec, err := w.store.GetTask(ctx, id)
	switch {
	case errors.Is(err, types.ErrNotFound):
		// Enqueued without going through TaskService: record it now so it
		// cannot vanish.
		now := time.Now().UTC()
		payload := json.RawMessage(t.Payload())
		if !json.Valid(payload) {
			// Keep the bytes for the post-mortem, as a JSON string.
			payload, _ = json.Marshal(string(payload))
		}
		rec = &types.Task{ID: id, Type: types.TaskType(t.Type()), Payload: payload, State: types.TaskPending, CreatedAt: now, UpdatedAt: now}
		if err := w.store.CreateTask(ctx, rec); err != nil && !errors.Is(err, types.ErrConflict) {
			return fmt.Errorf("recording task %s: %w", id, err)
		}
	case err != nil:
		return fmt.Errorf("loading task %s: %w", id, err)
	case rec.State.Terminal():
		log.Info("task already ended; skipping", "state", rec.State)
		return nil
	}
	if retry == 0 && rec.Attempts == 0 {
		w.metrics.queueLatency.WithLabelValues(t.Type()).Observe(since(rec.CreatedAt))
	}
	w.update(ctx, id, storage.TaskUpdate{State: ptr(types.TaskRunning), Attempts: ptr(retry + 1), WorkerID: &w.cfg.ID})
	if err := faults.Reach(ctx, faults.TaskClaimed); err != nil {
		return err
	}

	a := &attempt{log: log}
	err = next.ProcessTask(context.WithValue(ctx, attemptKey{}, a), t)
	bg := context.WithoutCancel(ctx)
	if err == nil {
		res := a.result
		if res == nil {
			res = map[string]any{}
		}
		res["worker_id"] = w.cfg.ID // which worker did it: ownership is observable
		w.update(bg, id, storage.TaskUpdate{State: ptr(types.TaskSucceeded), Result: result(res), Error: ptr("")})
		w.metrics.taskEnded(t.Type(), types.TaskSucceeded)
		return nil
	}
	if h := (*handedOn)(nil); errors.As(err, &h) {
		// The owner's copy carries on; this one ends here, and the error
		// of an earlier attempt (the owner's) stays on the row.
		log.Info("task handed on to the vm's owner", "owner", h.owner, "queue", h.queue)
		return nil
	}
	if ctx.Err() != nil {
		if cur, e := w.store.GetTask(bg, id); e == nil && cur.State == types.TaskFailed {
			log.Info("task cancelled")
			w.metrics.taskEnded(t.Type(), types.TaskFailed)
			return fmt.Errorf("task %s cancelled: %w", id, asynq.SkipRetry)
		}
	}
	if interrupted(ctx, err) {
		// Asynq put the task back in its queue; the next worker (this one
		// restarted, usually) runs it again or reattaches to its command.
		log.Warn("task interrupted by the worker's stop; it runs again on the next worker", "err", err)
		w.update(bg, id, storage.TaskUpdate{State: ptr(types.TaskPending), Error: ptr(errShutdown.Error())})
		return err
	}
	state := types.TaskRetrying
	if final(ctx, err) {
		state = types.TaskFailed
	}
	log.Warn("task failed", "err", err, "state", state, "attempt", retry+1)
	w.update(bg, id, storage.TaskUpdate{State: &state, Error: ptr(err.Error())})
	w.metrics.taskEnded(t.Type(), state)
	if permanent(err) {
		return fmt.Errorf("%w (%w)", err, asynq.SkipRetry)
	}
	return err
}

func (w *Worker) update(ctx context.Context, id string, u storage.TaskUpdate) {
	if _, err := w.store.UpdateTask(ctx, id, u); err != nil {
		w.log.Error("recording task state", "task_id", id, "err", err)
	}
	if w.notifier != nil {
		if err := w.notifier.NotifyTask(ctx, id); err != nil {
			w.log.Warn("notifying task waiters", "task_id", id, "err", err)
		}
	}
}

func ptr[T any](v T) *T { return &v }
