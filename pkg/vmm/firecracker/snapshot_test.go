package firecracker_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/firecracker"
	"github.com/aetherium/aetherium-core/pkg/vmm/firecracker/fcfake"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

// requireAllAccepted fails when the fake refused any request: every body
// the backend sent was valid per the spec and in the right phase.
func requireAllAccepted(t *testing.T, reqs []fcfake.Request) {
	t.Helper()
	for _, r := range reqs {
		require.Less(t, r.Status, 300, "%s %s was refused: %s", r.Method, r.Path, r.Fault)
	}
}

// countEvents counts one kind of line in a process fake's log file.
func countEvents(t *testing.T, dir, file, ev string) int {
	t.Helper()
	n := 0
	for _, l := range readLines(t, filepath.Join(dir, file)) {
		if l == ev {
			n++
		}
	}
	return n
}

// identities returns the SetIdentity requests a VM's fake guest got.
func identities(t *testing.T, dir string) []fcfake.IdentityRequest {
	t.Helper()
	var out []fcfake.IdentityRequest
	for _, l := range readLines(t, filepath.Join(dir, fcfake.IdentityLogFile)) {
		var r fcfake.IdentityRequest
		require.NoError(t, json.Unmarshal([]byte(l), &r))
		out = append(out, r)
	}
	return out
}

// requireRecent checks that a guest clock step was to the host's time.
func requireRecent(t *testing.T, unixNano int64) {
	t.Helper()
	require.WithinDuration(t, time.Now(), time.Unix(0, unixNano), 10*time.Second, "the guest clock is stepped to the host's time")
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	fi, err := os.Stat(path)
	require.NoError(t, err)
	return fi.Sys().(*syscall.Stat_t).Ino
}

// TestSuspendResume: Suspend writes a full snapshot into the VM's own
// directory and ends its VMM; the VM is suspended, also for a restarted
// orchestrator; Resume restores it in a new process from exactly those
// files, redials the agent and removes them.
func TestSuspendResume(t *testing.T) {
	t.Parallel()
	cfg := fakeConfig(t)
	o := newOrchestrator(t, cfg)
	require.True(t, o.Capabilities().Suspend)
	ctx := t.Context()
	id := vmmtest.StartVM(t, o, vmmtest.NewSpec(t))
	run := filepath.Join(cfg.SocketDir, id)
	require.Equal(t, "before\n", sh(t, o, id, "echo before"))
	pid := o.PID(id)

	for range 2 {
		require.NoError(t, o.Suspend(ctx, id), "suspending a suspended VM is a no-op")
	}
	vmmtest.RequireState(t, o, id, types.VMSuspended)
	require.Zero(t, o.PID(id), "the VMM ended")
	require.Error(t, syscall.Kill(pid, 0), "the old VMM process is gone")
	require.FileExists(t, filepath.Join(run, "suspend.state"))
	require.FileExists(t, filepath.Join(run, "suspend.mem"))
	_, err := o.ExecuteCommand(ctx, id, types.Command{Cmd: "true"}, vmm.ExecIO{})
	require.ErrorIs(t, err, types.ErrConflict)
	require.ErrorContains(t, err, "suspended; resume it")
	require.ErrorIs(t, o.Pause(ctx, id), types.ErrConflict, "a suspended VM cannot be paused")
	_, err = o.Snapshot(ctx, id, t.TempDir())
	require.ErrorIs(t, err, types.ErrConflict)

	// A restarted orchestrator still knows it is suspended.
	o2 := newOrchestrator(t, cfg)
	vmmtest.RequireState(t, o2, id, types.VMSuspended)
	list, err := o2.ListVMs(ctx)
	require.NoError(t, err)
	require.Len(t, list, 1)
	require.Equal(t, types.VMSuspended, list[0].State)

	require.NoError(t, o2.Resume(ctx, id))
	vmmtest.RequireState(t, o2, id, types.VMRunning)
	require.Equal(t, "after\n", sh(t, o2, id, "echo after"))
	require.NoError(t, o2.Resume(ctx, id), "resuming a running VM is a no-op")
	ids := identities(t, run)
	require.Len(t, ids, 2, "the boot's seed, then one clock step after the restore")
	requireRecent(t, ids[0].UnixNano)
	require.Equal(t, fcfake.IdentityRequest{EntropyBytes: 64, UnixNano: ids[0].UnixNano}, ids[0],
		"a booted VM gets the host's entropy and time (SeedBoot), nothing else")
	requireRecent(t, ids[1].UnixNano)
	require.Equal(t, fcfake.IdentityRequest{UnixNano: ids[1].UnixNano}, ids[1], "a resumed VM keeps its identity: only its clock is stepped")
	require.NoFileExists(t, filepath.Join(run, "suspend.state"), "the saved state goes once restored")
	require.NoFileExists(t, filepath.Join(run, "suspend.mem"))

	reqs := requests(t, run)
	requireAllAccepted(t, reqs)
	create := find(t, reqs, "PUT", "/snapshot/create")
	require.Equal(t, "Full", create["snapshot_type"])
	load := find(t, reqs, "PUT", "/snapshot/load")
	require.Equal(t, strings.TrimSuffix(create["snapshot_path"].(string), ".part"), load["snapshot_path"], "the load names the state file the suspend wrote")
	require.Equal(t, map[string]any{"backend_type": "File", "backend_path": strings.TrimSuffix(create["mem_file_path"].(string), ".part")}, load["mem_backend"])
	require.Equal(t, true, load["resume_vm"])
	require.Equal(t, map[string]any{"uds_path": filepath.Join(run, "vsock.sock")}, load["vsock_override"])

	// Suspended again, then deleted: nothing is left.
	require.NoError(t, o2.Suspend(ctx, id))
	require.NoError(t, o2.DeleteVM(ctx, id))
	require.NoDirExists(t, run)
	_, err = o2.GetVMStatus(ctx, id)
	require.ErrorIs(t, err, types.ErrNotFound)
}

