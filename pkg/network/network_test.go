package network_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/network/guestnet"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// childEnv makes the test binary run childMain instead of the tests.
const childEnv = "AETHERIUM_NETWORK_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(childMain(os.Getenv(childEnv)))
	}
	testenv.Main(m)
}

// The "internet" of the tests: a namespace holding documentation
// addresses, reached from the host namespace through a veth.
var (
	upHost   = netip.MustParsePrefix("203.0.113.2/24") // the host's uplink address
	upServer = netip.MustParsePrefix("203.0.113.1/24") // a server "outside"
	upDenied = netip.MustParseAddr("203.0.113.200")    // another server, egress-denied
	metadata = netip.MustParseAddr("169.254.169.254")  // a cloud metadata address
	subnet   = "10.77.0.0/24"
)

// testbed is a Manager in a namespace of its own ("host"), with its leases
// in a fresh PostgreSQL database.
type testbed struct {
	t      testing.TB
	hostNS netns.NsHandle
	host   *netlink.Handle
	store  *postgres.Store
	m      *network.Manager
	cfg    network.Config
	dsn    string
}

func newTestbed(t testing.TB, cfg network.Config) *testbed {
	t.Helper()
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		testenv.Skip(t, "/dev/net/tun is missing: load the tun module (`modprobe tun`)")
	}
	b := &testbed{t: t, hostNS: testenv.NewNetns(t)}
	b.host = testenv.NetlinkAt(t, b.hostNS)
	dsn := testenv.Postgres(t)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	require.NoError(t, postgres.MigrateUp(ctx, dsn))
	st, err := postgres.Open(ctx, dsn)
	require.NoError(t, err)
	t.Cleanup(st.Close)
	b.store = st
	b.dsn = dsn
	cfg.Netns = testenv.NetnsPath(b.hostNS)
	cfg.Subnet = subnet
	cfg.Pool = "test/" + t.Name()
	b.cfg = cfg
	b.m, err = network.New(cfg, st)
	require.NoError(t, err)
	t.Cleanup(func() { b.m.Close() })
	return b
}

// addUplink makes the "internet" namespace and routes to it from the host
// namespace through the veth "up0".
func (b *testbed) addUplink() netns.NsHandle {
	t := b.t
	upNS := testenv.NewNetns(t)
	up := testenv.NetlinkAt(t, upNS)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "up0"}, PeerName: "wan0", PeerNamespace: netlink.NsFd(upNS)}
	require.NoError(t, b.host.LinkAdd(veth))
	hostEnd, err := b.host.LinkByName("up0")
	require.NoError(t, err)
	require.NoError(t, b.host.AddrAdd(hostEnd, addr(upHost)))
	require.NoError(t, b.host.LinkSetUp(hostEnd))
	wan, err := up.LinkByName("wan0")
	require.NoError(t, err)
	require.NoError(t, up.AddrAdd(wan, addr(upServer)))
	require.NoError(t, up.AddrAdd(wan, addr(netip.PrefixFrom(upDenied, 24))))
	require.NoError(t, up.LinkSetUp(wan))
	lo, err := up.LinkByName("lo")
	require.NoError(t, err)
	require.NoError(t, up.AddrAdd(lo, addr(netip.PrefixFrom(metadata, 32))))
	// Without the isolation rules the metadata address would be reachable.
	require.NoError(t, b.host.RouteAdd(&netlink.Route{Dst: ipnet(netip.MustParsePrefix("169.254.0.0/16")), Gw: upServer.Addr().AsSlice(), LinkIndex: hostEnd.Attrs().Index}))
	return upNS
}

// guest stands a veth in for a VM's TAP: its host end carries the port
// name (so Attach adopts it, through the same code that handles TAPs), and
// its other end, eth0 with the VM's MAC, is in a namespace of its own,
// configured by guestnet from the attachment's kernel argument.
type guest struct {
	id string
	ns netns.NsHandle
	a  *network.Attachment
}

