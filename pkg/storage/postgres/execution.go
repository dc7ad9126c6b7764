package postgres

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/aetherium/aetherium-core/pkg/types"
)

const executionColumns = `id, vm_id, COALESCE(job_id, ''), COALESCE(task_id, ''), command, args, env, cwd,
	exit_code, stdout, stderr, stdout_truncated, stderr_truncated, timed_out, error,
	started_at, finished_at, duration_ns`

func scanExecution(row pgx.Row) (*types.Execution, error) {
	var (
		e              types.Execution
		args, env      *string
		stdout, stderr []byte
		durationNS     int64
	)
	err := row.Scan(&e.ID, &e.VMID, &e.JobID, &e.TaskID, &e.Command, &args, &env, &e.Cwd,
		&e.ExitCode, &stdout, &stderr, &e.StdoutTruncated, &e.StderrTruncated, &e.TimedOut, &e.Error,
		&e.StartedAt, &e.FinishedAt, &durationNS)
	if err != nil {
		return nil, err
	}
	if err := fromJSON(args, &e.Args); err != nil {
		return nil, fmt.Errorf("execution %s args: %w", e.ID, err)
	}
	if err := fromJSON(env, &e.Env); err != nil {
		return nil, fmt.Errorf("execution %s env: %w", e.ID, err)
	}
	e.Stdout, e.Stderr = string(stdout), string(stderr)
	e.StartedAt, e.FinishedAt = utc(e.StartedAt), utc(e.FinishedAt)
	e.Duration = time.Duration(durationNS)
	return &e, nil
}

// PutExecution inserts e or replaces the execution with its id. Output is
// stored as bytes, so it may hold anything a program prints.
func (s *Store) PutExecution(ctx context.Context, e *types.Execution) error {
	if err := required("execution", "id", e.ID); err != nil {
		return fmt.Errorf("storing execution: %w", err)
	}
	if err := required("execution "+e.ID, "vm id", e.VMID); err != nil {
		return fmt.Errorf("storing execution %s: %w", e.ID, err)
	}
	args, err := toJSON(e.Args)
	if err != nil {
		return fmt.Errorf("storing execution %s: %w", e.ID, err)
	}
	env, err := toJSON(e.Env)
	if err != nil {
		return fmt.Errorf("storing execution %s: %w", e.ID, err)
	}
	_, err = s.pool.Exec(ctx, `INSERT INTO executions (id, vm_id, job_id, task_id, command, args, env, cwd,
			exit_code, stdout, stderr, stdout_truncated, stderr_truncated, timed_out, error,
			started_at, finished_at, duration_ns)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
		ON CONFLICT (id) DO UPDATE SET
			vm_id = EXCLUDED.vm_id, job_id = EXCLUDED.job_id, task_id = EXCLUDED.task_id,
			command = EXCLUDED.command, args = EXCLUDED.args, env = EXCLUDED.env, cwd = EXCLUDED.cwd,
			exit_code = EXCLUDED.exit_code, stdout = EXCLUDED.stdout, stderr = EXCLUDED.stderr,
			stdout_truncated = EXCLUDED.stdout_truncated, stderr_truncated = EXCLUDED.stderr_truncated,
			timed_out = EXCLUDED.timed_out, error = EXCLUDED.error, started_at = EXCLUDED.started_at,
			finished_at = EXCLUDED.finished_at, duration_ns = EXCLUDED.duration_ns`,
		e.ID, e.VMID, nullIfEmpty(e.JobID), nullIfEmpty(e.TaskID), e.Command, args, env, e.Cwd,
		e.ExitCode, bytesOf(e.Stdout), bytesOf(e.Stderr), e.StdoutTruncated, e.StderrTruncated, e.TimedOut, e.Error,
		e.StartedAt, e.FinishedAt, int64(e.Duration))
	if err != nil {
		return s.fail(err, "storing execution %s of vm %s", e.ID, e.VMID)
	}
	return nil
}

// bytesOf converts s for a NOT NULL BYTEA column; pgx sends a nil slice as
// NULL.
func bytesOf(s string) []byte {
	if s == "" {
		return []byte{}
	}
	return []byte(s)
}

