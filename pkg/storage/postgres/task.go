package postgres

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

const taskColumns = `id, type, COALESCE(vm_id, ''), payload, state, attempts, error, result, created_at, updated_at, finished_at`

func scanTask(row pgx.Row) (*types.Task, error) {
	var (
		task             types.Task
		payload, result  *string
		typeName, status string
	)
	err := row.Scan(&task.ID, &typeName, &task.VMID, &payload, &status, &task.Attempts, &task.Error,
		&result, &task.CreatedAt, &task.UpdatedAt, &task.FinishedAt)
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
		(id, type, vm_id, payload, state, attempts, error, result, created_at, updated_at, finished_at)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)`,
		t.ID, string(t.Type), nullIfEmpty(t.VMID), payload, string(t.State), t.Attempts, t.Error,
		result, t.CreatedAt, t.UpdatedAt, t.FinishedAt)
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
			updated_at = $6,
			finished_at = CASE
				WHEN $2::text IS NULL THEN finished_at
				WHEN $7::boolean THEN COALESCE(finished_at, $6)
				ELSE NULL END
		WHERE id = $1 RETURNING `+taskColumns,
		id, state, u.Attempts, u.Error, result, now(), terminal))
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
