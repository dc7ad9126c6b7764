package postgres

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

const taskColumns = `id, type, COALESCE(vm_id, ''), payload, state, attempts, error, result, created_at, updated_at, finished_at, queue, worker_id`

func scanTask(row pgx.Row) (*types.Task, error) {
	var (
		task             types.Task
		payload, result  *string
		typeName, status string
	)
	err := row.Scan(&task.ID, &typeName, &task.VMID, &payload, &status, &task.Attempts, &task.Error,
		&result, &task.CreatedAt, &task.UpdatedAt, &task.FinishedAt, &task.Queue, &task.WorkerID)
	if err != nil {
		return nil, err
	}
	task.Type, task.State = types.TaskType(typeName), types.TaskState(status)
	task.Payload, task.Result = fromRawJSON(payload), fromRawJSON(result)
	task.CreatedAt, task.UpdatedAt = utc(task.CreatedAt), utc(task.UpdatedAt)
	if task.FinishedAt != nil {
		f := utc(*task.FinishedAt)
		task.FinishedAt = &f
	}
	return &task, nil
}

// CreateTask inserts t. An empty State is stored as pending; zero
// timestamps are set to now in t.
func (s *Store) CreateTask(ctx context.Context, t *types.Task) error {
	if err := required("task", "id", t.ID); err != nil {
		return fmt.Errorf("creating task: %w", err)
	}
	if err := required("task "+t.ID, "type", string(t.Type)); err != nil {
		return fmt.Errorf("creating task %s: %w", t.ID, err)
	}
	payload, err := rawJSON("payload", t.Payload)
	if err != nil {
		return fmt.Errorf("creating task %s: %w", t.ID, err)
	}
	result, err := rawJSON("result", t.Result)
	if err != nil {
		return fmt.Errorf("creating task %s: %w", t.ID, err)
	}
	if t.State == "" {
		t.State = types.TaskPending
	}
	stamp(&t.CreatedAt, &t.UpdatedAt)
	_, err = s.pool.Exec(ctx, `INSERT INTO tasks
		(id, type, vm_id, payload, state, attempts, error, result, created_at, updated_at, finished_at, queue, worker_id)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)`,
		t.ID, string(t.Type), nullIfEmpty(t.VMID), payload, string(t.State), t.Attempts, t.Error,
		result, t.CreatedAt, t.UpdatedAt, t.FinishedAt, t.Queue, t.WorkerID)
	if err != nil {
		return s.fail(err, "creating task %s", t.ID)
	}
	return nil
}

// GetTask returns the task with id.
func (s *Store) GetTask(ctx context.Context, id string) (*types.Task, error) {
	return getByID(ctx, s, "task", id, `SELECT `+taskColumns+` FROM tasks WHERE id = $1`, scanTask)
}

// UpdateTask applies u in one statement. Entering a terminal state sets
// FinishedAt (once); entering another state clears it.
func (s *Store) UpdateTask(ctx context.Context, id string, u storage.TaskUpdate) (*types.Task, error) {
	var state *string
	if u.State != nil {
		st := string(*u.State)
		state = &st
	}
	terminal := u.State != nil && u.State.Terminal()
	result, err := rawJSON("result", u.Result)
	if err != nil {
		return nil, fmt.Errorf("updating task %s: %w", id, err)
	}
	t, err := scanTask(s.pool.QueryRow(ctx, `UPDATE tasks SET
			state = COALESCE($2, state),
			attempts = COALESCE($3, attempts),
			error = COALESCE($4, error),
			result = COALESCE($5, result),
			queue = COALESCE($8, queue),
			worker_id = COALESCE($9, worker_id),
			updated_at = $6,
			finished_at = CASE
				WHEN $2::text IS NULL THEN finished_at
				WHEN $7::boolean THEN COALESCE(finished_at, $6)
				ELSE NULL END
		WHERE id = $1 RETURNING `+taskColumns,
		id, state, u.Attempts, u.Error, result, now(), terminal, u.Queue, u.WorkerID))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, notFound("task", id)
	}
	if err != nil {
		return nil, s.fail(err, "updating task %s", id)
	}
	return t, nil
}

