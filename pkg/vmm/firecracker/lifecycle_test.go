package firecracker_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/firecracker"
	"github.com/aetherium/aetherium-core/pkg/vmm/firecracker/fcfake"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

// TestLifecycle drives one VM through create, start, exec, stop, restart
// and delete against the fake Firecracker process, and checks what the
// backend sent: every request passed the spec (the fake answered 2xx).
func TestLifecycle(t *testing.T) {
	t.Parallel()
	cfg := fakeConfig(t)
	o := newOrchestrator(t, cfg)
	ctx := t.Context()
	sp := vmmtest.NewSpec(t)
	sp.VCPUs, sp.MemoryMB = 2, 256
	sp.Labels = map[string]string{"team": "core"}
	sp.Env = map[string]string{"VM_ENV": "from-spec", "SHADOWED": "vm"}
	run := filepath.Join(cfg.SocketDir, sp.ID)

	for range 2 {
		st, err := o.CreateVM(ctx, sp)
		require.NoError(t, err)
		require.Equal(t, types.VMStopped, st.State)
		require.Equal(t, sp.Labels, st.Labels)
	}
	fi, err := os.Stat(filepath.Join(run, "rootfs.ext4"))
	require.NoError(t, err, "each VM gets its own rootfs copy")
	require.Equal(t, int64(64<<20), fi.Size())

	for range 2 {
		require.NoError(t, o.StartVM(ctx, sp.ID))
		vmmtest.RequireState(t, o, sp.ID, types.VMRunning)
	}
	res, err := o.ExecuteCommand(ctx, sp.ID, types.Command{Cmd: "sh", Args: []string{"-c", `echo "$VM_ENV|$SHADOWED|$OWN"; echo err >&2; exit 3`},
		Env: map[string]string{"SHADOWED": "command", "OWN": "x"}}, vmm.ExecIO{})
	require.NoError(t, err)
	require.Equal(t, "from-spec|command|x\n", string(res.Stdout), "the VM's env lies beneath the command's")
	require.Equal(t, "err\n", string(res.Stderr))
	require.Equal(t, 3, res.ExitCode)

	reqs := requests(t, run)
	var order []string
	for _, r := range reqs {
		require.Less(t, r.Status, 300, "%s %s was refused: %s", r.Method, r.Path, r.Fault)
		if r.Method != "GET" {
			order = append(order, r.Method+" "+r.Path)
		}
	}
	require.Equal(t, []string{"PUT /logger", "PUT /metrics", "PUT /machine-config", "PUT /boot-source", "PUT /drives/rootfs", "PUT /vsock", "PUT /actions"}, order)
	mc := find(t, reqs, "PUT", "/machine-config")
	require.Equal(t, 2.0, mc["vcpu_count"])
	require.Equal(t, 256.0, mc["mem_size_mib"])
	bs := find(t, reqs, "PUT", "/boot-source")
	require.Equal(t, cfg.KernelPath, bs["kernel_image_path"])
	require.Equal(t, cfg.InitrdPath, bs["initrd_path"])
	require.Equal(t, "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw aetherium.hostname="+sp.Name, bs["boot_args"])
	drive := find(t, reqs, "PUT", "/drives/rootfs")
	require.Equal(t, filepath.Join(run, "rootfs.ext4"), drive["path_on_host"])
	require.Equal(t, true, drive["is_root_device"])
	require.Equal(t, false, drive["is_read_only"])
	vs := find(t, reqs, "PUT", "/vsock")
	require.Equal(t, filepath.Join(run, "vsock.sock"), vs["uds_path"])
	require.Equal(t, 3.0, vs["guest_cid"])
	require.Equal(t, "InstanceStart", find(t, reqs, "PUT", "/actions")["action_type"])
	require.Equal(t, filepath.Join(run, "firecracker.log"), find(t, reqs, "PUT", "/logger")["log_path"])

	// Graceful stop: the agent's poweroff ends the VMM; no Ctrl-Alt-Del.
	for range 2 {
		require.NoError(t, o.StopVM(ctx, sp.ID, false))
		vmmtest.RequireState(t, o, sp.ID, types.VMStopped)
	}
	require.Equal(t, []string{"agent-shutdown reboot=true", "exit"}, readLines(t, filepath.Join(run, fcfake.EventLogFile)))
	_, err = o.ExecuteCommand(ctx, sp.ID, types.Command{Cmd: "true"}, vmm.ExecIO{})
	require.ErrorIs(t, err, types.ErrConflict)
	require.NoFileExists(t, filepath.Join(run, "api.sock"))

	// A stopped VM boots again in a new process, with the same disk.
	require.NoError(t, o.StartVM(ctx, sp.ID))
	require.Equal(t, "again\n", sh(t, o, sp.ID, "echo again"))
	for range 2 {
		require.NoError(t, o.StopVM(ctx, sp.ID, true))
		vmmtest.RequireState(t, o, sp.ID, types.VMStopped)
	}

	list, err := o.ListVMs(ctx)
	require.NoError(t, err)
	require.Len(t, list, 1)
	for range 2 {
		require.NoError(t, o.DeleteVM(ctx, sp.ID))
	}
	_, err = o.GetVMStatus(ctx, sp.ID)
	require.ErrorIs(t, err, types.ErrNotFound)
	require.NoDirExists(t, run)
}