func (b *testbed) addGuest() *guest {
	t := b.t
	g := &guest{id: uuid.NewString(), ns: testenv.NewNetns(t)}
	veth := &netlink.Veth{
		LinkAttrs:        netlink.LinkAttrs{Name: network.PortName(g.id)},
		PeerName:         "eth0",
		PeerHardwareAddr: network.MAC(g.id),
		PeerNamespace:    netlink.NsFd(g.ns),
	}
	require.NoError(t, b.host.LinkAdd(veth))
	a, err := b.m.Attach(t.Context(), g.id)
	require.NoError(t, err)
	g.a = a
	cfg, err := guestnet.Parse(a.GuestValue())
	require.NoError(t, err)
	cfg.ResolvConf = filepath.Join(t.TempDir(), "resolv.conf")
	var applyErr error
	testenv.InNetns(t, g.ns, func() { applyErr = guestnet.Apply(cfg) })
	require.NoError(t, applyErr)
	return g
}

// serve answers every TCP connection on addr inside ns with the address
// the connection came from, until t ends.
func serve(t *testing.T, ns netns.NsHandle, addr string) {
	t.Helper()
	var (
		l   net.Listener
		err error
	)
	testenv.InNetns(t, ns, func() { l, err = net.Listen("tcp4", addr) })
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s\n", c.RemoteAddr().(*net.TCPAddr).IP)
			c.Close()
		}
	}()
}

// dial connects from inside ns (from local when set) and returns what the
// server said: the address it saw.
func dial(t *testing.T, ns netns.NsHandle, local netip.Addr, addr string, timeout time.Duration) (string, error) {
	var (
		seen string
		err  error
	)
	testenv.InNetns(t, ns, func() {
		d := net.Dialer{Timeout: timeout}
		if local.IsValid() {
			d.LocalAddr = &net.TCPAddr{IP: local.AsSlice()}
		}
		var c net.Conn
		c, err = d.Dial("tcp4", addr)
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(timeout))
		seen, err = bufio.NewReader(c).ReadString('\n')
		seen = strings.TrimSpace(seen)
	})
	return seen, err
}

const (
	reachTimeout   = 5 * time.Second
	blockedTimeout = 700 * time.Millisecond
)

func TestDatapath(t *testing.T) {
	b := newTestbed(t, network.Config{Bridge: "br-test", Uplink: "up0", EgressDeny: []string{upDenied.String() + "/32"}, DNS: []string{"192.0.2.53"}})
	upNS := b.addUplink()
	require.NoError(t, b.m.Setup(t.Context()))
	serve(t, upNS, upServer.Addr().String()+":8080")
	serve(t, upNS, upDenied.String()+":8080")
	serve(t, upNS, metadata.String()+":80")
	serve(t, b.hostNS, b.m.Gateway().Addr().String()+":9090") // a host service on the bridge address
	serve(t, b.hostNS, upHost.Addr().String()+":9091")        // a host service on another host address

	ga, gb := b.addGuest(), b.addGuest()
	require.NotEqual(t, ga.a.IP, gb.a.IP)
	serve(t, gb.ns, gb.a.IP.Addr().String()+":8080")

	t.Run("NAT to the outside", func(t *testing.T) {
		seen, err := dial(t, ga.ns, netip.Addr{}, upServer.Addr().String()+":8080", reachTimeout)
		require.NoError(t, err)
		require.Equal(t, upHost.Addr().String(), seen, "the server sees the masqueraded address")
		seen, err = dial(t, gb.ns, netip.Addr{}, upServer.Addr().String()+":8080", reachTimeout)
		require.NoError(t, err)
		require.Equal(t, upHost.Addr().String(), seen)
	})
	blocked := []struct {
		name  string
		from  *guest
		local netip.Addr
		to    string
	}{
		{"another VM", ga, netip.Addr{}, gb.a.IP.Addr().String() + ":8080"},
		{"link-local metadata", ga, netip.Addr{}, metadata.String() + ":80"},
		{"a service on the bridge address", ga, netip.Addr{}, b.m.Gateway().Addr().String() + ":9090"},
		{"a service on another host address", ga, netip.Addr{}, upHost.Addr().String() + ":9091"},
		{"an egress-denied address", ga, netip.Addr{}, upDenied.String() + ":8080"},
		{"a spoofed source address", ga, gb.a.IP.Addr().Next().Next(), upServer.Addr().String() + ":8080"},
	}
	// The spoofed address must exist in the guest for the socket to bind.
	gaLink := testenv.NetlinkAt(t, ga.ns)
	eth0, err := gaLink.LinkByName("eth0")
	require.NoError(t, err)
	require.NoError(t, gaLink.AddrAdd(eth0, addr(netip.PrefixFrom(gb.a.IP.Addr().Next().Next(), 32))))
	for _, tc := range blocked {
		t.Run("blocked "+tc.name, func(t *testing.T) {
			_, err := dial(t, tc.from.ns, tc.local, tc.to, blockedTimeout)
			require.Error(t, err)
		})
	}
	t.Run("spoofed MAC", func(t *testing.T) {
		require.NoError(t, gaLink.LinkSetHardwareAddr(eth0, net.HardwareAddr{0x02, 1, 2, 3, 4, 5}))
		_, err := dial(t, ga.ns, netip.Addr{}, upServer.Addr().String()+":8080", blockedTimeout)
		require.Error(t, err)
		require.NoError(t, gaLink.LinkSetHardwareAddr(eth0, ga.a.MAC))
		_, err = dial(t, ga.ns, netip.Addr{}, upServer.Addr().String()+":8080", reachTimeout)
		require.NoError(t, err, "with its own MAC back the guest gets through again")
	})
}

