package worker_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/queue"
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