// TestStopEscalates: when the guest ignores the agent's poweroff the
// backend sends Ctrl-Alt-Del, and when that is ignored too it kills.
func TestStopEscalates(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		behavior fcfake.Behavior
		events   []string
	}{
		{"ctrl-alt-del", fcfake.Behavior{IgnoreShutdown: true}, []string{"agent-shutdown reboot=true", "ctrl-alt-del", "exit"}},
		{"kill", fcfake.Behavior{IgnoreShutdown: true, IgnoreCtrlAltDel: true}, []string{"agent-shutdown reboot=true", "ctrl-alt-del"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := fakeConfig(t)
			o := newOrchestrator(t, cfg)
			sp := vmmtest.NewSpec(t)
			t.Cleanup(func() { o.DeleteVM(bg(t), sp.ID) })
			_, err := o.CreateVM(t.Context(), sp)
			require.NoError(t, err)
			run := filepath.Join(cfg.SocketDir, sp.ID)
			writeBehavior(t, run, tc.behavior)
			require.NoError(t, o.StartVM(t.Context(), sp.ID))
			pid := readPid(t, run)

			start := time.Now()
			require.NoError(t, o.StopVM(t.Context(), sp.ID, false))
			require.Less(t, time.Since(start), 10*time.Second)
			vmmtest.RequireState(t, o, sp.ID, types.VMStopped)
			require.Equal(t, tc.events, readLines(t, filepath.Join(run, fcfake.EventLogFile)))
			require.NoDirExists(t, filepath.Join("/proc", pid), "the VMM must be gone")
		})
	}
}

func readPid(t testing.TB, run string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(run, "firecracker.pid"))
	require.NoError(t, err)
	return strings.TrimSpace(string(b))
}

// TestStartSurfacesFault: a 400 from Firecracker reaches the caller with
// its fault_message, the step that failed and the kind ErrInvalid, and no
// VMM is left running.
func TestStartSurfacesFault(t *testing.T) {
	t.Parallel()
	t.Run("fault from the VMM", func(t *testing.T) {
		t.Parallel()
		cfg := fakeConfig(t)
		o := newOrchestrator(t, cfg)
		sp := vmmtest.NewSpec(t)
		t.Cleanup(func() { o.DeleteVM(bg(t), sp.ID) })
		_, err := o.CreateVM(t.Context(), sp)
		require.NoError(t, err)
		run := filepath.Join(cfg.SocketDir, sp.ID)
		const msg = "Unable to create the block device: BackingFile(Os { code: 13, kind: PermissionDenied })"
		writeBehavior(t, run, fcfake.Behavior{Fail: map[string]string{"PUT /drives/rootfs": msg}})
		err = o.StartVM(t.Context(), sp.ID)
		require.ErrorIs(t, err, types.ErrInvalid)
		require.Contains(t, err.Error(), msg)
		require.Contains(t, err.Error(), "attaching the rootfs")
		require.Contains(t, err.Error(), "PUT /drives/rootfs: 400")
		vmmtest.RequireState(t, o, sp.ID, types.VMStopped)
		require.NoFileExists(t, filepath.Join(run, "firecracker.pid"))
	})
	t.Run("rejected by the spec", func(t *testing.T) {
		t.Parallel()
		// Firecracker allows at most 32 vCPUs; a deployment that allows
		// more gets the spec's verdict through our error.
		cfg := fakeConfig(t)
		cfg.MaxVCPUs = 64
		o := newOrchestrator(t, cfg)
		sp := vmmtest.NewSpec(t)
		sp.VCPUs = 33
		t.Cleanup(func() { o.DeleteVM(bg(t), sp.ID) })
		_, err := o.CreateVM(t.Context(), sp)
		require.NoError(t, err)
		err = o.StartVM(t.Context(), sp.ID)
		require.ErrorIs(t, err, types.ErrInvalid)
		require.Contains(t, err.Error(), "setting the machine config")
		require.Contains(t, err.Error(), `"/vcpu_count": number must be at most 32`)
	})
	t.Run("binary missing", func(t *testing.T) {
		t.Parallel()
		cfg := fakeConfig(t)
		cfg.Binary = "/nonexistent/firecracker"
		o := newOrchestrator(t, cfg)
		sp := vmmtest.NewSpec(t)
		t.Cleanup(func() { o.DeleteVM(bg(t), sp.ID) })
		_, err := o.CreateVM(t.Context(), sp)
		require.NoError(t, err)
		err = o.StartVM(t.Context(), sp.ID)
		require.ErrorIs(t, err, types.ErrUnavailable)
		require.Contains(t, err.Error(), "vmm.firecracker.binary")
	})
}