// TestStopSuspended: stopping a suspended VM discards its saved state; a
// start then boots it.
func TestStopSuspended(t *testing.T) {
	t.Parallel()
	cfg := fakeConfig(t)
	o := newOrchestrator(t, cfg)
	ctx := t.Context()
	id := vmmtest.StartVM(t, o, vmmtest.NewSpec(t))
	run := filepath.Join(cfg.SocketDir, id)
	require.NoError(t, o.Suspend(ctx, id))
	require.NoError(t, o.StopVM(ctx, id, false))
	vmmtest.RequireState(t, o, id, types.VMStopped)
	require.NoFileExists(t, filepath.Join(run, "suspend.mem"))
	require.NoError(t, o.StartVM(ctx, id))
	require.Equal(t, "booted\n", sh(t, o, id, "echo booted"))
}

// TestSnapshotAndClone: a snapshot of a running VM leaves it running (its
// agent redialled after the vsock reset) and fills the directory; a clone
// gets its own rootfs copy and links to the snapshot's state and memory,
// and is restored from them with strictly valid requests.
func TestSnapshotAndClone(t *testing.T) {
	t.Parallel()
	for _, jailed := range []bool{false, true} {
		t.Run(map[bool]string{false: "direct", true: "jailed"}[jailed], func(t *testing.T) {
			t.Parallel()
			cfg := fakeConfig(t)
			if jailed {
				cfg = jailedConfig(t)
			}
			testSnapshotAndClone(t, cfg, jailed)
		})
	}
}

