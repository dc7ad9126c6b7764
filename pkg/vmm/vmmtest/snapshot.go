package vmmtest

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// testSnapshotter checks vmm.Snapshotter on backends whose Capabilities
// offer it, and that the others do not pretend to.
//
// The contract these cases hold every backend to, beside vmm.Snapshotter's
// own words: a paused VM refuses commands, file and agent calls with
// types.ErrConflict ("paused; resume it first") rather than letting them
// hang until a resume; so does a suspended one.
func (s *suite) testSnapshotter(t *testing.T) {
	caps := s.o.Capabilities()
	sn, ok := vmm.AsSnapshotter(s.o)
	if !ok {
		require.False(t, caps.PauseResume || caps.Suspend || caps.Snapshot, "capabilities offer what AsSnapshotter does not give")
		return
	}
	if caps.PauseResume {
		t.Run("PauseResume", func(t *testing.T) { s.testPauseResume(t, sn) })
	}
	if caps.Suspend {
		t.Run("SuspendResume", func(t *testing.T) { s.testSuspendResume(t, sn) })
	}
	if caps.Snapshot {
		t.Run("SnapshotClone", func(t *testing.T) { s.testSnapshotClone(t, sn) })
	}
	if caps.Snapshot && caps.Suspend && caps.PauseResume {
		t.Run("SnapshotsOfPausedVM", func(t *testing.T) { s.testSnapshotsOfPaused(t, sn) })
	}
}

// testSnapshotsOfPaused: a paused VM is snapshotted twice, then suspended
// and resumed; its files survive and its disk is writable again. (QEMU
// refused a second save of a paused VM whose state it had saved.)
func (s *suite) testSnapshotsOfPaused(t *testing.T, sn vmm.Snapshotter) {
	t.Parallel()
	ctx := s.ctx(t)
	id := StartVM(t, s.o, s.spec(t))
	Sh(t, s.o, id, "echo one > /root/paused-snap && sync")
	require.NoError(t, sn.Pause(ctx, id))
	for i := range 2 {
		_, err := sn.Snapshot(ctx, id, t.TempDir())
		require.NoError(t, err, "snapshot %d of a paused VM", i+1)
		RequireState(t, s.o, id, types.VMPaused)
	}
	require.NoError(t, sn.Suspend(ctx, id), "suspending a paused VM after its snapshots")
	RequireState(t, s.o, id, types.VMSuspended)
	require.NoError(t, sn.Resume(ctx, id))
	RequireState(t, s.o, id, types.VMRunning)
	require.Equal(t, "one\ntwo\n", Sh(t, s.o, id, "echo two >> /root/paused-snap && sync && cat /root/paused-snap"))
}

func (s *suite) testPauseResume(t *testing.T, sn vmm.Snapshotter) {
	t.Parallel()
	ctx := s.ctx(t)
	// Bad input first: unknown and stopped VMs.
	require.ErrorIs(t, sn.Pause(ctx, "vmt-no-such-vm"), types.ErrNotFound)
	stopped := s.spec(t)
	_, err := s.o.CreateVM(ctx, stopped)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.o.DeleteVM(context.WithoutCancel(ctx), stopped.ID) })
	require.ErrorIs(t, sn.Pause(ctx, stopped.ID), types.ErrConflict)
	require.ErrorIs(t, sn.Resume(ctx, stopped.ID), types.ErrConflict)

	id := StartVM(t, s.o, s.spec(t))
	require.NoError(t, sn.Resume(ctx, id), "resuming a running VM is a no-op")
	require.NoError(t, sn.Pause(ctx, id))
	RequireState(t, s.o, id, types.VMPaused)
	require.NoError(t, sn.Pause(ctx, id), "pausing a paused VM is a no-op")
	_, err = s.o.ExecuteCommand(ctx, id, types.Command{Cmd: "true"}, vmm.ExecIO{})
	require.ErrorIs(t, err, types.ErrConflict, "a paused VM refuses commands")
	require.ErrorContains(t, err, "paused")
	require.NoError(t, sn.Resume(ctx, id))
	RequireState(t, s.o, id, types.VMRunning)
	require.Equal(t, "awake\n", Sh(t, s.o, id, "echo awake"))

	// A paused VM stops, and starts afresh.
	require.NoError(t, sn.Pause(ctx, id))
	require.NoError(t, s.o.StopVM(ctx, id, false))
	RequireState(t, s.o, id, types.VMStopped)
	require.NoError(t, s.o.StartVM(ctx, id))
	RequireState(t, s.o, id, types.VMRunning)
}