// TestUnknownAndInvalid: the contract's answers for ids that do not exist
// and specs that cannot be created.
func TestUnknownAndInvalid(t *testing.T) {
	t.Parallel()
	cfg := fakeConfig(t)
	o := newOrchestrator(t, cfg)
	ctx := t.Context()
	id := vmmtest.NewSpec(t).ID
	_, err := o.GetVMStatus(ctx, id)
	require.ErrorIs(t, err, types.ErrNotFound)
	require.ErrorIs(t, o.StartVM(ctx, id), types.ErrNotFound)
	require.ErrorIs(t, o.StopVM(ctx, id, false), types.ErrNotFound)
	require.ErrorIs(t, o.Pause(ctx, id), types.ErrNotFound)
	_, err = o.ExecuteCommand(ctx, id, types.Command{Cmd: "true"}, vmm.ExecIO{})
	require.ErrorIs(t, err, types.ErrNotFound)
	require.NoError(t, o.DeleteVM(ctx, id))

	for _, sp := range []types.VMSpec{
		{ID: "bad_id", Name: "x", VCPUs: 1, MemoryMB: 128},
		{ID: "ok-id", Name: "x", VCPUs: 0, MemoryMB: 128},
		{ID: "ok-id", Name: "Bad", VCPUs: 1, MemoryMB: 128},
	} {
		_, err := o.CreateVM(ctx, sp)
		require.ErrorIs(t, err, types.ErrInvalid)
	}
	entries, err := os.ReadDir(cfg.SocketDir)
	require.NoError(t, err)
	require.Empty(t, entries, "invalid specs must leave nothing behind")
}

// TestPauseResume: pause and resume through PATCH /vm, each idempotent;
// StartVM of a paused VM resumes it.
func TestPauseResume(t *testing.T) {
	t.Parallel()
	cfg := fakeConfig(t)
	o := newOrchestrator(t, cfg)
	require.True(t, o.Capabilities().PauseResume)
	ctx := t.Context()
	sp := vmmtest.NewSpec(t)
	id := vmmtest.StartVM(t, o, sp)
	run := filepath.Join(cfg.SocketDir, id)

	for range 2 {
		require.NoError(t, o.Pause(ctx, id))
	}
	vmmtest.RequireState(t, o, id, types.VMPaused)
	_, err := o.ExecuteCommand(ctx, id, types.Command{Cmd: "true"}, vmm.ExecIO{})
	require.ErrorIs(t, err, types.ErrConflict)
	require.ErrorContains(t, err, "paused; resume it")
	for range 2 {
		require.NoError(t, o.Resume(ctx, id))
	}
	require.Equal(t, "resumed\n", sh(t, o, id, "echo resumed"))

	require.NoError(t, o.Pause(ctx, id))
	require.NoError(t, o.StartVM(ctx, id))
	vmmtest.RequireState(t, o, id, types.VMRunning)

	reqs := requests(t, run)
	for _, r := range reqs {
		require.Less(t, r.Status, 300, "%s %s was refused: %s", r.Method, r.Path, r.Fault)
	}
	require.Equal(t, map[string]any{"state": "Resumed"}, find(t, reqs, "PATCH", "/vm"))
}

