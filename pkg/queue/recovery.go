package queue

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Known reports whether Asynq still holds task id in queueName in any
// state (pending, active, scheduled, retrying, archived or completed and
// retained), with that state's name. A task Asynq does not know was lost
// with Redis's data (or never enqueued): PostgreSQL, the source of truth,
// still has it, and the caller may enqueue it again under the same id.
func (r *Redis) Known(ctx context.Context, queueName, id string) (bool, string, error) {
	info, err := r.inspector.GetTaskInfo(queueName, id)
	switch {
	case errors.Is(err, asynq.ErrTaskNotFound) || errors.Is(err, asynq.ErrQueueNotFound):
		return false, "", nil
	case err != nil:
		return false, "", UnavailableError(r.cfg.Addr, fmt.Errorf("looking up task %s in queue %s: %w", id, queueName, err))
	}
	return true, info.State.String(), nil
}

// leaseKey is Asynq's sorted set of the leases of a queue's active tasks
// (member: task id, score: the lease's expiry in Unix seconds), as
// asynq/internal/base.LeaseKey names it. It is written by hand because
// Asynq offers no API to give up the lease of a task whose worker died:
// see ExpireLeases. TestExpireLeases checks the layout against the Asynq
// version in go.mod, so an upgrade that changes it fails the tests.
func leaseKey(queueName string) string { return "asynq:{" + queueName + "}:lease" }

// ExpireLeases ends at once the leases of the given active tasks of
// queueName, held by a previous run of the calling worker that was killed.
// Asynq's recoverer, which runs when a server starts and every minute
// after, then puts them back for a retry, instead of waiting up to 30 s for
// the lease to lapse plus 30 s of grace and a minute for the next round.
// Only ids that hold a lease are changed (ZADD XX); it returns how many
// did. The caller must be the only worker that could hold those leases:
// a worker reclaiming its own tasks as it starts, before it serves.
func (r *Redis) ExpireLeases(ctx context.Context, queueName string, ids ...string) (int, error) {
	if len(ids) == 0 {
		return 0, nil
	}
	// Far enough in the past for the recoverer's 30 s clock-skew cutoff.
	past := float64(time.Now().Add(-time.Hour).Unix())
	members := make([]redis.Z, len(ids))
	for i, id := range ids {
		members[i] = redis.Z{Score: past, Member: id}
	}
	n, err := r.rdb.ZAddArgs(ctx, leaseKey(queueName), redis.ZAddArgs{XX: true, Ch: true, Members: members}).Result()
	if err != nil {
		return 0, UnavailableError(r.cfg.Addr, fmt.Errorf("expiring leases in queue %s: %w", queueName, err))
	}
	return int(n), nil
}

// OutputSent returns how many bytes of stdout and stderr taskID's output
// stream holds, and whether it was ended with an exit chunk, so that a
// worker resuming a command's output (after reattaching to it) appends
// only what the stream does not have yet.
func (r *Redis) OutputSent(ctx context.Context, taskID string) (stdout, stderr int64, ended bool, err error) {
	msgs, err := r.rdb.XRange(ctx, outputKey(taskID), "-", "+").Result()
	if err != nil {
		return 0, 0, false, fmt.Errorf("reading output of task %s: %w", taskID, err)
	}
	for _, m := range msgs {
		kind, _ := m.Values["k"].(string)
		data, _ := m.Values["d"].(string)
		switch OutputKind(kind) {
		case OutputStdout:
			stdout += int64(len(data))
		case OutputStderr:
			stderr += int64(len(data))
		case OutputExit:
			ended = true
		}
	}
	return stdout, stderr, ended, nil
}

// RecoveryOptions are the options a task that Asynq lost is enqueued again
// with: in the queue it was in (t.Queue), with the retries its type gets
// less the attempts it made (at least one), and its type's timeout.
func RecoveryOptions(t *types.Task) EnqueueOptions {
	o := EnqueueOptions{Queue: t.Queue, MaxRetry: 2, Timeout: 10 * time.Minute}
	switch t.Type {
	case types.TaskVMExecute:
		o.Timeout = time.Hour
		if p, err := Decode[VMExecutePayload](t.Payload); err == nil && p.Command.Timeout > 0 {
			o.Timeout = p.Command.Timeout + time.Minute
		}
	case types.TaskJobRun:
		o.Timeout = time.Hour
	case types.TaskVMDelete, types.TaskVMStop, types.TaskVMStart:
		o.MaxRetry = 5
	}
	o.MaxRetry = max(o.MaxRetry-t.Attempts, 1)
	return o
}