func (s *suite) testSuspendResume(t *testing.T, sn vmm.Snapshotter) {
	t.Parallel()
	ctx := s.ctx(t)
	require.ErrorIs(t, sn.Suspend(ctx, "vmt-no-such-vm"), types.ErrNotFound)
	id := StartVM(t, s.o, s.spec(t))
	pid := strings.TrimSpace(Sh(t, s.o, id, "sleep 1000 >/dev/null 2>&1 & echo $!"))
	Sh(t, s.o, id, "echo kept in memory > /tmp/marker")

	require.NoError(t, sn.Suspend(ctx, id))
	RequireState(t, s.o, id, types.VMSuspended)
	require.NoError(t, sn.Suspend(ctx, id), "suspending a suspended VM is a no-op")
	require.ErrorIs(t, sn.Pause(ctx, id), types.ErrConflict, "a suspended VM cannot be paused")
	_, err := s.o.ExecuteCommand(ctx, id, types.Command{Cmd: "true"}, vmm.ExecIO{})
	require.ErrorIs(t, err, types.ErrConflict, "a suspended VM refuses commands")

	require.NoError(t, sn.Resume(ctx, id))
	RequireState(t, s.o, id, types.VMRunning)
	require.Equal(t, "kept in memory\n", Sh(t, s.o, id, "cat /tmp/marker"))
	require.Equal(t, "sleep\n", Sh(t, s.o, id, "cat /proc/"+pid+"/comm"), "the process started before the suspend runs on")

	// A paused VM suspends too, and resumes running.
	require.NoError(t, sn.Pause(ctx, id))
	require.NoError(t, sn.Suspend(ctx, id))
	RequireState(t, s.o, id, types.VMSuspended)
	require.NoError(t, sn.Resume(ctx, id))
	require.Equal(t, "sleep\n", Sh(t, s.o, id, "cat /proc/"+pid+"/comm"))

	// A suspended VM survives a restart of its orchestrator, on one of
	// the test's own.
	if s.h.Restart != nil {
		o := s.h.New(t)
		osn, _ := vmm.AsSnapshotter(o)
		sp := s.spec(t)
		_, err := o.CreateVM(ctx, sp)
		require.NoError(t, err)
		require.NoError(t, o.StartVM(ctx, sp.ID))
		Sh(t, o, sp.ID, "echo before the restart > /tmp/marker")
		require.NoError(t, osn.Suspend(ctx, sp.ID))
		o = s.h.Restart(t, o)
		RequireState(t, o, sp.ID, types.VMSuspended)
		osn, _ = vmm.AsSnapshotter(o)
		require.NoError(t, osn.Resume(ctx, sp.ID))
		require.Equal(t, "before the restart\n", Sh(t, o, sp.ID, "cat /tmp/marker"))
		require.NoError(t, o.DeleteVM(ctx, sp.ID))
		_, err = o.GetVMStatus(ctx, sp.ID)
		require.ErrorIs(t, err, types.ErrNotFound)
		if s.h.RecordPath != nil {
			_, err := os.Stat(filepath.Dir(s.h.RecordPath(o, sp.ID)))
			require.ErrorIs(t, err, os.ErrNotExist, "delete leaves the suspended VM's files")
		}
	}
}

func (s *suite) testSnapshotClone(t *testing.T, sn vmm.Snapshotter) {
	t.Parallel()
	ctx := s.ctx(t)
	caps := s.o.Capabilities()
	src := StartVM(t, s.o, s.spec(t))
	Sh(t, s.o, src, "echo on disk > /root/before && echo in memory > /tmp/mem && sync")
	pid := strings.TrimSpace(Sh(t, s.o, src, "sleep 1000 >/dev/null 2>&1 & echo $!"))

	// Bad input: a relative, missing or non-empty directory.
	_, err := sn.Snapshot(ctx, src, "relative/dir")
	require.ErrorIs(t, err, types.ErrInvalid)
	full := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(full, "x"), nil, 0o600))
	_, err = sn.Snapshot(ctx, src, full)
	require.ErrorIs(t, err, types.ErrInvalid)
	bad := s.spec(t)
	bad.FromSnapshot = full
	_, err = s.o.CreateVM(ctx, bad)
	require.ErrorIs(t, err, types.ErrInvalid, "a directory without a snapshot")

	dir := t.TempDir()
	snap, err := sn.Snapshot(ctx, src, dir)
	require.NoError(t, err)
	require.Equal(t, dir, snap.Dir)
	require.Equal(t, caps.Provider, snap.Provider)
	require.Positive(t, snap.SizeBytes)
	RequireState(t, s.o, src, types.VMRunning)
	// The source goes on; what it writes now is not the snapshot's.
	Sh(t, s.o, src, "echo after > /root/after && sync")

	cl := s.spec(t)
	cl.FromSnapshot = dir
	clone := StartVM(t, s.o, cl)
	require.Equal(t, "on disk\n", Sh(t, s.o, clone, "cat /root/before"))
	require.Equal(t, "in memory\n", Sh(t, s.o, clone, "cat /tmp/mem"))
	require.Equal(t, "sleep\n", Sh(t, s.o, clone, "cat /proc/"+pid+"/comm"), "the clone has the source's processes")
	require.Equal(t, "absent\n", Sh(t, s.o, clone, "test -e /root/after && echo present || echo absent"))
	// And the clone goes its own way.
	Sh(t, s.o, clone, "echo clone > /root/clone-only && sync")
	require.Equal(t, "absent\n", Sh(t, s.o, src, "test -e /root/clone-only && echo present || echo absent"))
	require.Equal(t, cl.Name, s.hostname(t, clone), "the clone has its own hostname")

	// The snapshot stands alone: the source deleted, the clone boots
	// again from its disk, which still holds what the snapshot had.
	require.NoError(t, s.o.DeleteVM(ctx, src))
	require.NoError(t, s.o.StopVM(ctx, clone, false))
	require.NoError(t, s.o.StartVM(ctx, clone))
	require.Equal(t, "on disk\nclone\n", Sh(t, s.o, clone, "cat /root/before /root/clone-only"))
	require.NoError(t, s.o.DeleteVM(ctx, clone))
	_, err = s.o.GetVMStatus(ctx, clone)
	require.ErrorIs(t, err, types.ErrNotFound)
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.NotEmpty(t, ents, "deleting a clone leaves its snapshot (the caller's) alone")
}
