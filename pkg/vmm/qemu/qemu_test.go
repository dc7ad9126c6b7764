package qemu_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/jail"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(createChild())
	}
	testenv.Main(m)
}

// requireHost skips unless QEMU and qemu-img are installed.
func requireHost(t testing.TB) {
	t.Helper()
	for _, bin := range []string{qemu.DefaultBinary, qemu.DefaultImgBinary} {
		if _, err := exec.LookPath(bin); err != nil {
			testenv.Skip(t, "%s is not installed; run ./scripts/setup.sh", bin)
		}
	}
	if os.Geteuid() != 0 {
		testenv.Skip(t, "the qemu backend tests build a guest image, which needs root; run them as root")
	}
}

// jailConfig confines the test's VMs with the jailer built from this tree
// (a test binary has none next to it).
func jailConfig(t testing.TB) jail.Config { return jail.Config{Binary: testenv.Jailer(t)} }

// runDir returns a short, fresh directory (socket paths are limited to 107
// bytes, and t.TempDir's names can be long).
func runDir(t testing.TB) string {
	d, err := os.MkdirTemp("", "aq")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func newOrchestrator(t testing.TB, dir string) *qemu.Orchestrator {
	t.Helper()
	requireHost(t)
	img := testenv.GuestImage(t)
	o, err := qemu.New(context.Background(), qemu.Config{
		KernelPath: img.KernelPath(),
		InitrdPath: img.InitrdPath(),
		RootfsPath: img.RootfsPath(),
		RunDir:     dir,
		Jail:       jailConfig(t),
		Logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	require.NoError(t, err)
	t.Cleanup(func() { o.Close() })
	return o
}

// deleteAll removes every VM left in o, so no QEMU outlives the test.
func deleteAll(t testing.TB, o vmm.VMOrchestrator) {
	ctx := context.Background()
	vms, err := o.ListVMs(ctx)
	if err != nil {
		return
	}
	for _, v := range vms {
		o.DeleteVM(ctx, v.ID)
	}
}

func TestConformance(t *testing.T) {
	vmmtest.Run(t, vmmtest.Harness{
		New: func(t *testing.T) vmm.VMOrchestrator {
			o := newOrchestrator(t, runDir(t))
			t.Cleanup(func() { deleteAll(t, o) })
			return o
		},
		MemoryMB:  512,
		OpTimeout: 5 * time.Minute,
		Crash: func(t *testing.T, o vmm.VMOrchestrator, id string) {
			pid := qemuPid(t, o.(*qemu.Orchestrator), id)
			require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
		},
		LockVM: func(o vmm.VMOrchestrator, id string) func() { return o.(*qemu.Orchestrator).LockVM(id) },
		RecordPath: func(o vmm.VMOrchestrator, id string) string {
			return filepath.Join(o.(*qemu.Orchestrator).RunDir(id), "vm.json")
		},
		PIDFiles: func(o vmm.VMOrchestrator, id string) []string {
			dir := o.(*qemu.Orchestrator).RunDir(id)
			return []string{filepath.Join(dir, "qemu.pid")}
		},
		Restart: func(t *testing.T, o vmm.VMOrchestrator) vmm.VMOrchestrator {
			dir := filepath.Dir(o.(*qemu.Orchestrator).RunDir("x"))
			require.NoError(t, o.Close())
			n := newOrchestrator(t, dir)
			t.Cleanup(func() { deleteAll(t, n) })
			return n
		},
	})
}

func qemuPid(t testing.TB, o *qemu.Orchestrator, id string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(o.RunDir(id), "qemu.pid"))
	require.NoError(t, err)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	require.NoError(t, err)
	return pid
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

// TestVMDetails checks what only a real VM shows: the guest's own kernel,
// hostname and root disk, the serial console log, a base image that no VM
// writes to, and a delete that leaves no process or file behind.
func TestVMDetails(t *testing.T) {
	o := newOrchestrator(t, runDir(t))
	t.Cleanup(func() { deleteAll(t, o) })
	img := testenv.GuestImage(t)
	before := fileHash(t, img.RootfsPath())

	sp := vmmtest.NewSpec(t)
	sp.Name = "web-server-1"
	sp.MemoryMB = 256
	id := vmmtest.StartVM(t, o, sp)
	dir := o.RunDir(id)

	// The host seeded the guest's RNG before StartVM returned
	// (vmutil.SeedBoot): the input pool holds its full 256 credited bits,
	// so the CRNG is initialised and getrandom(2) no longer blocks. Read
	// through the agent's file call, not a command: the agent's start of a
	// process would itself wait for the CRNG.
	c, err := o.Agent(id)
	require.NoError(t, err)
	avail, err := c.ReadFile(t.Context(), "/proc/sys/kernel/random/entropy_avail", 64)
	require.NoError(t, err)
	require.Equal(t, "256", strings.TrimSpace(string(avail)), "the guest's entropy when StartVM returned")
	require.Equal(t, "web-server-1\n", vmmtest.Sh(t, o, id, "hostname"))
	require.Equal(t, img.Kernel.Release+"\n", vmmtest.Sh(t, o, id, "uname -r"))
	require.Contains(t, vmmtest.Sh(t, o, id, "cat /proc/mounts"), "/dev/vda / ext4")
	require.Contains(t, vmmtest.Sh(t, o, id, "cat /etc/os-release"), "Debian")
	// Each command runs in a cgroup of its own (agent.execCgroups), so a
	// timeout kills also what cleared its environment and lost its
	// parent, which no token or parent link finds.
	require.Regexp(t, `^0::/aetherium-exec/[A-Z0-9]+\n$`, vmmtest.Sh(t, o, id, "cat /proc/self/cgroup"))
	res := vmmtest.Exec(t, o, id, types.Command{Cmd: "sh", Args: []string{"-c", `(env -i setsid sh -c "exec sleep 333" &); sleep 600`},
		Timeout: 2 * time.Second})
	require.True(t, res.TimedOut)
	require.Equal(t, "0\n", vmmtest.Sh(t, o, id, `n=0; for p in /proc/[0-9]*; do case "$(tr '\0' ' ' < $p/cmdline 2>/dev/null)" in "sleep 333 ") n=$((n+1));; esac; done; echo $n`),
		"a process of the timed-out command survived")
	// The guest writes to its root disk; the base image must not change.
	vmmtest.Sh(t, o, id, "dd if=/dev/urandom of=/var/tmp/blob bs=1M count=8 2>/dev/null && sync && echo done")
	require.Equal(t, before, fileHash(t, img.RootfsPath()), "a VM wrote to the base image")
	// The disk survives a stop and start.
	require.NoError(t, o.StopVM(t.Context(), id, false))
	require.NoError(t, o.StartVM(t.Context(), id))
	require.Equal(t, "8388608\n", vmmtest.Sh(t, o, id, "stat -c %s /var/tmp/blob"))

	console, err := os.ReadFile(filepath.Join(dir, "console.log"))
	require.NoError(t, err)
	require.Contains(t, string(console), "Linux version", "the kernel's messages reach the console log")
	require.Contains(t, string(console), "aetherium-init: start")

	qpid := qemuPid(t, o, id)
	require.NoError(t, o.DeleteVM(t.Context(), id))
	require.NoError(t, o.DeleteVM(t.Context(), id), "delete is idempotent")
	require.False(t, alive(qpid), "QEMU outlived delete")
	_, err = os.Stat(dir)
	require.ErrorIs(t, err, os.ErrNotExist, "the run directory outlived delete")
}

// TestRestartFindsVMs: a new orchestrator on the same run directory (a
// restarted worker) finds the running VM again and can use and stop it; a VM
// whose QEMU died meanwhile is reported failed and its leftovers removed.
func TestRestartFindsVMs(t *testing.T) {
	dir := runDir(t)
	o1 := newOrchestrator(t, dir)
	t.Cleanup(func() { deleteAll(t, o1) })
	a := vmmtest.StartVM(t, o1, vmmtest.NewSpec(t))
	b := vmmtest.StartVM(t, o1, vmmtest.NewSpec(t))
	bpid := qemuPid(t, o1, b)
	o1.Close()

	// Kill b's QEMU behind the first orchestrator's back, as if it crashed
	// while no worker ran; the first orchestrator notices and cleans up, so
	// put its state back to "should run" to model a crash with no watcher.
	require.NoError(t, syscall.Kill(bpid, syscall.SIGKILL))
	waitGone(t, bpid)

	o2 := newOrchestrator(t, dir)
	t.Cleanup(func() { deleteAll(t, o2) })
	vmmtest.RequireState(t, o2, a, types.VMRunning)
	require.Equal(t, "still here\n", vmmtest.Sh(t, o2, a, "echo still here"))
	st, err := o2.GetVMStatus(t.Context(), b)
	require.NoError(t, err)
	require.Equal(t, types.VMFailed, st.State)
	require.NotEmpty(t, st.Detail)
	for _, f := range []string{"run/qmp.sock", "run/agent.sock", "qemu.pid"} {
		_, err := os.Stat(filepath.Join(o2.RunDir(b), f))
		require.ErrorIs(t, err, os.ErrNotExist, "%s of the dead VM", f)
	}
	apid := qemuPid(t, o2, a)
	require.NoError(t, o2.StopVM(t.Context(), a, false))
	require.False(t, alive(apid))
	vmmtest.RequireState(t, o2, a, types.VMStopped)
}

func waitGone(t testing.TB, pid int) {
	t.Helper()
	require.Eventually(t, func() bool { return !alive(pid) }, 10*time.Second, 10*time.Millisecond)
}

func TestBadConfig(t *testing.T) {
	requireHost(t)
	_, err := qemu.New(context.Background(), qemu.Config{RunDir: runDir(t)})
	require.ErrorIs(t, err, types.ErrInvalid)
	require.Contains(t, err.Error(), "aether-cli image build")

	f := filepath.Join(t.TempDir(), "k")
	require.NoError(t, os.WriteFile(f, nil, 0o600))
	_, err = qemu.New(context.Background(), qemu.Config{KernelPath: f, InitrdPath: f, RootfsPath: f, RunDir: runDir(t), Accel: "hvf"})
	require.ErrorIs(t, err, types.ErrInvalid)
	require.Contains(t, err.Error(), "use auto, kvm or tcg")

	_, err = qemu.New(context.Background(), qemu.Config{KernelPath: f, InitrdPath: f, RootfsPath: f, RunDir: "/tmp/" + strings.Repeat("x", 90)})
	require.ErrorIs(t, err, types.ErrInvalid)
	require.Contains(t, err.Error(), "too long")

	// Two orchestrators never share a run directory.
	shared := runDir(t)
	o1, err := qemu.New(context.Background(), qemu.Config{KernelPath: f, InitrdPath: f, RootfsPath: f, RunDir: shared, Jail: jailConfig(t)})
	require.NoError(t, err)
	_, err = qemu.New(context.Background(), qemu.Config{KernelPath: f, InitrdPath: f, RootfsPath: f, RunDir: shared, Jail: jailConfig(t)})
	require.ErrorIs(t, err, types.ErrConflict)
	require.Contains(t, err.Error(), "its own vmm.qemu.run_dir")
	require.NoError(t, o1.Close())
	o2, err := qemu.New(context.Background(), qemu.Config{KernelPath: f, InitrdPath: f, RootfsPath: f, RunDir: shared, Jail: jailConfig(t)})
	require.NoError(t, err, "Close releases the run directory")
	o2.Close()
}

func TestDetectAccel(t *testing.T) {
	a := qemu.DetectAccel()
	require.Contains(t, []string{"kvm", "tcg"}, a.Name)
	require.NotEmpty(t, a.Reason)
	t.Logf("accelerator here: %s (%s)", a.Name, a.Reason)
}

func fileHash(t testing.TB, path string) string {
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	h := sha256.New()
	_, err = io.Copy(h, f)
	require.NoError(t, err)
	return hex.EncodeToString(h.Sum(nil))
}

// TestFailureMessage: a VM whose QEMU exits during boot (here: a kernel
// file QEMU cannot load) fails with one text, the same in StartVM's error
// and in the VM's status: what failed, then one labelled tail of the log
// that says why (QEMU's own), taken from this boot only, so a line an
// earlier boot left on the console does not end the message.
func TestFailureMessage(t *testing.T) {
	requireHost(t)
	img := testenv.GuestImage(t)
	kernel := filepath.Join(t.TempDir(), "vmlinuz")
	require.NoError(t, os.WriteFile(kernel, []byte("this is not a kernel\n"), 0o644))
	o, err := qemu.New(context.Background(), qemu.Config{
		KernelPath: kernel, InitrdPath: img.InitrdPath(), RootfsPath: img.RootfsPath(),
		RunDir: runDir(t), Jail: jailConfig(t), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	require.NoError(t, err)
	t.Cleanup(func() { deleteAll(t, o); o.Close() })
	ctx := t.Context()
	sp := vmmtest.NewSpec(t)
	_, err = o.CreateVM(ctx, sp)
	require.NoError(t, err)
	// What an earlier boot of the VM left on its console.
	require.NoError(t, os.WriteFile(filepath.Join(o.RunDir(sp.ID), "console.log"), []byte("reboot: Power down (an earlier boot)\n"), 0o600))

	err = o.StartVM(ctx, sp.ID)
	require.Error(t, err)
	t.Log(err)
	var st *vmm.VMStatus
	require.Eventually(t, func() bool {
		st, _ = o.GetVMStatus(ctx, sp.ID)
		return st != nil && st.State == types.VMFailed && st.Detail != ""
	}, 10*time.Second, 20*time.Millisecond)
	t.Log(st.Detail)
	require.Regexp(t, `^QEMU exited with code \d+; QEMU's log ends with:\nqemu`, st.Detail)
	require.Equal(t, 1, strings.Count(st.Detail, " ends with:"), "one labelled tail")
	require.NotContains(t, st.Detail, "earlier boot")
	require.Equal(t, "starting vm "+sp.ID+": it failed before its agent answered: "+st.Detail, err.Error(),
		"StartVM's error and the recorded failure are the same text")
}