func TestAttachIdempotent(t *testing.T) {
	ctx := t.Context()
	b := newTestbed(t, network.Config{Bridge: "br-test"})
	require.NoError(t, b.m.Setup(ctx))
	require.NoError(t, b.m.Setup(ctx), "Setup twice")
	id := uuid.NewString()
	a1, err := b.m.Attach(ctx, id)
	require.NoError(t, err)
	a2, err := b.m.Attach(ctx, id)
	require.NoError(t, err)
	require.Equal(t, a1, a2, "Attach twice returns the same attachment")
	require.Equal(t, "at"+strings.ReplaceAll(id, "-", "")[:12], a1.TAP)
	require.Equal(t, byte(0x02), a1.MAC[0], "locally administered unicast")
	require.Equal(t, "10.77.0.2/24", a1.IP.String())
	require.Equal(t, "aetherium.net=ip=10.77.0.2/24,gw=10.77.0.1,mac="+a1.MAC.String(), a1.KernelArg)
	st, err := b.m.List(ctx)
	require.NoError(t, err)
	require.Len(t, st.Ports, 1)
	require.Equal(t, network.Port{Name: a1.TAP, VMID: id, Kind: "tuntap", OnBridge: true, Up: true}, st.Ports[0])
	require.Equal(t, map[string]int{id: 8}, st.VMRules, "Attach twice does not duplicate rules")
	require.NoError(t, b.m.Setup(ctx), "Setup keeps the per-vm rules")
	st, err = b.m.List(ctx)
	require.NoError(t, err)
	require.Equal(t, map[string]int{id: 8}, st.VMRules)

	require.NoError(t, b.m.Detach(ctx, id))
	require.NoError(t, b.m.Detach(ctx, id), "Detach twice")
	st, err = b.m.List(ctx)
	require.NoError(t, err)
	require.Empty(t, st.Ports)
	require.Empty(t, st.VMRules)
	require.Empty(t, st.Leases)

	require.NoError(t, b.m.Teardown(ctx))
	require.NoError(t, b.m.Teardown(ctx), "Teardown twice")
	st, err = b.m.List(ctx)
	require.NoError(t, err)
	require.True(t, st.Empty(), "%+v", st)
}

// TestConcurrentAttach attaches 10 VMs at once through real TAPs: 10
// distinct addresses; after they are all detached no TAP, rule or lease
// remains, and after Teardown nothing at all.
func TestConcurrentAttach(t *testing.T) {
	ctx := t.Context()
	b := newTestbed(t, network.Config{Bridge: "br-test"})
	const n = 10
	ids := make([]string, n)
	atts := make([]*network.Attachment, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		ids[i] = uuid.NewString()
		wg.Go(func() { atts[i], errs[i] = b.m.Attach(ctx, ids[i]) })
	}
	wg.Wait()
	ips := map[netip.Prefix]bool{}
	taps := map[string]bool{}
	for i := range n {
		require.NoError(t, errs[i])
		ips[atts[i].IP] = true
		taps[atts[i].TAP] = true
	}
	require.Len(t, ips, n, "distinct addresses")
	require.Len(t, taps, n, "distinct TAPs")
	st, err := b.m.List(ctx)
	require.NoError(t, err)
	require.Len(t, st.Ports, n)
	require.Len(t, st.VMRules, n)
	require.Len(t, st.Leases, n)

	for i := range n {
		wg.Go(func() { errs[i] = b.m.Detach(ctx, ids[i]) })
	}
	wg.Wait()
	for i := range n {
		require.NoError(t, errs[i])
	}
	st, err = b.m.List(ctx)
	require.NoError(t, err)
	require.Empty(t, st.Ports)
	require.Empty(t, st.VMRules)
	require.Empty(t, st.Leases)
	links, err := b.host.LinkList()
	require.NoError(t, err)
	for _, l := range links {
		require.NotEqual(t, "tuntap", l.Type(), "tap %s left", l.Attrs().Name)
	}
	require.NoError(t, b.m.Teardown(ctx))
	st, err = b.m.List(ctx)
	require.NoError(t, err)
	require.True(t, st.Empty(), "%+v", st)
}

