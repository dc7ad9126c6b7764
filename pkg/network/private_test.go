package network_test

import (
	"net/netip"
	"testing"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// The operator's "internal network" of the tests: a namespace reached from
// the host namespace through the veth lan0, holding a server in each
// private range.
var (
	lanHost   = netip.MustParsePrefix("10.200.0.2/24") // the host's own address on that network
	lanServer = netip.MustParsePrefix("10.200.0.1/24")
	lanDNS    = netip.MustParseAddr("10.200.0.53")
	lanOthers = []netip.Addr{
		netip.MustParseAddr("172.16.5.1"),
		netip.MustParseAddr("192.168.77.1"),
		netip.MustParseAddr("100.64.3.1"),
	}
)

// addLAN makes the internal network's namespace, with servers on
// lanServer, lanDNS and lanOthers, and the routes both ways.
func (b *testbed) addLAN() netns.NsHandle {
	t := b.t
	lanNS := testenv.NewNetns(t)
	lan := testenv.NetlinkAt(t, lanNS)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "lan0"}, PeerName: "eth0", PeerNamespace: netlink.NsFd(lanNS)}
	require.NoError(t, b.host.LinkAdd(veth))
	hostEnd, err := b.host.LinkByName("lan0")
	require.NoError(t, err)
	require.NoError(t, b.host.AddrAdd(hostEnd, addr(lanHost)))
	require.NoError(t, b.host.LinkSetUp(hostEnd))
	eth0, err := lan.LinkByName("eth0")
	require.NoError(t, err)
	require.NoError(t, lan.AddrAdd(eth0, addr(lanServer)))
	require.NoError(t, lan.AddrAdd(eth0, addr(netip.PrefixFrom(lanDNS, 24))))
	require.NoError(t, lan.LinkSetUp(eth0))
	lo, err := lan.LinkByName("lo")
	require.NoError(t, err)
	require.NoError(t, lan.LinkSetUp(lo))
	for _, a := range lanOthers {
		require.NoError(t, lan.AddrAdd(lo, addr(netip.PrefixFrom(a, 32))))
		require.NoError(t, b.host.RouteAdd(&netlink.Route{Dst: ipnet(netip.PrefixFrom(a, 32)), Gw: lanServer.Addr().AsSlice(), LinkIndex: hostEnd.Attrs().Index}))
	}
	// Replies go back through the host, which routes the VM subnet (no
	// NAT towards the internal network).
	require.NoError(t, lan.RouteAdd(&netlink.Route{Gw: lanHost.Addr().AsSlice(), LinkIndex: eth0.Attrs().Index}))
	return lanNS
}

// TestPrivateRanges: by default a guest reaches the outside but none of
// the private ranges, except the configured DNS server on port 53; with
// AllowPrivate it reaches them all; an EgressAllow entry inside a private
// range opens just that. The host's own address on the internal network
// and the metadata address stay closed in every case.
func TestPrivateRanges(t *testing.T) {
	type target struct {
		name  string
		addr  string
		reach bool
	}
	lanAddr := lanServer.Addr().String() + ":8080"
	hostAddr := lanHost.Addr().String() + ":9092"
	cases := []struct {
		name    string
		cfg     network.Config
		targets []target
	}{
		{"default", network.Config{DNS: []string{lanDNS.String()}}, []target{
			{"the outside", upServer.Addr().String() + ":8080", true},
			{"10/8", lanAddr, false},
			{"172.16/12", lanOthers[0].String() + ":8080", false},
			{"192.168/16", lanOthers[1].String() + ":8080", false},
			{"100.64/10", lanOthers[2].String() + ":8080", false},
			{"the DNS server on port 53", lanDNS.String() + ":53", true},
			{"the DNS server on another port", lanDNS.String() + ":8080", false},
			{"the host's own address", hostAddr, false},
			{"link-local metadata", metadata.String() + ":80", false},
		}},
		{"AllowPrivate", network.Config{AllowPrivate: true}, []target{
			{"the outside", upServer.Addr().String() + ":8080", true},
			{"10/8", lanAddr, true},
			{"172.16/12", lanOthers[0].String() + ":8080", true},
			{"192.168/16", lanOthers[1].String() + ":8080", true},
			{"100.64/10", lanOthers[2].String() + ":8080", true},
			{"the host's own address", hostAddr, false},
			{"link-local metadata", metadata.String() + ":80", false},
		}},
		{"EgressAllow names a private range", network.Config{EgressAllow: []string{"10.200.0.0/24", "203.0.113.0/24"}}, []target{
			{"the outside", upServer.Addr().String() + ":8080", true},
			{"the allowed 10/8 part", lanAddr, true},
			{"192.168/16", lanOthers[1].String() + ":8080", false},
			{"the host's own address", hostAddr, false},
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			cfg.Bridge, cfg.Uplink = "br-test", "up0"
			b := newTestbed(t, cfg)
			upNS := b.addUplink()
			lanNS := b.addLAN()
			require.NoError(t, b.m.Setup(t.Context()))
			serve(t, upNS, upServer.Addr().String()+":8080")
			serve(t, upNS, metadata.String()+":80")
			serve(t, lanNS, lanAddr)
			serve(t, lanNS, lanDNS.String()+":53")
			serve(t, lanNS, lanDNS.String()+":8080")
			for _, a := range lanOthers {
				serve(t, lanNS, a.String()+":8080")
			}
			serve(t, b.hostNS, hostAddr)
			g := b.addGuest()
			for _, tgt := range tc.targets {
				if tgt.reach {
					_, err := dial(t, g.ns, netip.Addr{}, tgt.addr, reachTimeout)
					require.NoError(t, err, "%s (%s) must be reachable", tgt.name, tgt.addr)
				} else {
					_, err := dial(t, g.ns, netip.Addr{}, tgt.addr, blockedTimeout)
					require.Error(t, err, "%s (%s) must be blocked", tgt.name, tgt.addr)
				}
			}
			// The host itself reaches the internal network whatever the
			// guests may: the rules hold for VM traffic only.
			_, err := dial(t, b.hostNS, netip.Addr{}, lanAddr, reachTimeout)
			require.NoError(t, err)
		})
	}
}