// TestWorkerRestart: a new orchestrator on the same directories finds the
// running VM again, runs commands in it and stops it, although the VMM is
// not its child.
func TestWorkerRestart(t *testing.T) {
	t.Parallel()
	cfg := fakeConfig(t)
	first, err := firecracker.New(context.Background(), cfg)
	require.NoError(t, err)
	sp := vmmtest.NewSpec(t)
	id := vmmtest.StartVM(t, first, sp)
	require.NoError(t, first.Close())

	second := newOrchestrator(t, cfg)
	vmmtest.RequireState(t, second, id, types.VMRunning)
	list, err := second.ListVMs(t.Context())
	require.NoError(t, err)
	require.Len(t, list, 1)
	require.Equal(t, "still here\n", sh(t, second, id, "echo still here"))
	require.NoError(t, second.StopVM(t.Context(), id, false))
	vmmtest.RequireState(t, second, id, types.VMStopped)

	other := cfg
	other.Owner = "another-worker"
	list, err = newOrchestrator(t, other).ListVMs(t.Context())
	require.NoError(t, err)
	require.Empty(t, list, "ListVMs shows only the owner's VMs")
}

// TestJailer: the jailer is on by default; the backend builds the jail,
// leases each VM its own uid/gid from the shared range, hands the jailer
// the arguments docs/jailer.md describes and sends the VMM paths as seen
// inside its chroot. Deleting a VM frees its uid.
func TestJailer(t *testing.T) {
	t.Parallel()
	cfg := jailedConfig(t)
	cfg.Jailer.NetNS = "/proc/self/ns/net"
	base := cfg.Jailer.ChrootBaseDir
	o := newOrchestrator(t, cfg)
	ctx := t.Context()
	sp := vmmtest.NewSpec(t)
	id := vmmtest.StartVM(t, o, sp)
	jail := filepath.Join(base, "firecracker", id)
	root := filepath.Join(jail, "root")

	var args fcfake.JailerArgs
	readJSON(t, filepath.Join(jail, fcfake.JailerArgsFile), &args)
	require.Equal(t, fcfake.JailerArgs{
		ID: id, ExecFile: cfg.Binary, UID: 910000, GID: 910000, ChrootBaseDir: base,
		CgroupVersion: "2", NetNS: "/proc/self/ns/net", Extra: []string{"--api-sock", "/api.sock"},
		// 1 vCPU and 128 MiB plus the jail package's overheads (see
		// TestJailerCgroupLimits).
		Cgroups: []string{"cpu.max=125000 100000", "memory.max=536870912", "pids.max=512"},
	}, args, "the first VM gets the first uid of the range")
	fi, err := os.Stat(filepath.Join(root, "rootfs.ext4"))
	require.NoError(t, err)
	require.Equal(t, uint32(910000), fi.Sys().(*syscall.Stat_t).Uid, "the VM's disk belongs to its uid")
	require.FileExists(t, filepath.Join(cfg.Jailer.StateDir, "uids", "910000"), "the lease")
	st, err := o.GetVMStatus(ctx, id)
	require.NoError(t, err)
	require.Equal(t, &vmm.JailInfo{UID: 910000, GID: 910000, Cgroup: "/firecracker/" + id}, st.Jail, "the status says how the VMM is confined")

	reqs := requests(t, root)
	for _, r := range reqs {
		require.Less(t, r.Status, 300, "%s %s was refused: %s", r.Method, r.Path, r.Fault)
	}
	bs := find(t, reqs, "PUT", "/boot-source")
	require.Equal(t, "/vmlinux", bs["kernel_image_path"])
	require.Equal(t, "/initrd.img", bs["initrd_path"])
	require.Equal(t, "/rootfs.ext4", find(t, reqs, "PUT", "/drives/rootfs")["path_on_host"])
	require.Equal(t, "/vsock.sock", find(t, reqs, "PUT", "/vsock")["uds_path"])
	require.Equal(t, "/firecracker.log", find(t, reqs, "PUT", "/logger")["log_path"])
	require.FileExists(t, filepath.Join(root, "rootfs.ext4"))

	// A second VM never shares the first one's uid.
	sp2 := vmmtest.NewSpec(t)
	id2 := vmmtest.StartVM(t, o, sp2)
	var args2 fcfake.JailerArgs
	readJSON(t, filepath.Join(base, "firecracker", id2, fcfake.JailerArgsFile), &args2)
	require.Equal(t, 910001, args2.UID)
	require.Equal(t, 910001, args2.GID)

	require.Equal(t, "jailed\n", sh(t, o, id, "echo jailed"))
	require.NoError(t, o.StopVM(ctx, id, false))
	// A restarted worker boots the VM again as the uid its record names.
	o = newOrchestrator(t, cfg)
	require.NoError(t, o.StartVM(ctx, id), "a jailed VM starts again in the same jail")
	readJSON(t, filepath.Join(jail, fcfake.JailerArgsFile), &args)
	require.Equal(t, 910000, args.UID, "the same uid after a restart")
	require.NoError(t, o.DeleteVM(ctx, id))
	require.NoDirExists(t, jail)
	require.NoDirExists(t, filepath.Join(cfg.SocketDir, id))
	require.NoFileExists(t, filepath.Join(cfg.Jailer.StateDir, "uids", "910000"), "delete frees the uid")
	require.NoError(t, o.DeleteVM(ctx, id2))
	require.NoFileExists(t, filepath.Join(cfg.Jailer.StateDir, "uids", "910001"))
}

