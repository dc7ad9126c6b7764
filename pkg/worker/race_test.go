package worker_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/worker"
)

// pausingVMM holds every StartVM, once done, until proceed is closed.
type pausingVMM struct {
	vmm.VMOrchestrator
	started chan string
	proceed chan struct{}
}

func (p *pausingVMM) StartVM(ctx context.Context, id string) error {
	err := p.VMOrchestrator.StartVM(ctx, id)
	p.started <- id
	<-p.proceed
	return err
}

// TestDeletedWhileCreating: a delete that wins the race with a create (the
// row is deleted while the VM boots) leaves nothing in the backend.
func TestDeletedWhileCreating(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	s.Workers["w1"].Stop()
	p := &pausingVMM{VMOrchestrator: s.VMMs["w1"], started: make(chan string, 1), proceed: make(chan struct{})}
	w, err := worker.New(worker.Config{ID: "w-race", Redis: queue.RedisConfig{Addr: s.RedisAddr}}, s.Store, p, s.Queue, s.Queue)
	require.NoError(t, err)
	require.NoError(t, w.Start(t.Context()))
	t.Cleanup(w.Stop)
	// Registered after Stop, so it runs first: a test that fails before
	// releasing the paused StartVM must not leave Stop waiting for it.
	var release sync.Once
	t.Cleanup(func() { release.Do(func() { close(p.proceed) }) })

	ctx := t.Context()
	taskID, err := s.Service.CreateVMTask(ctx, "race", 1, 128)
	require.NoError(t, err)
	var id string
	select {
	case id = <-p.started:
	case <-time.After(2 * time.Minute):
		t.Fatal("the create never started the vm")
	}
	for _, st := range []types.VMState{types.VMDeleting, types.VMDeleted} {
		_, err := s.Store.UpdateVMState(ctx, id, st, "")
		require.NoError(t, err)
	}
	release.Do(func() { close(p.proceed) })

	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	task, err := s.Service.WaitTask(wctx, taskID)
	require.NoError(t, err)
	require.Equal(t, types.TaskFailed, task.State)
	require.Contains(t, task.Error, "deleted while it was being created")
	_, err = p.GetVMStatus(ctx, id)
	require.ErrorIs(t, err, types.ErrNotFound, "the backend's vm must be removed")
}

// TestCreateRetryHandedOnToOwner: a create retry that reaches a worker
// other than the one that claimed the VM (retries go through the shared
// queue) is handed on to the owner's queue, not failed: the owner, back,
// finishes the create.
func TestCreateRetryHandedOnToOwner(t *testing.T) {
	s := stack.Start(t, stack.Options{Workers: []string{"alpha", "beta"}})
	ctx := t.Context()
	s.Workers["alpha"].Stop()

	// What the first attempt on alpha left: a VM alpha claimed, and the
	// task's retry waiting in the shared queue.
	now := time.Now().UTC()
	vm := &types.VM{ID: uuid.NewString(), Name: "handed-on", VCPUs: 1, MemoryMB: 128, State: types.VMPending,
		Network: types.NetworkNone, CreatedAt: now, UpdatedAt: now}
	require.NoError(t, s.Store.CreateVM(ctx, vm))
	_, err := s.Store.ClaimVM(ctx, vm.ID, storage.Claim{Owner: "alpha", Provider: s.Provider})
	require.NoError(t, err)
	task, err := queue.NewVMCreateTask(vm.ID, queue.VMCreatePayload{VMID: vm.ID})
	require.NoError(t, err)
	task.Error = "creating vm: the first attempt's error"
	require.NoError(t, s.Store.CreateTask(ctx, task))
	require.NoError(t, s.Queue.Enqueue(ctx, task, queue.EnqueueOptions{Queue: queue.SharedQueue, MaxRetry: 2, Timeout: 10 * time.Minute}))

	insp := asynq.NewInspector(asynq.RedisClientOpt{Addr: s.RedisAddr})
	defer insp.Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		rec, err := s.Store.GetTask(ctx, task.ID)
		require.NoError(t, err)
		require.False(t, rec.State.Terminal(), "beta ended the task instead of handing it on: %s %s", rec.State, rec.Error)
		if info, err := insp.GetTaskInfo(queue.WorkerQueue("alpha"), task.ID); err == nil {
			require.Equal(t, asynq.TaskStatePending, info.State)
			require.Equal(t, 2, info.MaxRetry, "the retries left go along")
			// Read again: the row read above may predate the hand-on's
			// write, which comes before the enqueue.
			rec, err = s.Store.GetTask(ctx, task.ID)
			require.NoError(t, err)
			require.Equal(t, types.TaskPending, rec.State)
			require.Equal(t, task.Error, rec.Error, "the owner's error must not be replaced")
			break
		}
		require.True(t, time.Now().Before(deadline), "the task never reached alpha's queue")
		time.Sleep(20 * time.Millisecond)
	}

	require.NoError(t, s.NewWorker(t, "alpha").Start(ctx))
	done := waitOK(t, s.Service, uuid.MustParse(task.ID))
	require.Equal(t, "alpha", workerOf(t, done))
	got, err := s.Store.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, got.State)
	require.Equal(t, "alpha", got.Owner)
	st, err := s.VMMs["alpha"].GetVMStatus(ctx, vm.ID)
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, st.State)
	left, err := s.VMMs["beta"].ListVMs(ctx)
	require.NoError(t, err)
	require.Empty(t, left, "the non-owner must not have made anything")
}

// TestCreateRetryNotHandedToSilentOwner: when the VM's owner has not
// reported for long (it is gone), a create retry reaching another worker
// is not handed on to a queue nobody reads: the task fails at once saying
// which worker is silent, instead of leaving the VM creating for good.
func TestCreateRetryNotHandedToSilentOwner(t *testing.T) {
	s := stack.Start(t, stack.Options{Workers: []string{"beta"}})
	ctx := t.Context()
	now := time.Now().UTC()
	require.NoError(t, s.Store.UpsertWorker(ctx, &types.Worker{ID: "gone", LastSeen: now.Add(-time.Hour)}))
	vm := &types.VM{ID: uuid.NewString(), Name: "silent-owner", VCPUs: 1, MemoryMB: 128, State: types.VMPending,
		Network: types.NetworkNone, CreatedAt: now, UpdatedAt: now}
	require.NoError(t, s.Store.CreateVM(ctx, vm))
	_, err := s.Store.ClaimVM(ctx, vm.ID, storage.Claim{Owner: "gone", Provider: s.Provider})
	require.NoError(t, err)
	task, err := queue.NewVMCreateTask(vm.ID, queue.VMCreatePayload{VMID: vm.ID})
	require.NoError(t, err)
	require.NoError(t, s.Store.CreateTask(ctx, task))
	require.NoError(t, s.Queue.Enqueue(ctx, task, queue.EnqueueOptions{Queue: queue.SharedQueue, MaxRetry: 2, Timeout: 10 * time.Minute}))

	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	got, err := s.Service.WaitTask(wctx, uuid.MustParse(task.ID))
	require.NoError(t, err)
	require.Equal(t, types.TaskFailed, got.State)
	require.Contains(t, got.Error, "owner worker gone has not reported since")
}
