package qemu_test

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/jail"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
)

// childEnv makes the test binary run createChild instead of the tests.
const childEnv = "AETHERIUM_QEMU_NET_CHILD"

// TestKilledDuringCreate models a worker killed with SIGKILL while it
// creates nat VMs: one VM is created and booting, another is between its
// Attach and the rename of its directory. A fresh Orchestrator and Manager
// (the restarted worker) find the booting VM again and keep its network,
// while Reconcile removes the half-made one's TAP, rules, lease and
// temporary directory.
func TestKilledDuringCreate(t *testing.T) {
	b := newNetTestbed(t)
	ctx := t.Context()
	img := testenv.GuestImage(t)
	// The child is the worker that owns the run directory now.
	require.NoError(t, b.o.Close())
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=1",
		"CHILD_NETNS="+b.netCfg.Netns, "CHILD_POOL="+b.netCfg.Pool, "CHILD_DSN="+b.dsn, "CHILD_DIR="+b.dir,
		"CHILD_KERNEL="+img.KernelPath(), "CHILD_INITRD="+img.InitrdPath(), "CHILD_ROOTFS="+img.RootfsPath(), "CHILD_JAILER="+testenv.Jailer(t))
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	cmd.Stderr = os.Stderr
	require.NoError(t, cmd.Start())
	killed := false
	defer func() {
		if !killed {
			cmd.Process.Kill()
			cmd.Wait()
		}
	}()
	lines := map[string]string{}
	sc := bufio.NewScanner(stdout)
	for len(lines) < 2 && sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), " ")
		lines[k] = v
	}
	booting, half := lines["booting"], lines["attached"]
	require.NotEmpty(t, booting, "the child stopped early")
	require.NotEmpty(t, half, "the child stopped early")
	require.NoError(t, cmd.Process.Kill())
	cmd.Wait()
	killed = true

	st, err := b.m.List(ctx)
	require.NoError(t, err)
	require.Len(t, st.Ports, 2, "both TAPs exist after the kill")
	require.Len(t, st.Leases, 2)
	tmps, _ := filepath.Glob(filepath.Join(b.dir, ".create-*"))
	require.Len(t, tmps, 1, "the half-made vm's temporary directory")

	// The restarted worker.
	m2, err := network.New(b.netCfg, b.store)
	require.NoError(t, err)
	defer m2.Close()
	b.m = m2
	o2 := b.orchestrator()
	t.Cleanup(func() { deleteAll(t, o2) })
	require.NoError(t, o2.Reconcile(ctx))
	require.NoError(t, o2.Reconcile(ctx), "Reconcile twice")
	st, err = m2.List(ctx)
	require.NoError(t, err)
	require.Len(t, st.Ports, 1)
	require.Equal(t, booting, st.Ports[0].VMID, "the booting vm keeps its TAP")
	require.Equal(t, network.PortName(booting), st.Ports[0].Name)
	require.Len(t, st.Leases, 1)
	require.Equal(t, booting, st.Leases[0].VMID)
	require.Equal(t, []string{booting}, slices.Collect(maps.Keys(st.VMRules)))
	tmps, _ = filepath.Glob(filepath.Join(b.dir, ".create-*"))
	require.Empty(t, tmps)
	_, err = o2.GetVMStatus(ctx, half)
	require.ErrorIs(t, err, types.ErrNotFound)

	// The VM whose boot the kill interrupted still works, network included.
	require.NoError(t, o2.StartVM(ctx, booting))
	b.o = o2
	require.NoError(t, b.copyNettool(ctx, booting))
	r := run(t, o2, booting, "nettool", "dial", netip.AddrPortFrom(upServer.Addr(), portEcho).String(), "10s")
	require.Equal(t, 0, r.ExitCode, "stderr: %s", r.Stderr)
	require.Equal(t, upHost.Addr().String(), out(r))
	require.NoError(t, o2.DeleteVM(ctx, booting))
	b.requireEmpty()
}

// createChild is the worker TestKilledDuringCreate kills: it creates a nat
// VM and starts booting it, then creates another whose Attach succeeds and
// then hangs, reporting each on stdout.
func createChild() int {
	ctx := context.Background()
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "child:", err); return 1 }
	st, err := postgres.Open(ctx, os.Getenv("CHILD_DSN"))
	if err != nil {
		return fail(err)
	}
	m, err := network.New(network.Config{Bridge: "br-q", Subnet: netSubnet, Uplink: "up0", Netns: os.Getenv("CHILD_NETNS"), Pool: os.Getenv("CHILD_POOL")}, st)
	if err != nil {
		return fail(err)
	}
	hang := &hangAfterAttach{Manager: m, hang: map[string]bool{}}
	o, err := qemu.New(ctx, qemu.Config{
		KernelPath: os.Getenv("CHILD_KERNEL"), InitrdPath: os.Getenv("CHILD_INITRD"), RootfsPath: os.Getenv("CHILD_ROOTFS"),
		RunDir: os.Getenv("CHILD_DIR"), Network: hang, ReadyTimeout: 4 * time.Minute,
		Jail:   jail.Config{Binary: os.Getenv("CHILD_JAILER")},
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		return fail(err)
	}
	booting := types.VMSpec{ID: uuid.NewString(), Name: "booting", VCPUs: 1, MemoryMB: 128, Network: types.NetworkNAT}
	if _, err := o.CreateVM(ctx, booting); err != nil {
		return fail(err)
	}
	go o.StartVM(ctx, booting.ID)
	// Wait until QEMU runs, so the kill lands in the middle of its boot.
	for {
		if _, err := os.Stat(filepath.Join(o.RunDir(booting.ID), "qemu.pid")); err == nil {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	fmt.Println("booting", booting.ID)
	half := types.VMSpec{ID: uuid.NewString(), Name: "half", VCPUs: 1, MemoryMB: 128, Network: types.NetworkNAT}
	hang.mu.Lock()
	hang.hang[half.ID] = true
	hang.mu.Unlock()
	_, err = o.CreateVM(ctx, half)
	return fail(fmt.Errorf("CreateVM returned: %v", err))
}

// hangAfterAttach is the real Manager, except that Attach of the VMs in
// hang reports the VM on stdout and never returns: the state of a worker
// killed between attaching a VM and recording it.
type hangAfterAttach struct {
	*network.Manager
	mu   sync.Mutex
	hang map[string]bool
}

func (h *hangAfterAttach) Attach(ctx context.Context, id string) (*network.Attachment, error) {
	a, err := h.Manager.Attach(ctx, id)
	h.mu.Lock()
	hang := h.hang[id]
	h.mu.Unlock()
	if err == nil && hang {
		fmt.Println("attached", id)
		select {}
	}
	return a, err
}