// TestReconcile leaves behind what crashes leave: a VM fully attached
// whose worker died, a TAP created but never labelled nor enslaved (the
// state a kill -9 inside Attach leaves), and a lease with no port at all.
// Reconcile removes all of it and keeps the live VM.
func TestReconcile(t *testing.T) {
	ctx := t.Context()
	b := newTestbed(t, network.Config{Bridge: "br-test"})
	live, dead, halfMade, leaseOnly := uuid.NewString(), uuid.NewString(), uuid.NewString(), uuid.NewString()
	for _, id := range []string{live, dead} {
		_, err := b.m.Attach(ctx, id)
		require.NoError(t, err)
	}
	tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: network.PortName(halfMade)}, Mode: netlink.TUNTAP_MODE_TAP}
	var err error
	testenv.InNetns(t, b.hostNS, func() { err = netlink.LinkAdd(tap) })
	require.NoError(t, err)
	for _, f := range tap.Fds {
		f.Close()
	}
	_, err = b.store.AllocateLease(ctx, network.LeaseRequest{Pool: b.m.Pool(), VMID: leaseOnly,
		Subnet: netip.MustParsePrefix(subnet), First: netip.MustParseAddr("10.77.0.100"), Last: netip.MustParseAddr("10.77.0.100")})
	require.NoError(t, err)

	st, err := b.m.List(ctx)
	require.NoError(t, err)
	require.Len(t, st.Ports, 3, "the half-made TAP is listed too")

	cleaned, err := b.m.Reconcile(ctx, []string{live})
	require.NoError(t, err)
	require.ElementsMatch(t, []string{dead, network.PortName(halfMade), leaseOnly}, cleaned)

	st, err = b.m.List(ctx)
	require.NoError(t, err)
	require.Len(t, st.Ports, 1)
	require.Equal(t, live, st.Ports[0].VMID)
	require.Equal(t, map[string]int{live: 8}, st.VMRules)
	require.Len(t, st.Leases, 1)
	require.Equal(t, live, st.Leases[0].VMID)

	cleaned, err = b.m.Reconcile(ctx, []string{live})
	require.NoError(t, err)
	require.Empty(t, cleaned, "Reconcile twice finds nothing more")
}

// TestKilledDuringAttach kills a process with SIGKILL while it attaches VMs
// in a loop, then checks that Reconcile (as a restarted worker runs it)
// leaves nothing of them, whatever step the kill hit.
func TestKilledDuringAttach(t *testing.T) {
	ctx := t.Context()
	b := newTestbed(t, network.Config{Bridge: "br-test"})
	require.NoError(t, b.m.Setup(ctx))
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=attach-loop", "CHILD_NETNS="+testenv.NetnsPath(b.hostNS),
		"CHILD_DSN="+b.dsn, "CHILD_POOL="+b.cfg.Pool)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	cmd.Stderr = os.Stderr
	require.NoError(t, cmd.Start())
	// Wait until the child has attached a few VMs, then kill it mid-loop.
	r := bufio.NewScanner(stdout)
	for range 3 {
		require.True(t, r.Scan(), "the child stopped early")
	}
	time.Sleep(7 * time.Millisecond) // land somewhere inside the next Attach
	require.NoError(t, cmd.Process.Kill())
	cmd.Wait()

	st, err := b.m.List(ctx)
	require.NoError(t, err)
	require.NotEmpty(t, st.Ports)
	_, err = b.m.Reconcile(ctx, nil)
	require.NoError(t, err)
	st, err = b.m.List(ctx)
	require.NoError(t, err)
	require.Empty(t, st.Ports)
	require.Empty(t, st.VMRules)
	require.Empty(t, st.Leases)
}

