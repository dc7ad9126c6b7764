package worker_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/worker"
)

// TestRequeueLostTasks wipes Redis while a create task waits for a worker:
// the sweeper finds the open row that Asynq no longer knows and enqueues it
// again under its id, so the VM is created after all.
func TestRequeueLostTasks(t *testing.T) {
	defer worker.SetLostGrace(200 * time.Millisecond)()
	s := stack.Start(t, stack.Options{})
	ctx := context.Background()
	s.Workers["w1"].Stop()

	id, err := s.Service.CreateVMTask(ctx, "requeued", 1, 128)
	require.NoError(t, err)
	task, err := s.Store.GetTask(ctx, id.String())
	require.NoError(t, err)
	require.Equal(t, "aetherium", task.Queue, "the row records the queue the task is in")
	require.NoError(t, s.Queue.Client().FlushAll(ctx).Err())

	start := time.Now()
	w := s.NewWorker(t, "w1")
	require.NoError(t, w.Start(ctx))
	got := waitOK(t, s.Service, id)
	t.Logf("created %v after the worker started, with Redis wiped", time.Since(start).Round(time.Millisecond))
	require.Equal(t, id.String(), got.ID)
	vm, err := s.Store.GetVM(ctx, got.VMID)
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, vm.State)
}

// TestDeleteClosesOpenTasks deletes a VM that still has an open task: the
// task ends failed, saying why, instead of staying pending forever.
func TestDeleteClosesOpenTasks(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := context.Background()
	vmID := createVM(t, s, "closer")
	// A task whose queue entry is gone (as after a crash) but whose row is
	// still open.
	open := &types.Task{ID: "00000000-0000-4000-8000-00000000c105", Type: types.TaskVMExecute, VMID: vmID.String(),
		Payload: json.RawMessage(`{"vm_id":"` + vmID.String() + `","command":{"cmd":"true"}}`), State: types.TaskRetrying}
	require.NoError(t, s.Store.CreateTask(ctx, open))

	del, err := s.Service.DeleteVMTask(ctx, vmID.String())
	require.NoError(t, err)
	waitOK(t, s.Service, del)
	got, err := s.Store.GetTask(ctx, open.ID)
	require.NoError(t, err)
	require.Equal(t, types.TaskFailed, got.State)
	require.Contains(t, got.Error, "was deleted before the task could finish")
	delTask, err := s.Store.GetTask(ctx, del.String())
	require.NoError(t, err)
	require.Equal(t, types.TaskSucceeded, delTask.State, "the delete's own task is not closed")
}