// TestJailerFixedUID: a configured uid/gid is used for every VM and no
// lease is taken.
func TestJailerFixedUID(t *testing.T) {
	t.Parallel()
	cfg := jailedConfig(t)
	cfg.Jailer.UID, cfg.Jailer.GID = 12345, 23456
	o := newOrchestrator(t, cfg)
	id := vmmtest.StartVM(t, o, vmmtest.NewSpec(t))
	var args fcfake.JailerArgs
	readJSON(t, filepath.Join(cfg.Jailer.ChrootBaseDir, "firecracker", id, fcfake.JailerArgsFile), &args)
	require.Equal(t, 12345, args.UID)
	require.Equal(t, 23456, args.GID)
	require.NoDirExists(t, filepath.Join(cfg.Jailer.StateDir, "uids"))
	require.NoError(t, o.DeleteVM(t.Context(), id))

	// Half a fixed pair would run VMMs as uid or gid 0.
	cfg.Jailer.GID = 0
	_, err := firecracker.New(t.Context(), cfg)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "set both")
}

// TestJailerRangeExhausted: with every uid of the range leased, a create
// fails with a message naming the setting to raise, and leaves nothing.
func TestJailerRangeExhausted(t *testing.T) {
	t.Parallel()
	cfg := jailedConfig(t)
	cfg.Jailer.Count = 1
	o := newOrchestrator(t, cfg)
	id := vmmtest.StartVM(t, o, vmmtest.NewSpec(t))
	sp := vmmtest.NewSpec(t)
	_, err := o.CreateVM(t.Context(), sp)
	require.ErrorIs(t, err, types.ErrUnavailable)
	require.ErrorContains(t, err, "jail.count")
	require.NoDirExists(t, filepath.Join(cfg.SocketDir, sp.ID))
	require.NoError(t, o.DeleteVM(t.Context(), id))
	_, err = o.CreateVM(t.Context(), sp)
	require.NoError(t, err, "the freed uid serves the next VM")
	require.NoError(t, o.DeleteVM(t.Context(), sp.ID))
}

// TestNetworkHook: a VM created with a TAP device gets it as eth0.
func TestNetworkHook(t *testing.T) {
	t.Parallel()
	cfg := fakeConfig(t)
	o := newOrchestrator(t, cfg)
	sp := vmmtest.NewSpec(t)
	t.Cleanup(func() { o.DeleteVM(bg(t), sp.ID) })
	_, err := o.CreateVMWithOptions(t.Context(), sp, firecracker.VMOptions{TAPDevice: "tap-test0", GuestMAC: "06:00:ac:10:00:02"})
	require.NoError(t, err)
	require.NoError(t, o.StartVM(t.Context(), sp.ID))
	reqs := requests(t, filepath.Join(cfg.SocketDir, sp.ID))
	require.Equal(t, map[string]any{"iface_id": "eth0", "host_dev_name": "tap-test0", "guest_mac": "06:00:ac:10:00:02"},
		find(t, reqs, "PUT", "/network-interfaces/eth0"))
}

// TestConcurrentStarts: several VMs boot at once, each in its own VMM.
func TestConcurrentStarts(t *testing.T) {
	t.Parallel()
	o := newOrchestrator(t, fakeConfig(t))
	ids := make([]string, 4)
	errs := make(chan error, len(ids))
	for i := range ids {
		sp := vmmtest.NewSpec(t)
		ids[i] = sp.ID
		t.Cleanup(func() { o.DeleteVM(context.WithoutCancel(t.Context()), sp.ID) })
		go func() {
			if _, err := o.CreateVM(t.Context(), sp); err != nil {
				errs <- err
				return
			}
			errs <- o.StartVM(t.Context(), sp.ID)
		}()
	}
	for range ids {
		require.NoError(t, <-errs)
	}
	for _, id := range ids {
		require.Equal(t, id+"\n", sh(t, o, id, "echo "+id))
	}
}