func testSnapshotAndClone(t *testing.T, cfg firecracker.Config, jailed bool) {
	o := newOrchestrator(t, cfg)
	ctx := t.Context()
	src := vmmtest.NewSpec(t)
	src.VCPUs, src.MemoryMB = 2, 256
	id := vmmtest.StartVM(t, o, src)
	root := filepath.Join(cfg.SocketDir, id)
	if jailed {
		root = filepath.Join(cfg.Jailer.ChrootBaseDir, "firecracker", id, "root")
	}
	require.Equal(t, "x\n", sh(t, o, id, "echo x"))
	connects := countEvents(t, root, fcfake.VsockLogFile, "connect")

	dir := t.TempDir()
	snap, err := o.Snapshot(ctx, id, dir)
	require.NoError(t, err)
	require.Equal(t, dir, snap.Dir)
	require.Equal(t, firecracker.Provider, snap.Provider)
	require.Equal(t, id, snap.Spec.ID)
	require.Equal(t, 2, snap.Spec.VCPUs)
	require.Equal(t, 256, snap.Spec.MemoryMB)
	require.Positive(t, snap.SizeBytes)
	for _, f := range []string{"vm.state", "vm.mem", "rootfs.ext4", "snapshot.json"} {
		fi, err := os.Stat(filepath.Join(dir, f))
		require.NoError(t, err)
		require.Equal(t, os.FileMode(0o444), fi.Mode().Perm(), "%s is read-only", f)
		require.Equal(t, uint32(os.Getuid()), fi.Sys().(*syscall.Stat_t).Uid, "%s belongs to the orchestrator, not the VM's uid", f)
	}
	require.NotEqual(t, inode(t, filepath.Join(root, "rootfs.ext4")), inode(t, filepath.Join(dir, "rootfs.ext4")), "the snapshot's disk is a frozen copy, not the VM's file")

	// The VM was left running; the snapshot reset its vsock and the agent
	// is reached on a new connection.
	vmmtest.RequireState(t, o, id, types.VMRunning)
	require.Equal(t, 1, countEvents(t, root, fcfake.EventLogFile, "vsock-reset"))
	require.Equal(t, "still\n", sh(t, o, id, "echo still"))
	require.Greater(t, countEvents(t, root, fcfake.VsockLogFile, "connect"), connects, "the agent was redialled")
	src2 := find(t, requests(t, root), "PATCH", "/vm")
	require.Equal(t, "Resumed", src2["state"], "the running VM was resumed after the snapshot")

	// A paused VM stays paused.
	require.NoError(t, o.Pause(ctx, id))
	_, err = o.Snapshot(ctx, id, t.TempDir())
	require.NoError(t, err)
	vmmtest.RequireState(t, o, id, types.VMPaused)
	require.NoError(t, o.Resume(ctx, id))

	// Two clones of the snapshot, each with its own files.
	var clones []string
	names := map[string]string{}
	for range 2 {
		sp := vmmtest.NewSpec(t)
		names[sp.ID] = sp.Name
		sp.FromSnapshot = dir
		t.Cleanup(func() { o.DeleteVM(bg(t), sp.ID) })
		st, err := o.CreateVM(ctx, sp)
		require.NoError(t, err)
		require.Equal(t, types.VMStopped, st.State, "a clone is created, not restored")
		clones = append(clones, sp.ID)
	}
	if jailed {
		// Without the jailer, the clone's load re-opens the source's
		// drive path (see restore); in a jail it is the clone's own.
		require.NoError(t, o.DeleteVM(ctx, id), "clones do not need the source VM")
	}
	var machineIDs []string
	for _, cid := range clones {
		croot := filepath.Join(cfg.SocketDir, cid)
		if jailed {
			croot = filepath.Join(cfg.Jailer.ChrootBaseDir, "firecracker", cid, "root")
		}
		require.NotEqual(t, inode(t, filepath.Join(dir, "rootfs.ext4")), inode(t, filepath.Join(croot, "rootfs.ext4")), "the clone's disk is its own copy")
		require.Equal(t, inode(t, filepath.Join(dir, "vm.mem")), inode(t, filepath.Join(croot, "clone.mem")), "the memory file is hard-linked, not copied")

		require.NoError(t, o.StartVM(ctx, cid))
		vmmtest.RequireState(t, o, cid, types.VMRunning)
		require.Equal(t, "clone\n", sh(t, o, cid, "echo clone"))
		ids := identities(t, croot)
		require.Len(t, ids, 1, "the clone was re-identified once")
		require.Equal(t, bootparams.SanitizeHostname(names[cid]), ids[0].Hostname)
		require.Regexp(t, "^[0-9a-f]{32}$", ids[0].MachineID)
		require.NotContains(t, machineIDs, ids[0].MachineID, "each clone gets its own machine id")
		machineIDs = append(machineIDs, ids[0].MachineID)
		require.Equal(t, 64, ids[0].EntropyBytes)
		requireRecent(t, ids[0].UnixNano)

		reqs := requests(t, croot)
		requireAllAccepted(t, reqs)
		require.False(t, slices.ContainsFunc(reqs, func(r fcfake.Request) bool { return r.Path == "/actions" || r.Path == "/boot-source" }),
			"a clone is restored, never booted")
		load := find(t, reqs, "PUT", "/snapshot/load")
		vmPath := func(name string) string {
			if jailed {
				return "/" + name
			}
			return filepath.Join(croot, name)
		}
		require.Equal(t, vmPath("clone.state"), load["snapshot_path"])
		require.Equal(t, map[string]any{"backend_type": "File", "backend_path": vmPath("clone.mem")}, load["mem_backend"])
		require.Equal(t, map[string]any{"uds_path": vmPath("vsock.sock")}, load["vsock_override"])
		if jailed {
			require.Equal(t, true, load["resume_vm"], "in its jail the clone's drive paths are already its own")
		} else {
			require.Nil(t, load["resume_vm"], "loaded paused, to move its drive first")
			require.Equal(t, map[string]any{"drive_id": "rootfs", "path_on_host": vmPath("rootfs.ext4")}, find(t, reqs, "PATCH", "/drives/rootfs"))
			require.Equal(t, map[string]any{"state": "Resumed"}, find(t, reqs, "PATCH", "/vm"))
		}
		// A clone stopped and started again boots its own disk.
		require.NoError(t, o.StopVM(ctx, cid, true))
		require.NoError(t, o.StartVM(ctx, cid))
		require.Equal(t, "rootfs", find(t, requests(t, croot), "PUT", "/drives/rootfs")["drive_id"])
		require.NoError(t, o.DeleteVM(ctx, cid))
		require.NoDirExists(t, filepath.Join(cfg.SocketDir, cid))
		if jailed {
			require.NoDirExists(t, filepath.Dir(croot), "the clone's jail goes")
		}
	}
	for _, f := range []string{"vm.state", "vm.mem", "rootfs.ext4", "snapshot.json"} {
		require.FileExists(t, filepath.Join(dir, f), "deleting clones leaves the snapshot (the caller's) alone")
	}
	if !jailed {
		// Without the jailer, a clone's load re-opens the source VM's
		// drive: once the source is gone, the start says so.
		sp := vmmtest.NewSpec(t)
		sp.FromSnapshot = dir
		t.Cleanup(func() { o.DeleteVM(bg(t), sp.ID) })
		_, err := o.CreateVM(ctx, sp)
		require.NoError(t, err)
		require.NoError(t, o.DeleteVM(ctx, id))
		err = o.StartVM(ctx, sp.ID)
		require.ErrorIs(t, err, types.ErrConflict)
		require.ErrorContains(t, err, "enable vmm.firecracker.jailer, or keep the source vm")
		vmmtest.RequireState(t, o, sp.ID, types.VMStopped)
	}
	var meta map[string]any
	readJSON(t, filepath.Join(dir, "snapshot.json"), &meta)
	require.Equal(t, "firecracker", meta["provider"])
	require.Equal(t, id, meta["source"])
}