// TestPermissionDenied runs Setup in a child process without privileges
// (uid 65534, inside a test namespace): the error names the three ways out.
func TestPermissionDenied(t *testing.T) {
	ns := testenv.NewNetns(t)
	// The test binary sits in a private build directory; copy it where
	// the unprivileged child can run it.
	dir := t.TempDir()
	require.NoError(t, os.Chmod(dir, 0o755))
	bin := filepath.Join(dir, "network.test")
	data, err := os.ReadFile(os.Args[0])
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(bin, data, 0o755))
	for d := dir; d != "/" && d != "."; d = filepath.Dir(d) {
		if fi, err := os.Stat(d); err == nil && fi.Mode().Perm()&0o001 == 0 {
			require.NoError(t, os.Chmod(d, fi.Mode().Perm()|0o011))
		}
	}
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = []string{childEnv + "=setup", "PATH=/usr/bin:/bin"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	var out []byte
	testenv.InNetns(t, ns, func() { out, err = cmd.CombinedOutput() })
	require.Error(t, err, "setup must fail without privileges: %s", out)
	require.Contains(t, string(out), "ErrUnavailable")
	require.Contains(t, string(out), "Permission denied (network operations)")
	require.Contains(t, string(out), "run the worker as root")
	require.Contains(t, string(out), "CAP_NET_ADMIN")
	require.Contains(t, string(out), "aether-cli network setup")
}

// childMain is the test binary as a child process.
func childMain(mode string) int {
	ctx := context.Background()
	switch mode {
	case "setup":
		m, err := network.New(network.Config{Bridge: "br-test"}, nil)
		if err == nil {
			err = m.Setup(ctx)
		}
		if err == nil {
			return 0
		}
		if errors.Is(err, types.ErrUnavailable) {
			fmt.Println("ErrUnavailable")
		}
		fmt.Println(err)
		return 1
	case "attach-loop":
		st, err := postgres.Open(ctx, os.Getenv("CHILD_DSN"))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		m, err := network.New(network.Config{Bridge: "br-test", Subnet: subnet, Netns: os.Getenv("CHILD_NETNS"), Pool: os.Getenv("CHILD_POOL")}, st)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		for {
			if _, err := m.Attach(ctx, uuid.NewString()); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			fmt.Println("attached")
		}
	}
	return 2
}

func ipnet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func addr(p netip.Prefix) *netlink.Addr { return &netlink.Addr{IPNet: ipnet(p)} }

// BenchmarkAttachDetach times giving one VM its network (lease, rules, TAP
// on the bridge) and taking it away again, against real PostgreSQL.
func BenchmarkAttachDetach(b *testing.B) {
	tb := newTestbed(b, network.Config{Bridge: "br-bench"})
	ctx := b.Context()
	require.NoError(b, tb.m.Setup(ctx))
	var attach []time.Duration
	testenv.Measure(b, func() {
		id := uuid.NewString()
		start := time.Now()
		if _, err := tb.m.Attach(ctx, id); err != nil {
			b.Fatal(err)
		}
		attach = append(attach, time.Since(start))
		if err := tb.m.Detach(ctx, id); err != nil {
			b.Fatal(err)
		}
	})
	slices.Sort(attach)
	if len(attach) > 0 {
		b.ReportMetric(float64(attach[len(attach)/2].Microseconds())/1000, "attach-median-ms")
	}
}

// TestTAPOwner: TAPs belong to the configured user, so a VMM running as
// that user without CAP_NET_ADMIN (Firecracker under its jailer) can open
// them.
func TestTAPOwner(t *testing.T) {
	ctx := t.Context()
	b := newTestbed(t, network.Config{Bridge: "br-own", TAPOwner: 65534, TAPGroup: 65534})
	id := uuid.NewString()
	a, err := b.m.Attach(ctx, id)
	require.NoError(t, err)
	l, err := b.host.LinkByName(a.TAP)
	require.NoError(t, err)
	tap, ok := l.(*netlink.Tuntap)
	require.True(t, ok, "the port is a %T", l)
	require.EqualValues(t, 65534, tap.Owner)
	require.EqualValues(t, 65534, tap.Group)
	require.NoError(t, b.m.Detach(ctx, id))
}
