package firecracker_test

import (
	"cmp"
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/firecracker"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

// Environment of the real-VM suite (docs/firecracker.md).
const (
	envBinary = "AETHERIUM_FIRECRACKER_BIN"    // default: firecracker in PATH
	envKernel = "AETHERIUM_FIRECRACKER_KERNEL" // ELF vmlinux, required
	envInitrd = "AETHERIUM_FIRECRACKER_INITRD" // initramfs with fc-agent as /init
	envRootfs = "AETHERIUM_FIRECRACKER_ROOTFS" // ext4 image, required
)

// realConfig returns the configuration of a real Firecracker, or why the
// suite cannot run here. Missing hardware is not a skip that
// AETHERIUM_TEST_REQUIRE turns into a failure: PLATFORM.md documents that
// these machines have neither a Firecracker binary nor a usable KVM.
func realConfig(t *testing.T) (firecracker.Config, string) {
	var missing []string
	bin, err := exec.LookPath(cmp.Or(os.Getenv(envBinary), firecracker.DefaultBinary))
	if err != nil {
		missing = append(missing, "no firecracker binary ("+err.Error()+"); install Firecracker v1.16 or set "+envBinary)
	}
	if ok, why := firecracker.KVMUsable(); !ok {
		missing = append(missing, "no usable KVM: "+why+" (see PLATFORM.md; run on a host with VT-x/AMD-V)")
	}
	if len(missing) > 0 {
		return firecracker.Config{}, strings.Join(missing, "; ")
	}
	cfg := firecracker.Config{
		Binary:     bin,
		KernelPath: os.Getenv(envKernel),
		InitrdPath: os.Getenv(envInitrd),
		RootfsPath: os.Getenv(envRootfs),
		SocketDir:  shortDir(t, "fcr-"),
		Logger:     testLogger(t),
	}
	if cfg.KernelPath == "" || cfg.RootfsPath == "" {
		// The project's own guest image, built (or found in the cache) the
		// way every other backend's tests get it.
		img := testenv.GuestImage(t)
		cfg.KernelPath, cfg.InitrdPath, cfg.RootfsPath = img.VmlinuxPath(), img.InitrdPath(), img.RootfsPath()
	}
	return cfg, ""
}

// TestConformance runs the shared suite against a real Firecracker.
func TestConformance(t *testing.T) {
	cfg, why := realConfig(t)
	if why != "" {
		t.Log("skipping the firecracker conformance suite: " + why)
		t.Skip(why)
	}
	vmmtest.Run(t, withState(cfg, vmmtest.Harness{
		New: func(t *testing.T) vmm.VMOrchestrator {
			o, err := firecracker.New(t.Context(), cfg)
			require.NoError(t, err)
			t.Cleanup(func() { o.Close() })
			return o
		},
		OpTimeout: time.Minute,
		Crash:     crash,
	}))
}

func lockVM(o vmm.VMOrchestrator, id string) func() { return o.(*firecracker.Orchestrator).LockVM(id) }

// crash kills VM id's VMM from outside, as a crash would.
func crash(t *testing.T, o vmm.VMOrchestrator, id string) {
	t.Helper()
	fc := o.(*firecracker.Orchestrator)
	pid := fc.PID(id)
	require.Positive(t, pid, "vm %s has no running VMM", id)
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
}

// TestDiagnose: the report names every prerequisite, agrees with
// KVMUsable, and Health fails exactly when a check does. On this project's
// machines it explains that KVM lacks hardware virtualization.
func TestDiagnose(t *testing.T) {
	t.Parallel()
	cfg := fakeConfig(t)
	cfg.Binary = "/nonexistent/firecracker"
	checks := firecracker.Diagnose(t.Context(), cfg)
	byName := map[string]firecracker.Check{}
	for _, c := range checks {
		byName[c.Name] = c
		t.Logf("ok=%v %-24s %s %s", c.OK, c.Name, c.Detail, c.Fix)
		if !c.OK {
			require.NotEmpty(t, c.Fix, c.Name)
		}
	}
	for _, n := range []string{"firecracker binary", "/dev/kvm", "hardware virtualization", "kernel", "initrd", "rootfs", "vsock"} {
		require.Contains(t, byName, n)
	}
	require.False(t, byName["firecracker binary"].OK)
	require.Contains(t, byName["firecracker binary"].Fix, "Worker can't create VMs")
	require.False(t, byName["kernel"].OK, "the stand-in kernel is no ELF image")
	require.True(t, byName["rootfs"].OK)
	require.True(t, byName["vsock"].OK)

	usable, why := firecracker.KVMUsable()
	require.Equal(t, usable, byName["/dev/kvm"].OK && byName["hardware virtualization"].OK, why)
	if !usable {
		t.Logf("KVM is not usable here: %s", why)
		require.Contains(t, byName["hardware virtualization"].Fix+byName["/dev/kvm"].Fix, "Worker can't create VMs")
	}

	o := newOrchestrator(t, cfg)
	err := o.Health(t.Context())
	require.ErrorIs(t, err, types.ErrUnavailable)
	require.Contains(t, err.Error(), "firecracker binary")

	cfg.SocketDir = "/" + strings.Repeat("d", 80)
	bad := firecracker.Diagnose(t.Context(), cfg)
	for _, c := range bad {
		if c.Name == "vsock" {
			require.False(t, c.OK)
			require.Contains(t, c.Fix, "VSock connection timeout")
			require.Contains(t, c.Detail, "107")
			return
		}
	}
	t.Fatal(errors.New("no vsock check"))
}