// ListTasks returns the tasks of vmID, newest first.
func (s *Store) ListTasks(ctx context.Context, vmID string) ([]*types.Task, error) {
	tasks, err := queryAll(ctx, s, scanTask, `SELECT `+taskColumns+` FROM tasks WHERE vm_id = $1
		ORDER BY created_at DESC, id DESC`, vmID)
	if err != nil {
		return nil, s.fail(err, "listing the tasks of vm %s", vmID)
	}
	return tasks, nil
}

// openStates are the states of a task that has not ended.
var openStates = []string{string(types.TaskPending), string(types.TaskRunning), string(types.TaskRetrying)}

// ListOpenTasks returns the open tasks matching f, least recently updated
// first.
func (s *Store) ListOpenTasks(ctx context.Context, f storage.OpenTaskFilter) ([]*types.Task, error) {
	states := openStates
	if len(f.States) > 0 {
		states = nil
		for _, st := range f.States {
			if st.Terminal() {
				return nil, fmt.Errorf("%w: listing open tasks: %s is not an open state", types.ErrInvalid, st)
			}
			states = append(states, string(st))
		}
	}
	var limit *int
	if f.Limit > 0 {
		limit = &f.Limit
	}
	tasks, err := queryAll(ctx, s, scanTask, `SELECT `+taskColumns+` FROM tasks
		WHERE state = ANY($1)
			AND ($2 = '' OR worker_id = $2)
			AND ($3 = '' OR vm_id = $3)
			AND ($4::timestamptz IS NULL OR updated_at < $4)
		ORDER BY updated_at, id LIMIT $5`, states, f.WorkerID, f.VMID, f.UpdatedBefore, limit)
	if err != nil {
		return nil, s.fail(err, "listing open tasks")
	}
	return tasks, nil
}

// FailOpenTasks ends the open tasks of vmID but exceptID in one UPDATE.
func (s *Store) FailOpenTasks(ctx context.Context, vmID, exceptID, msg string) ([]*types.Task, error) {
	if err := required("failing open tasks", "vm id", vmID); err != nil {
		return nil, err
	}
	t := now()
	tasks, err := queryAll(ctx, s, scanTask, `UPDATE tasks SET state = 'failed', error = $3,
			updated_at = $4, finished_at = COALESCE(finished_at, $4)
		WHERE vm_id = $1 AND id <> $2 AND state = ANY($5) RETURNING `+taskColumns,
		vmID, exceptID, msg, t, openStates)
	if err != nil {
		return nil, s.fail(err, "failing the open tasks of vm %s", vmID)
	}
	return tasks, nil
}

// MarkExecutionStarted inserts the start record; an existing one is kept.
func (s *Store) MarkExecutionStarted(ctx context.Context, e *storage.ExecutionStart) error {
	if err := required("execution start", "id", e.ID); err != nil {
		return err
	}
	if err := required("execution start "+e.ID, "vm id", e.VMID); err != nil {
		return err
	}
	at := e.StartedAt
	if at.IsZero() {
		at = now()
	}
	_, err := s.pool.Exec(ctx, `INSERT INTO execution_starts (id, vm_id, task_id, pid, started_at)
		VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING`, e.ID, e.VMID, e.TaskID, e.PID, at)
	if err != nil {
		return s.fail(err, "recording the start of execution %s", e.ID)
	}
	return nil
}

// GetExecutionStart returns the start record of execution id.
func (s *Store) GetExecutionStart(ctx context.Context, id string) (*storage.ExecutionStart, error) {
	return getByID(ctx, s, "execution start", id, `SELECT id, vm_id, task_id, pid, started_at
		FROM execution_starts WHERE id = $1`, func(r pgx.Row) (*storage.ExecutionStart, error) {
		var e storage.ExecutionStart
		if err := r.Scan(&e.ID, &e.VMID, &e.TaskID, &e.PID, &e.StartedAt); err != nil {
			return nil, err
		}
		e.StartedAt = utc(e.StartedAt)
		return &e, nil
	})
}