// TestSnapshotBadInput: the contract's answers to wrong states and
// directories.
func TestSnapshotBadInput(t *testing.T) {
	t.Parallel()
	cfg := fakeConfig(t)
	o := newOrchestrator(t, cfg)
	ctx := t.Context()

	unknown := vmmtest.NewSpec(t).ID
	require.ErrorIs(t, o.Pause(ctx, unknown), types.ErrNotFound)
	require.ErrorIs(t, o.Resume(ctx, unknown), types.ErrNotFound)
	require.ErrorIs(t, o.Suspend(ctx, unknown), types.ErrNotFound)
	_, err := o.Snapshot(ctx, unknown, t.TempDir())
	require.ErrorIs(t, err, types.ErrNotFound)

	sp := vmmtest.NewSpec(t)
	t.Cleanup(func() { o.DeleteVM(bg(t), sp.ID) })
	_, err = o.CreateVM(ctx, sp)
	require.NoError(t, err)
	for name, err := range map[string]error{
		"pause":   o.Pause(ctx, sp.ID),
		"resume":  o.Resume(ctx, sp.ID),
		"suspend": o.Suspend(ctx, sp.ID),
	} {
		require.ErrorIs(t, err, types.ErrConflict, name)
		require.ErrorContains(t, err, "stopped; start it first", name)
	}
	_, err = o.Snapshot(ctx, sp.ID, t.TempDir())
	require.ErrorIs(t, err, types.ErrConflict)

	require.NoError(t, o.StartVM(ctx, sp.ID))
	require.NoError(t, o.Resume(ctx, sp.ID), "resuming a running VM is a no-op")
	full := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(full, "x"), nil, 0o600))
	for _, dir := range []string{"relative/dir", full, filepath.Join(t.TempDir(), "missing")} {
		_, err = o.Snapshot(ctx, sp.ID, dir)
		require.ErrorIs(t, err, types.ErrInvalid, dir)
	}
	vmmtest.RequireState(t, o, sp.ID, types.VMRunning)

	// Starting from something that is not a firecracker snapshot.
	clone := vmmtest.NewSpec(t)
	clone.FromSnapshot = t.TempDir()
	_, err = o.CreateVM(ctx, clone)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "no firecracker snapshot")
	foreign := t.TempDir()
	b, _ := json.Marshal(map[string]any{"provider": "docker", "format": 1})
	require.NoError(t, os.WriteFile(filepath.Join(foreign, "snapshot.json"), b, 0o600))
	clone.FromSnapshot = foreign
	_, err = o.CreateVM(ctx, clone)
	require.ErrorIs(t, err, types.ErrInvalid)
	// A snapshot without a network cannot start a nat clone.
	dir := t.TempDir()
	_, err = o.Snapshot(ctx, sp.ID, dir)
	require.NoError(t, err)
	clone.FromSnapshot, clone.Network = dir, types.NetworkNAT
	_, err = o.CreateVM(ctx, clone)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "without a network")
	_, err = o.GetVMStatus(ctx, clone.ID)
	require.ErrorIs(t, err, types.ErrNotFound, "a refused clone leaves nothing")
	// A jailed backend cannot restore a snapshot taken without the jailer.
	jo := newOrchestrator(t, jailedConfig(t))
	clone.Network = types.NetworkNone
	_, err = jo.CreateVM(ctx, clone)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "jailer off")
}