// TestCrash: a VMM killed from outside makes the VM failed; exec is a
// conflict, delete still works, and a start boots it again. The same check
// the conformance suite makes on a real Firecracker.
func TestCrash(t *testing.T) {
	t.Parallel()
	o := newOrchestrator(t, fakeConfig(t))
	ctx := t.Context()
	sp := vmmtest.NewSpec(t)
	id := vmmtest.StartVM(t, o, sp)
	crash(t, o, id)
	require.Eventually(t, func() bool {
		st, err := o.GetVMStatus(ctx, id)
		return err == nil && st.State == types.VMFailed
	}, 10*time.Second, 20*time.Millisecond)
	st, err := o.GetVMStatus(ctx, id)
	require.NoError(t, err)
	require.Contains(t, st.Detail, "without being stopped")
	_, err = o.ExecuteCommand(ctx, id, types.Command{Cmd: "true"}, vmm.ExecIO{})
	require.ErrorIs(t, err, types.ErrConflict)

	require.NoError(t, o.StartVM(ctx, id), "a crashed VM can be started again")
	require.Equal(t, "back\n", sh(t, o, id, "echo back"))
	crash(t, o, id)
	require.NoError(t, o.StopVM(ctx, id, false), "stopping a crashed VM")
	vmmtest.RequireState(t, o, id, types.VMStopped)
	for range 2 {
		require.NoError(t, o.DeleteVM(ctx, id))
	}
}

// TestVMLockAcrossOrchestrators: two orchestrators on one socket dir (two
// workers, or a worker and a CLI) never act on one VM at once. While the
// first holds the VM's lock, the second's StartVM waits, gives up with a
// clear error when its ctx ends, and goes ahead once the lock is free.
func TestVMLockAcrossOrchestrators(t *testing.T) {
	t.Parallel()
	cfg := fakeConfig(t)
	first := newOrchestrator(t, cfg)
	second := newOrchestrator(t, cfg)
	sp := vmmtest.NewSpec(t)
	_, err := first.CreateVM(t.Context(), sp)
	require.NoError(t, err)
	t.Cleanup(func() { second.DeleteVM(context.WithoutCancel(t.Context()), sp.ID) })

	unlock := first.LockVM(sp.ID)
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	err = second.StartVM(ctx, sp.ID)
	cancel()
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.ErrorContains(t, err, "another process on this host")
	require.NoFileExists(t, filepath.Join(cfg.SocketDir, sp.ID, "firecracker.pid"), "nothing was started while the lock was held")

	done := make(chan error, 1)
	go func() { done <- second.StartVM(t.Context(), sp.ID) }()
	select {
	case err := <-done:
		t.Fatalf("StartVM went ahead while another orchestrator held the VM: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	unlock()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("StartVM did not proceed once the lock was released")
	}
	require.Equal(t, "hi\n", sh(t, second, sp.ID, "echo hi"))
	require.NoError(t, second.DeleteVM(t.Context(), sp.ID))
	entries, err := os.ReadDir(cfg.SocketDir)
	require.NoError(t, err)
	require.Empty(t, entries, "lock files go with their holders")
}

// TestMaxMemoryConfigured: vmm.firecracker.max_memory_mb caps each VM's
// memory, is reported in Capabilities, and a negative value is refused.
func TestMaxMemoryConfigured(t *testing.T) {
	t.Parallel()
	cfg := fakeConfig(t)
	cfg.MaxMemoryMB = 256
	o := newOrchestrator(t, cfg)
	require.Equal(t, 256, o.Capabilities().MaxMemoryMB)
	sp := vmmtest.NewSpec(t)
	sp.MemoryMB = 512
	_, err := o.CreateVM(t.Context(), sp)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "at most 256 MiB per VM; ask for 256 or less, or raise vmm.firecracker.max_memory_mb")
	entries, err := os.ReadDir(cfg.SocketDir)
	require.NoError(t, err)
	require.Empty(t, entries, "a refused spec leaves nothing behind")
	sp.MemoryMB = 256
	_, err = o.CreateVM(t.Context(), sp)
	require.NoError(t, err, "the maximum itself is allowed")
	require.NoError(t, o.DeleteVM(t.Context(), sp.ID))

	cfg.MaxMemoryMB = -1
	_, err = firecracker.New(t.Context(), cfg)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "max_memory_mb")
}
