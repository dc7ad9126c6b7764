package qemu_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// TestNetworkClones snapshots a running nat VM and starts 5 clones of it
// at once. Each clone's guest must end with its own MAC and address (the
// restored NIC had the source's), reach the outside through NAT with
// them, have its spoofed packets dropped (the source's address included:
// the rules follow the clone, not the snapshot), and be known to the
// host's neighbour table by its own MAC. The source goes on with its own,
// and a nat VM suspends and resumes with its network. Nothing is left.
func TestNetworkClones(t *testing.T) {
	b := newNetTestbed(t)
	ctx := t.Context()
	src := b.startVMs(1)[0]
	echo := netip.AddrPortFrom(upServer.Addr(), portEcho).String()

	dir := t.TempDir()
	_, err := b.o.Snapshot(ctx, src.id, dir)
	require.NoError(t, err)

	const n = 5
	clones := make([]vm, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		clones[i].id = uuid.NewString()
		wg.Go(func() {
			// No network asked for: a clone has its snapshot's.
			sp := types.VMSpec{ID: clones[i].id, Name: fmt.Sprintf("clone-%d", i), FromSnapshot: dir}
			if _, errs[i] = b.o.CreateVM(ctx, sp); errs[i] == nil {
				errs[i] = b.o.StartVM(ctx, sp.ID)
			}
		})
	}
	wg.Wait()
	for i := range n {
		require.NoError(t, errs[i], "clone %d", i)
	}
	t.Logf("%d nat clones created and restored in %s", n, time.Since(start).Round(time.Millisecond))
	leases := b.leases()
	seen := map[netip.Addr]bool{src.ip: true}
	for i := range clones {
		clones[i].ip = leases[clones[i].id]
		require.True(t, clones[i].ip.IsValid(), "clone %s holds no lease", clones[i].id)
		require.False(t, seen[clones[i].ip], "address %s given twice", clones[i].ip)
		seen[clones[i].ip] = true
	}

	macs := map[string]string{}
	for _, v := range append([]vm{src}, clones...) {
		mac := out(run(t, b.o, v.id, "cat", "/sys/class/net/eth0/address"))
		require.Empty(t, macs[mac], "vms %s and %s have the same MAC %s", macs[mac], v.id, mac)
		macs[mac] = v.id
	}
	for _, v := range append([]vm{src}, clones...) {
		require.Equal(t, netip.PrefixFrom(v.ip, 24).String(), out(run(t, b.o, v.id, "nettool", "addr", "eth0")), "vm %s", v.id)
		require.Equal(t, network.MAC(v.id).String(), out(run(t, b.o, v.id, "cat", "/sys/class/net/eth0/address")), "vm %s", v.id)
		r := run(t, b.o, v.id, "nettool", "dial", echo, "10s")
		require.Equal(t, 0, r.ExitCode, "vm %s cannot reach the outside: %s", v.id, r.Stderr)
		require.Equal(t, upHost.Addr().String(), out(r))
	}

	// The host knows each clone's address by the clone's own MAC: the
	// guest's ARP state is its own, not the snapshot's.
	br, err := b.host.LinkByName(b.netCfg.Bridge)
	require.NoError(t, err)
	neigh, err := b.host.NeighList(br.Attrs().Index, netlink.FAMILY_V4)
	require.NoError(t, err)
	hostARP := map[netip.Addr]net.HardwareAddr{}
	for _, nb := range neigh {
		if a, ok := netip.AddrFromSlice(nb.IP); ok {
			hostARP[a.Unmap()] = nb.HardwareAddr
		}
	}
	for _, v := range clones {
		require.Equal(t, network.MAC(v.id).String(), hostARP[v.ip].String(), "the host's neighbour entry for clone %s", v.ip)
	}

	// The anti-spoofing rules are bound to the clone's address: the one
	// it was restored with (its source's) is now a spoof.
	dst := netip.AddrPortFrom(upServer.Addr(), portUDP).String()
	c := clones[0]
	for _, tc := range []struct{ src, msg string }{
		{src.ip.String(), "clone-spoofs-source"},
		{c.ip.String(), "clone-own-address"},
	} {
		r := run(t, b.o, c.id, "nettool", "spoof", tc.src, dst, tc.msg)
		require.Equal(t, 0, r.ExitCode, "stderr: %s", r.Stderr)
	}
	require.Eventually(t, func() bool { _, ok := b.udp.from("clone-own-address"); return ok }, 10*time.Second, 20*time.Millisecond,
		"the clone's datagram from its own address never arrived")
	time.Sleep(300 * time.Millisecond)
	if from, ok := b.udp.from("clone-spoofs-source"); ok {
		t.Fatalf("a datagram with the source's address left the clone (seen from %s)", from)
	}

	// A nat VM suspends and resumes with its TAP, MAC and address.
	require.NoError(t, b.o.Suspend(ctx, src.id))
	require.NoError(t, b.o.Resume(ctx, src.id))
	r := run(t, b.o, src.id, "nettool", "dial", echo, "10s")
	require.Equal(t, 0, r.ExitCode, "the resumed vm cannot reach the outside: %s", r.Stderr)
	require.Equal(t, netip.PrefixFrom(src.ip, 24).String(), out(run(t, b.o, src.id, "nettool", "addr", "eth0")))

	for _, v := range append([]vm{src}, clones...) {
		require.NoError(t, b.o.DeleteVM(context.Background(), v.id))
	}
	b.requireEmpty()
}