// TestSnapshotOpsFigures records, for each operation against the process
// fake, how many API calls it made and how long it took (issue 12 asks
// for these figures; the fake is no Firecracker, so they say nothing
// about speed). Run it with -v to read them.
func TestSnapshotOpsFigures(t *testing.T) {
	t.Parallel()
	cfg := fakeConfig(t)
	o := newOrchestrator(t, cfg)
	ctx := t.Context()
	id := vmmtest.StartVM(t, o, vmmtest.NewSpec(t))
	run := filepath.Join(cfg.SocketDir, id)
	dir := t.TempDir()
	cloneSpec := vmmtest.NewSpec(t)
	cloneSpec.FromSnapshot = dir
	t.Cleanup(func() { o.DeleteVM(bg(t), cloneSpec.ID) })
	crun := filepath.Join(cfg.SocketDir, cloneSpec.ID)

	type op struct {
		name  string
		where string
		do    func() error
	}
	ops := []op{
		{"pause", run, func() error { return o.Pause(ctx, id) }},
		{"resume (paused)", run, func() error { return o.Resume(ctx, id) }},
		{"suspend", run, func() error { return o.Suspend(ctx, id) }},
		{"resume (suspended)", run, func() error { return o.Resume(ctx, id) }},
		{"snapshot", run, func() error { _, err := o.Snapshot(ctx, id, dir); return err }},
		{"clone create", crun, func() error { _, err := o.CreateVM(ctx, cloneSpec); return err }},
		{"clone start", crun, func() error { return o.StartVM(ctx, cloneSpec.ID) }},
	}
	t.Logf("%-20s %9s %12s  %s", "operation", "api calls", "wall time", "calls")
	for _, op := range ops {
		before := len(requests(t, op.where))
		start := time.Now()
		require.NoError(t, op.do(), op.name)
		took := time.Since(start)
		reqs := requests(t, op.where)[before:]
		requireAllAccepted(t, reqs)
		var calls []string
		for _, r := range reqs {
			if r.Method != "GET" {
				calls = append(calls, r.Method+" "+r.Path)
			}
		}
		t.Logf("%-20s %9d %12s  %d GET polls + %s", op.name, len(reqs), took.Round(10*time.Microsecond), len(reqs)-len(calls), strings.Join(calls, ", "))
	}
}
