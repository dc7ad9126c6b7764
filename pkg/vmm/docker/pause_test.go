package docker_test

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

// TestPauseResume: a paused container's processes are frozen, not
// ended: a sleep started before the pause has the same pid after the
// resume. Exec on a paused VM is refused with a hint. Each call is
// timed (the goal is at most 50 ms each).
func TestPauseResume(t *testing.T) {
	t.Parallel()
	o := newOrchestrator(t, config(t))
	require.True(t, o.Capabilities().PauseResume)
	snap, ok := vmm.AsSnapshotter(o)
	require.True(t, ok)
	ctx := t.Context()
	id := vmmtest.StartVM(t, o, vmmtest.NewSpec(t))

	res, err := o.ExecuteCommand(ctx, id, types.Command{Cmd: "sh", Args: []string{"-c", "sleep 300 >/dev/null 2>&1 & echo $!"}}, vmm.ExecIO{})
	require.NoError(t, err)
	require.Equal(t, 0, res.ExitCode, string(res.Stderr))
	pid, err := strconv.Atoi(strings.TrimSpace(string(res.Stdout)))
	require.NoError(t, err)

	start := time.Now()
	require.NoError(t, snap.Pause(ctx, id))
	pause := time.Since(start)
	require.NoError(t, snap.Pause(ctx, id), "pausing a paused VM is a no-op")
	vmmtest.RequireState(t, o, id, types.VMPaused)
	_, err = o.ExecuteCommand(ctx, id, types.Command{Cmd: "true"}, vmm.ExecIO{})
	require.ErrorIs(t, err, types.ErrConflict)
	require.ErrorContains(t, err, "paused; resume it")

	start = time.Now()
	require.NoError(t, snap.Resume(ctx, id))
	resume := time.Since(start)
	require.NoError(t, snap.Resume(ctx, id), "resuming a running VM is a no-op")
	vmmtest.RequireState(t, o, id, types.VMRunning)
	res, err = o.ExecuteCommand(ctx, id, types.Command{Cmd: "sh", Args: []string{"-c", "kill -0 " + strconv.Itoa(pid) + " && echo alive"}}, vmm.ExecIO{})
	require.NoError(t, err)
	require.Equal(t, "alive\n", string(res.Stdout), "the sleep survived the pause with its pid")
	// Logged, not asserted: speed is claimed from benchmarks, and a timed
	// assertion fails under CI load (70 ms was seen beside the chaos suite).
	t.Logf("docker pause took %s, resume %s (goal: each at most 50 ms)", pause.Round(time.Microsecond), resume.Round(time.Microsecond))

	// StartVM resumes a paused VM; StopVM stops one.
	require.NoError(t, snap.Pause(ctx, id))
	require.NoError(t, o.StartVM(ctx, id))
	vmmtest.RequireState(t, o, id, types.VMRunning)
	require.NoError(t, snap.Pause(ctx, id))
	require.NoError(t, o.StopVM(ctx, id, false))
	vmmtest.RequireState(t, o, id, types.VMStopped)
	require.ErrorIs(t, snap.Pause(ctx, id), types.ErrConflict, "a stopped VM cannot be paused")
	require.ErrorIs(t, snap.Resume(ctx, id), types.ErrConflict)
	require.ErrorIs(t, snap.Pause(ctx, "no-such-vm"), types.ErrNotFound)
}

// TestSnapshotsUnsupported: suspend, snapshot and a VM from a snapshot
// answer ErrNotSupported naming the backend, and Capabilities says so.
func TestSnapshotsUnsupported(t *testing.T) {
	t.Parallel()
	o := newOrchestrator(t, config(t))
	c := o.Capabilities()
	require.False(t, c.Snapshot)
	require.False(t, c.Suspend)
	ctx := t.Context()
	sp := vmmtest.NewSpec(t)
	id := vmmtest.StartVM(t, o, sp)
	err := o.Suspend(ctx, id)
	require.ErrorIs(t, err, types.ErrNotSupported)
	require.ErrorContains(t, err, "not supported by the docker backend")
	_, err = o.Snapshot(ctx, id, t.TempDir())
	require.ErrorIs(t, err, types.ErrNotSupported)
	require.ErrorContains(t, err, "not supported by the docker backend")
	vmmtest.RequireState(t, o, id, types.VMRunning)

	clone := vmmtest.NewSpec(t)
	clone.FromSnapshot = t.TempDir()
	_, err = o.CreateVM(ctx, clone)
	require.ErrorIs(t, err, types.ErrNotSupported)
	require.ErrorContains(t, err, "not supported by the docker backend")
	_, err = o.GetVMStatus(ctx, clone.ID)
	require.ErrorIs(t, err, types.ErrNotFound, "nothing was created")
}
