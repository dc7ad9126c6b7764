package firecracker_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

// TestNetworkManager: with the network manager the qemu backend uses (for
// real, in a namespace this test makes), a nat VM gets a TAP that the VMM
// is given as eth0 with the manager's MAC, its guest learns its address
// from the boot arguments, and delete returns TAP, rules and lease.
func TestNetworkManager(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Skip(t, "VM networking needs root (CAP_NET_ADMIN); run the tests as root")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dsn := testenv.Postgres(t)
	require.NoError(t, postgres.MigrateUp(ctx, dsn))
	store, err := postgres.Open(ctx, dsn)
	require.NoError(t, err)
	t.Cleanup(store.Close)
	ns := testenv.NewNetns(t)
	m, err := network.New(network.Config{Netns: testenv.NetnsPath(ns), Bridge: "aetfc0", Subnet: "10.98.0.0/24", Table: "aetfc"}, store)
	require.NoError(t, err)
	t.Cleanup(func() { m.Teardown(context.Background()); m.Close() })

	cfg := fakeConfig(t)
	cfg.Network = m
	o := newOrchestrator(t, cfg)
	require.True(t, o.Capabilities().Networking)
	sp := vmmtest.NewSpec(t)
	sp.Network = types.NetworkNAT
	t.Cleanup(func() { o.DeleteVM(bg(t), sp.ID) })
	_, err = o.CreateVM(ctx, sp)
	require.NoError(t, err)
	require.NoError(t, o.StartVM(ctx, sp.ID))

	st, err := m.List(ctx)
	require.NoError(t, err)
	require.Len(t, st.Ports, 1)
	tap := st.Ports[0].Name
	reqs := requests(t, filepath.Join(cfg.SocketDir, sp.ID))
	require.Equal(t, map[string]any{"iface_id": "eth0", "host_dev_name": tap, "guest_mac": network.MAC(sp.ID).String()},
		find(t, reqs, "PUT", "/network-interfaces/eth0"))
	boot := find(t, reqs, "PUT", "/boot-source")
	require.Contains(t, boot["boot_args"], network.KernelArgName+"=ip=10.98.0.2/24,gw=10.98.0.1")

	// The network goes away under a stopped VM (a host reboot, a
	// teardown): the next start attaches it again.
	require.NoError(t, o.StopVM(ctx, sp.ID, true))
	require.NoError(t, m.Teardown(ctx))
	require.NoError(t, o.StartVM(ctx, sp.ID))
	st, err = m.List(ctx)
	require.NoError(t, err)
	require.Len(t, st.Ports, 1, "StartVM must re-attach a VM whose TAP is gone")
	require.Equal(t, tap, st.Ports[0].Name)
	require.Len(t, st.Leases, 1)

	require.NoError(t, o.DeleteVM(ctx, sp.ID))
	st, err = m.List(ctx)
	require.NoError(t, err)
	require.Empty(t, st.Ports)
	require.Empty(t, st.VMRules)
	require.Empty(t, st.Leases)

	// Without a manager, nat is refused up front with what to do.
	plain := newOrchestrator(t, fakeConfig(t))
	require.False(t, plain.Capabilities().Networking)
	sp2 := vmmtest.NewSpec(t)
	sp2.Network = types.NetworkNAT
	_, err = plain.CreateVM(ctx, sp2)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.True(t, strings.Contains(err.Error(), "--network none"), err.Error())
}