// TestOwnersShareAPool: two Managers (two workers) on one bridge, tables
// and pool, each with its own owner. One reconciling with only its own VM
// live leaves the other's VM whole (TAP, rules, lease, claim); each still
// cleans its own dead VMs; Teardown removes everyone's.
func TestOwnersShareAPool(t *testing.T) {
	ctx := t.Context()
	b := newTestbed(t, network.Config{Bridge: "br-test", Owner: "worker-1"})
	cfg2 := b.cfg
	cfg2.Owner = "worker-2"
	m2, err := network.New(cfg2, b.store)
	require.NoError(t, err)
	t.Cleanup(func() { m2.Close() })
	require.Equal(t, b.m.Pool(), m2.Pool(), "the managers share the pool")

	vm1, dead1, vm2, dead2 := uuid.NewString(), uuid.NewString(), uuid.NewString(), uuid.NewString()
	for _, id := range []string{vm1, dead1} {
		_, err := b.m.Attach(ctx, id)
		require.NoError(t, err)
	}
	for _, id := range []string{vm2, dead2} {
		_, err := m2.Attach(ctx, id)
		require.NoError(t, err)
	}
	st, err := b.m.List(ctx)
	require.NoError(t, err)
	require.Equal(t, map[string]string{vm1: "worker-1", dead1: "worker-1", vm2: "worker-2", dead2: "worker-2"}, st.Owners)

	cleaned, err := b.m.Reconcile(ctx, []string{vm1})
	require.NoError(t, err)
	require.Equal(t, []string{dead1}, cleaned, "worker-1 cleans only its own dead vm")
	st, err = b.m.List(ctx)
	require.NoError(t, err)
	var ports []string
	for _, p := range st.Ports {
		ports = append(ports, p.VMID)
	}
	require.ElementsMatch(t, []string{vm1, vm2, dead2}, ports, "worker-2's TAPs survive")
	require.Equal(t, map[string]int{vm1: 8, vm2: 8, dead2: 8}, st.VMRules, "worker-2's rules survive")
	var leased []string
	for _, l := range st.Leases {
		leased = append(leased, l.VMID)
	}
	require.ElementsMatch(t, []string{vm1, vm2, dead2}, leased, "worker-2's leases survive")
	require.Equal(t, map[string]string{vm1: "worker-1", vm2: "worker-2", dead2: "worker-2"}, st.Owners)

	cleaned, err = m2.Reconcile(ctx, []string{vm2})
	require.NoError(t, err)
	require.Equal(t, []string{dead2}, cleaned)
	cleaned, err = b.m.Reconcile(ctx, nil)
	require.NoError(t, err)
	require.Equal(t, []string{vm1}, cleaned, "with no live vm, worker-1 still leaves worker-2's")
	st, err = b.m.List(ctx)
	require.NoError(t, err)
	require.Len(t, st.Ports, 1)
	require.Equal(t, vm2, st.Ports[0].VMID)
	require.Equal(t, map[string]string{vm2: "worker-2"}, st.Owners)

	require.NoError(t, b.m.Teardown(ctx))
	st, err = b.m.List(ctx)
	require.NoError(t, err)
	require.True(t, st.Empty(), "Teardown removes every owner's: %+v", st)
}

// TestOwnerValidation: an owner that cannot go into a rule comment is
// refused with a message naming the field.
func TestOwnerValidation(t *testing.T) {
	for _, owner := range []string{"two words", "a/b", string(make([]byte, 64))} {
		_, err := network.New(network.Config{Owner: owner}, nil)
		require.ErrorIs(t, err, types.ErrInvalid)
		require.ErrorContains(t, err, "network owner")
	}
}