// GetExecution returns the execution with id.
func (s *Store) GetExecution(ctx context.Context, id string) (*types.Execution, error) {
	return getByID(ctx, s, "execution", id, `SELECT `+executionColumns+` FROM executions WHERE id = $1`, scanExecution)
}

// ListExecutions returns the executions of vmID in the order they started.
func (s *Store) ListExecutions(ctx context.Context, vmID string) ([]*types.Execution, error) {
	es, err := s.queryExecutions(ctx, `vm_id`, vmID)
	if err != nil {
		return nil, s.fail(err, "listing the executions of vm %s", vmID)
	}
	return es, nil
}

// queryExecutions returns the executions whose column (vm_id or job_id)
// equals value, in the order they started; id breaks ties.
func (s *Store) queryExecutions(ctx context.Context, column, value string) ([]*types.Execution, error) {
	return queryAll(ctx, s, scanExecution, `SELECT `+executionColumns+` FROM executions WHERE `+column+` = $1
		ORDER BY started_at, id`, value)
}

const jobColumns = `id, vm_id, COALESCE(task_id, ''), commands, stop_on_failure, state, error, created_at, updated_at`

func scanJob(row pgx.Row) (*types.Job, error) {
	var (
		j        types.Job
		commands *string
		state    string
	)
	err := row.Scan(&j.ID, &j.VMID, &j.TaskID, &commands, &j.StopOnFailure, &state, &j.Error, &j.CreatedAt, &j.UpdatedAt)
	if err != nil {
		return nil, err
	}
	if err := fromJSON(commands, &j.Commands); err != nil {
		return nil, fmt.Errorf("job %s commands: %w", j.ID, err)
	}
	j.State = types.JobState(state)
	j.CreatedAt, j.UpdatedAt = utc(j.CreatedAt), utc(j.UpdatedAt)
	return &j, nil
}

// CreateJob inserts j without its Executions, which are stored with
// PutExecution. An empty State is stored as pending; zero timestamps are set
// to now in j. A job for a VM that does not exist returns
// types.ErrNotFound.
func (s *Store) CreateJob(ctx context.Context, j *types.Job) error {
	if err := required("job", "id", j.ID); err != nil {
		return fmt.Errorf("creating job: %w", err)
	}
	if err := required("job "+j.ID, "vm id", j.VMID); err != nil {
		return fmt.Errorf("creating job %s: %w", j.ID, err)
	}
	commands, err := toJSON(j.Commands)
	if err != nil {
		return fmt.Errorf("creating job %s: %w", j.ID, err)
	}
	if j.State == "" {
		j.State = types.JobPending
	}
	stamp(&j.CreatedAt, &j.UpdatedAt)
	_, err = s.pool.Exec(ctx, `INSERT INTO jobs (id, vm_id, task_id, commands, stop_on_failure, state, error, created_at, updated_at)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
		j.ID, j.VMID, nullIfEmpty(j.TaskID), commands, j.StopOnFailure, string(j.State), j.Error, j.CreatedAt, j.UpdatedAt)
	if err != nil {
		return s.fail(err, "creating job %s", j.ID)
	}
	return nil
}

// GetJob returns the job with its executions in the order they started,
// which is command order because a job runs its commands one by one.
func (s *Store) GetJob(ctx context.Context, id string) (*types.Job, error) {
	j, err := getByID(ctx, s, "job", id, `SELECT `+jobColumns+` FROM jobs WHERE id = $1`, scanJob)
	if err != nil {
		return nil, err
	}
	es, err := s.queryExecutions(ctx, `job_id`, id)
	if err != nil {
		return nil, s.fail(err, "reading the executions of job %s", id)
	}
	if len(es) > 0 {
		j.Executions = es
	}
	return j, nil
}

// UpdateJobState sets the job's state and error text.
func (s *Store) UpdateJobState(ctx context.Context, id string, state types.JobState, errMsg string) error {
	tag, err := s.pool.Exec(ctx, `UPDATE jobs SET state = $2, error = $3, updated_at = $4 WHERE id = $1`,
		id, string(state), errMsg, now())
	if err != nil {
		return s.fail(err, "moving job %s to %s", id, state)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("moving job %s to %s: %w", id, state, notFound("job", id))
	}
	return nil
}
