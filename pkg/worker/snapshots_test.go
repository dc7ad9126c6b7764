package worker_test

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// waitFailed waits for a task that must fail and returns its error text.
func waitFailed(t *testing.T, svc service.TaskService, id string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	u, err := uuid.Parse(id)
	require.NoError(t, err)
	task, err := svc.WaitTask(ctx, u)
	require.NoError(t, err)
	require.Equal(t, types.TaskFailed, task.State, "task %s should fail", id)
	return task.Error
}

// TestPauseResumeDocker: a docker VM pauses and resumes through the task
// path; calls on a paused VM say to resume it; suspend and snapshots are
// refused as the docker backend cannot do them; and bad requests (pause
// a paused VM, resume a running one, an unknown snapshot or template)
// are refused before anything is queued, as invalid input.
func TestPauseResumeDocker(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := context.Background()
	vmID := createVM(t, s, "pausing")
	sn := service.Snapshots(s.Service)

	id, err := sn.PauseVMTask(ctx, vmID.String())
	require.NoError(t, err)
	waitOK(t, s.Service, id)
	vm, err := s.Service.GetVM(ctx, vmID)
	require.NoError(t, err)
	require.Equal(t, types.VMPaused, vm.State)

	_, err = s.Service.ExecuteCommandTask(ctx, vmID.String(), "true", nil)
	require.ErrorIs(t, err, types.ErrConflict)
	require.Contains(t, err.Error(), "aether-cli vm resume")
	_, err = sn.PauseVMTask(ctx, vmID.String())
	require.ErrorIs(t, err, types.ErrInvalid)
	require.Contains(t, err.Error(), "it is paused")

	id, err = sn.ResumeVMTask(ctx, vmID.String())
	require.NoError(t, err)
	waitOK(t, s.Service, id)
	e := execWait(t, s, vmID, types.Command{Cmd: "echo", Args: []string{"back"}})
	require.Equal(t, "back\n", e.Stdout)
	_, err = sn.ResumeVMTask(ctx, vmID.String())
	require.ErrorIs(t, err, types.ErrInvalid, "resuming a running vm")

	id, err = sn.SuspendVMTask(ctx, vmID.String())
	require.NoError(t, err)
	require.Contains(t, waitFailed(t, s.Service, id.String()), "cannot suspend")
	id, err = sn.SnapshotVMTask(ctx, vmID.String(), "snap-docker")
	require.NoError(t, err)
	require.Contains(t, waitFailed(t, s.Service, id.String()), "cannot snapshot")
	got, err := sn.GetSnapshot(ctx, types.KindSnapshot, "snap-docker")
	require.NoError(t, err)
	require.Equal(t, types.SnapshotFailed, got.State)
	require.NotEmpty(t, got.Error)

	_, err = s.Service.CreateVMTaskWithOptions(ctx, service.CreateVMOptions{Name: "clone", FromSnapshot: "no-such"})
	require.ErrorIs(t, err, types.ErrInvalid)
	require.Contains(t, err.Error(), "no snapshot named")
	_, err = s.Service.CreateVMTaskWithOptions(ctx, service.CreateVMOptions{Name: "clone", Template: "no-such"})
	require.ErrorIs(t, err, types.ErrInvalid)
	_, err = sn.SnapshotVMTask(ctx, vmID.String(), "bad name")
	require.ErrorIs(t, err, types.ErrInvalid)
}
