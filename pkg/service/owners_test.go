package service_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
	"github.com/aetherium/aetherium-core/pkg/types"
)

func waitDone(t *testing.T, svc service.TaskService, id uuid.UUID, want types.TaskState) *types.Task {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	task, err := svc.WaitTask(ctx, id)
	require.NoError(t, err)
	require.Equal(t, want, task.State, "task %s: %s", task.ID, task.Error)
	return task
}

// TestDeadOwnerCalls: with its only worker stopped and silent for longer
// than dead_after, calls on a VM fail at once saying which worker is
// silent since when, its queued task fails with that reason, the worker
// list shows it unhealthy, and a delete is recorded for the owner, which
// finishes it when it returns.
func TestDeadOwnerCalls(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := context.Background()
	vmID, err := s.Service.CreateVMTask(ctx, "orphan", 1, 128)
	require.NoError(t, err)
	waitDone(t, s.Service, vmID, types.TaskSucceeded)
	s.Workers["w1"].Stop()
	svc := service.NewTaskService(s.Queue, s.Store, service.WithDeadAfter(5*time.Second))

	// Accepted: the owner reported a moment ago.
	queued, err := svc.ExecuteCommandTask(ctx, vmID.String(), "true", nil)
	require.NoError(t, err)
	task, err := s.Store.GetTask(ctx, queued.String())
	require.NoError(t, err)
	require.Equal(t, queue.WorkerQueue("w1"), task.Queue, "the task row records its queue")

	w, err := s.Store.GetWorker(ctx, "w1")
	require.NoError(t, err)
	w.LastSeen = time.Now().Add(-time.Minute).UTC()
	require.NoError(t, s.Store.UpsertWorker(ctx, w))
	since := w.LastSeen.Format(time.RFC3339)
	msg := "owner worker w1 has not reported since " + since

	start := time.Now()
	calls := map[string]func() error{
		"exec": func() error { _, err := svc.ExecuteCommandTask(ctx, vmID.String(), "true", nil); return err },
		"exec interactive": func() error {
			_, err := svc.Exec(ctx, vmID.String(), types.Command{Cmd: "true"}, &bytes.Buffer{}, &bytes.Buffer{})
			return err
		},
		"job": func() error {
			_, err := svc.RunJobTask(ctx, vmID.String(), []types.Command{{Cmd: "true"}}, false)
			return err
		},
		"stop":  func() error { _, err := svc.StopVMTask(ctx, vmID.String()); return err },
		"start": func() error { _, err := svc.StartVMTask(ctx, vmID.String()); return err },
		"tools": func() error { _, err := svc.InstallToolsTask(ctx, vmID.String(), []string{"node@22"}); return err },
	}
	for name, call := range calls {
		err := call()
		require.ErrorIs(t, err, types.ErrUnavailable, name)
		require.Contains(t, err.Error(), msg, name)
		require.Contains(t, err.Error(), "aether-cli vm delete "+vmID.String(), name)
	}
	require.Less(t, time.Since(start), 5*time.Second, "calls on a lost vm must answer at once")

	vm, err := svc.GetVM(ctx, vmID)
	require.NoError(t, err)
	require.Equal(t, types.VMLost, vm.State)
	require.Equal(t, msg, vm.Error)
	task = waitDone(t, svc, queued, types.TaskFailed)
	require.Equal(t, msg, task.Error)

	ws, err := svc.ListWorkers(ctx)
	require.NoError(t, err)
	require.Len(t, ws, 1)
	require.False(t, ws[0].Healthy)
	require.Equal(t, "has not reported since "+since, ws[0].Detail)

	del, err := svc.DeleteVMTask(ctx, vmID.String())
	require.NoError(t, err)
	vm, err = svc.GetVM(ctx, vmID)
	require.NoError(t, err)
	require.Equal(t, types.VMDeleting, vm.State)
	task, err = svc.GetTask(ctx, del)
	require.NoError(t, err)
	require.False(t, task.State.Terminal())
	require.Contains(t, string(task.Result), "its owner finishes the delete when it returns")

	// The owner returns and finishes the delete.
	require.NoError(t, s.NewWorker(t, "w1").Start(ctx))
	waitDone(t, svc, del, types.TaskSucceeded)
	vm, err = svc.GetVM(ctx, vmID)
	require.NoError(t, err)
	require.Equal(t, types.VMDeleted, vm.State)
	left, err := s.VMMs["w1"].ListVMs(ctx)
	require.NoError(t, err)
	require.Empty(t, left)
	ws, err = svc.ListWorkers(ctx)
	require.NoError(t, err)
	require.True(t, ws[0].Healthy, ws[0].Detail)
}

