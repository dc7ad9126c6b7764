package worker_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/worker"
)

// ageWorker makes a stopped worker's last heartbeat ago old and returns
// the text a dead owner is reported with.
func ageWorker(t *testing.T, s *stack.Stack, id string, ago time.Duration) string {
	t.Helper()
	ctx := context.Background()
	w, err := s.Store.GetWorker(ctx, id)
	require.NoError(t, err)
	w.LastSeen = time.Now().Add(-ago).UTC()
	require.NoError(t, s.Store.UpsertWorker(ctx, w))
	return "owner worker " + id + " has not reported since " + w.LastSeen.Format(time.RFC3339)
}

// TestDeadOwnerLostAndAdopted: a worker silent for longer than DeadAfter
// has its VMs marked lost by another worker's sweep and their queued tasks
// failed at once with the reason; when it returns it takes back the VM
// that still runs (commands work again) and fails the one the backend lost.
func TestDeadOwnerLostAndAdopted(t *testing.T) {
	s := stack.Start(t, stack.Options{Workers: []string{"w1", "w2"}})
	ctx := context.Background()
	s.Workers["w2"].Stop() // w1 creates every VM
	keep := createVM(t, s, "keep")
	gone := createVM(t, s, "gone")
	s.Workers["w1"].Stop()

	// Accepted while w1 still counts as alive; nobody will run it.
	queued, err := s.Service.ExecuteCommandTask(ctx, keep.String(), "true", nil)
	require.NoError(t, err)
	msg := ageWorker(t, s, "w1", 2*time.Minute)
	// The backend loses one VM while its worker is away.
	require.NoError(t, s.VMMs["w1"].DeleteVM(ctx, gone.String()))

	require.NoError(t, worker.MarkDeadOwners(ctx, s.Workers["w2"]))
	for _, id := range []string{keep.String(), gone.String()} {
		vm, err := s.Store.GetVM(ctx, id)
		require.NoError(t, err)
		require.Equal(t, types.VMLost, vm.State)
		require.Equal(t, msg, vm.Error)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	task, err := s.Service.WaitTask(wctx, queued)
	require.NoError(t, err)
	require.Equal(t, types.TaskFailed, task.State)
	require.Equal(t, msg, task.Error)
	// A second sweep changes nothing.
	require.NoError(t, worker.MarkDeadOwners(ctx, s.Workers["w2"]))

	w1 := s.NewWorker(t, "w1")
	require.NoError(t, w1.Start(ctx))
	vm, err := s.Store.GetVM(ctx, keep.String())
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, vm.State)
	require.Empty(t, vm.Error)
	e := execWait(t, s, keep, types.Command{Cmd: "echo", Args: []string{"back"}})
	require.Equal(t, "back\n", e.Stdout)

	vm, err = s.Store.GetVM(ctx, gone.String())
	require.NoError(t, err)
	require.Equal(t, types.VMFailed, vm.State)
	require.Contains(t, vm.Error, "backend no longer has it")

	// A live worker is never marked dead.
	require.NoError(t, worker.MarkDeadOwners(ctx, s.Workers["w2"]))
	vm, err = s.Store.GetVM(ctx, keep.String())
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, vm.State)
}