// deafQueue is a Redis queue whose notifications cannot be subscribed to
// (Redis down for them).
type deafQueue struct{ *queue.Redis }

func (deafQueue) WatchTask(context.Context, string) (<-chan struct{}, func(), error) {
	return nil, nil, queue.UnavailableError("127.0.0.1:1", errors.New("connection refused"))
}

// TestWaitTaskWithoutNotifications: WaitTask returns when the row ends
// although notifications fail, by polling PostgreSQL.
func TestWaitTaskWithoutNotifications(t *testing.T) {
	dsn := testenv.Postgres(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	require.NoError(t, postgres.MigrateUp(ctx, dsn))
	store, err := postgres.Open(ctx, dsn)
	require.NoError(t, err)
	t.Cleanup(store.Close)
	q, err := queue.NewRedis(ctx, queue.RedisConfig{Addr: testenv.Redis(t)})
	require.NoError(t, err)
	t.Cleanup(func() { q.Close() })
	svc := service.NewTaskService(deafQueue{q}, store)

	now := time.Now().UTC()
	task := &types.Task{ID: uuid.NewString(), Type: types.TaskVMCreate, State: types.TaskPending, CreatedAt: now, UpdatedAt: now}
	require.NoError(t, store.CreateTask(ctx, task))
	go func() {
		time.Sleep(300 * time.Millisecond)
		_, _ = store.UpdateTask(context.Background(), task.ID, storageUpdate(types.TaskSucceeded))
	}()
	got, err := svc.WaitTask(ctx, uuid.MustParse(task.ID))
	require.NoError(t, err)
	require.Equal(t, types.TaskSucceeded, got.State)
}

// breakingStream is a Redis queue whose output stream breaks after its
// first chunk, as when Redis restarts mid-command.
type breakingStream struct{ *queue.Redis }

func (b breakingStream) ReadOutput(ctx context.Context, taskID string, fn func(queue.OutputChunk) error) (*queue.ExitInfo, error) {
	errBroke := errors.New("read tcp: connection reset by peer")
	ei, err := b.Redis.ReadOutput(ctx, taskID, func(c queue.OutputChunk) error {
		if err := fn(c); err != nil {
			return err
		}
		return errBroke
	})
	if errors.Is(err, errBroke) {
		return nil, errors.New("reading output of task " + taskID + ": " + err.Error())
	}
	return ei, err
}

// TestExecStreamBreaks: when the output stream breaks mid-command, Exec
// does not fail: it waits for the task in PostgreSQL, writes the output
// the stream did not deliver, once, and returns the real exit code.
func TestExecStreamBreaks(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := context.Background()
	vmID, err := s.Service.CreateVMTask(ctx, "stream", 1, 128)
	require.NoError(t, err)
	waitDone(t, s.Service, vmID, types.TaskSucceeded)
	svc := service.NewTaskService(breakingStream{s.Queue}, s.Store)
	var out, errOut bytes.Buffer
	res, err := svc.Exec(ctx, vmID.String(), types.Command{Cmd: "sh", Args: []string{"-c", "echo one; sleep 1; echo two; echo err >&2; exit 7"}}, &out, &errOut)
	require.NoError(t, err)
	require.Empty(t, res.Err)
	require.False(t, res.OutcomeUnknown)
	require.Equal(t, 7, res.ExitCode)
	require.Equal(t, "one\ntwo\n", out.String())
	require.Equal(t, "err\n", errOut.String())
	require.False(t, strings.Contains(out.String(), "reading output"))
}

func storageUpdate(st types.TaskState) storage.TaskUpdate {
	return storage.TaskUpdate{State: &st}
}
