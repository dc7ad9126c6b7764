package qemu_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
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
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

// The test network. Everything lives in namespaces the tests make: "host"
// holds the bridge, the TAPs, the NAT rules and the QEMU processes;
// "uplink" is the outside world, reached from host through a veth.
var (
	netSubnet  = "10.78.0.0/24"
	upHost     = netip.MustParsePrefix("203.0.113.2/24") // host's uplink address: what NAT turns guests into
	upServer   = netip.MustParsePrefix("203.0.113.1/24") // a server outside
	metadataIP = netip.MustParseAddr("169.254.169.254")  // a cloud metadata address, served in host
	outsideIP  = netip.MustParseAddr("198.51.100.7")     // a source address of nobody's
)

// Ports of the servers.
const (
	portEcho   = 8080 // uplink: answers each connection with the peer's address
	portUDP    = 9000 // uplink: records each datagram
	portSink   = 8082 // uplink: counts the bytes of each connection
	portHost   = 9090 // host, on the gateway address
	portMeta   = 80   // host, on metadataIP
	portVMEcho = 7000 // a guest's own listener
)

// nettestbed is a qemu Orchestrator with a network Manager, its leases in
// a fresh PostgreSQL database, inside namespaces of its own.
type nettestbed struct {
	t       testing.TB
	hostNS  netns.NsHandle
	upNS    netns.NsHandle
	host    *netlink.Handle
	store   *postgres.Store
	m       *network.Manager
	o       *qemu.Orchestrator
	dsn     string
	netCfg  network.Config
	dir     string
	udp     *datagrams
	sink    *sink
	nettool string
}

func newNetTestbed(t testing.TB) *nettestbed {
	t.Helper()
	requireHost(t)
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		testenv.Skip(t, "/dev/net/tun is missing: load the tun module (`modprobe tun`)")
	}
	testenv.GuestImage(t) // built before the namespaces, which outlive nothing
	b := &nettestbed{t: t, hostNS: testenv.NewNetns(t), upNS: testenv.NewNetns(t), dir: runDir(t)}
	b.host = testenv.NetlinkAt(t, b.hostNS)
	b.addUplink()

	b.dsn = testenv.Postgres(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	require.NoError(t, postgres.MigrateUp(ctx, b.dsn))
	st, err := postgres.Open(ctx, b.dsn)
	require.NoError(t, err)
	t.Cleanup(st.Close)
	b.store = st
	b.netCfg = network.Config{
		Bridge: "br-q", Subnet: netSubnet, Uplink: "up0",
		Netns: testenv.NetnsPath(b.hostNS), Pool: "test/" + t.Name(),
	}
	b.m, err = network.New(b.netCfg, st)
	require.NoError(t, err)
	t.Cleanup(func() { b.m.Close() })
	b.o = b.orchestrator()
	// Registered after the namespaces, so it runs before they close: no
	// QEMU outlives the test.
	t.Cleanup(func() { deleteAll(t, b.o) })

	b.nettool = buildNettool(t)
	b.udp = serveUDP(t, b.upNS, netip.AddrPortFrom(upServer.Addr(), portUDP))
	b.sink = serveSink(t, b.upNS, netip.AddrPortFrom(upServer.Addr(), portSink))
	serveEcho(t, b.upNS, netip.AddrPortFrom(upServer.Addr(), portEcho))
	return b
}

// orchestrator makes a qemu Orchestrator on the testbed's run directory
// and network, as a (re)started worker does.
func (b *nettestbed) orchestrator() *qemu.Orchestrator {
	t := b.t
	m := testenv.GuestImage(t)
	o, err := qemu.New(context.Background(), qemu.Config{
		KernelPath:   m.KernelPath(),
		InitrdPath:   m.InitrdPath(),
		RootfsPath:   m.RootfsPath(),
		RunDir:       b.dir,
		Jail:         jailConfig(t),
		ReadyTimeout: 4 * time.Minute,
		Network:      b.m,
		Logger:       slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	require.NoError(t, err)
	t.Cleanup(func() { o.Close() })
	return o
}

// addUplink connects host and uplink with the veth up0 (host) / wan0
// (uplink). Both sides get default routes, so that neither namespace's
// reverse-path filter could be what drops a spoofed packet: only the
// isolation rules may.
func (b *nettestbed) addUplink() {
	t := b.t
	up := testenv.NetlinkAt(t, b.upNS)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "up0"}, PeerName: "wan0", PeerNamespace: netlink.NsFd(b.upNS)}
	require.NoError(t, b.host.LinkAdd(veth))
	hostEnd, err := b.host.LinkByName("up0")
	require.NoError(t, err)
	require.NoError(t, b.host.AddrAdd(hostEnd, nladdr(upHost)))
	require.NoError(t, b.host.LinkSetUp(hostEnd))
	wan, err := up.LinkByName("wan0")
	require.NoError(t, err)
	require.NoError(t, up.AddrAdd(wan, nladdr(upServer)))
	require.NoError(t, up.LinkSetUp(wan))
	require.NoError(t, b.host.RouteAdd(&netlink.Route{Gw: upServer.Addr().AsSlice(), LinkIndex: hostEnd.Attrs().Index}))
	require.NoError(t, up.RouteAdd(&netlink.Route{Gw: upHost.Addr().AsSlice(), LinkIndex: wan.Attrs().Index}))
	// The metadata address is the host's own, as on a cloud VM.
	lo, err := b.host.LinkByName("lo")
	require.NoError(t, err)
	require.NoError(t, b.host.AddrAdd(lo, nladdr(netip.PrefixFrom(metadataIP, 32))))
}

func nladdr(p netip.Prefix) *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}}
}

var (
	nettoolOnce sync.Once
	nettoolPath string
	nettoolErr  error
)

// buildNettool builds testdata/nettool statically, once per test binary.
func buildNettool(t testing.TB) string {
	nettoolOnce.Do(func() {
		dir, err := os.MkdirTemp("", "nettool")
		if err != nil {
			nettoolErr = err
			return
		}
		testenv.AtExit(func() { os.RemoveAll(dir) })
		nettoolPath = filepath.Join(dir, "nettool")
		cmd := exec.Command("go", "build", "-o", nettoolPath, "./testdata/nettool")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			nettoolErr = fmt.Errorf("building nettool: %v\n%s", err, out)
		}
	})
	require.NoError(t, nettoolErr)
	return nettoolPath
}

// listenIn opens a listener inside ns.
func listenIn(t testing.TB, ns netns.NsHandle, network, addr string) (l net.Listener, pc net.PacketConn) {
	t.Helper()
	var err error
	testenv.InNetns(t, ns, func() {
		if network == "udp4" {
			pc, err = net.ListenPacket(network, addr)
		} else {
			l, err = net.Listen(network, addr)
		}
	})
	require.NoError(t, err)
	t.Cleanup(func() {
		if l != nil {
			l.Close()
		}
		if pc != nil {
			pc.Close()
		}
	})
	return l, pc
}

// serveEcho answers each TCP connection on addr in ns with the address the
// connection came from.
func serveEcho(t testing.TB, ns netns.NsHandle, addr netip.AddrPort) {
	l, _ := listenIn(t, ns, "tcp4", addr.String())
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

// datagrams records what a UDP socket receives.
type datagrams struct {
	mu  sync.Mutex
	got map[string]string // payload -> source address
}

func serveUDP(t testing.TB, ns netns.NsHandle, addr netip.AddrPort) *datagrams {
	_, pc := listenIn(t, ns, "udp4", addr.String())
	d := &datagrams{got: map[string]string{}}
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			d.mu.Lock()
			d.got[string(buf[:n])] = from.(*net.UDPAddr).IP.String()
			d.mu.Unlock()
		}
	}()
	return d
}

func (d *datagrams) from(payload string) (string, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	src, ok := d.got[payload]
	return src, ok
}

// sink counts the bytes of each connection and times them, from accept to
// the sender's end of stream, on the host's clock (the guest's is
// emulated).
type sink struct {
	mu    sync.Mutex
	rates []float64 // MB/s of each connection
}

func serveSink(t testing.TB, ns netns.NsHandle, addr netip.AddrPort) *sink {
	l, _ := listenIn(t, ns, "tcp4", addr.String())
	s := &sink{}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				start := time.Now()
				n, _ := io.Copy(io.Discard, c)
				d := time.Since(start)
				s.mu.Lock()
				s.rates = append(s.rates, float64(n)/1e6/d.Seconds())
				s.mu.Unlock()
				fmt.Fprintf(c, "%d\n", n)
			}()
		}
	}()
	return s
}

// vm is a nat VM of the testbed with nettool in it.
type vm struct {
	id string
	ip netip.Addr
}

// startVMs creates and boots n nat VMs at once, copies nettool into each
// and returns them with the addresses the network gave them.
func (b *nettestbed) startVMs(n int) []vm {
	t := b.t
	ctx := context.Background()
	vms := make([]vm, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		vms[i].id = uuid.NewString()
		wg.Go(func() {
			sp := types.VMSpec{ID: vms[i].id, Name: fmt.Sprintf("net-%d", i), VCPUs: 1, MemoryMB: 128, Network: types.NetworkNAT}
			if _, errs[i] = b.o.CreateVM(ctx, sp); errs[i] != nil {
				return
			}
			if errs[i] = b.o.StartVM(ctx, sp.ID); errs[i] != nil {
				return
			}
			errs[i] = b.copyNettool(ctx, sp.ID)
		})
	}
	wg.Wait()
	for i := range n {
		require.NoError(t, errs[i], "vm %d", i)
	}
	leases := b.leases()
	for i := range vms {
		vms[i].ip = leases[vms[i].id]
		require.True(t, vms[i].ip.IsValid(), "vm %s holds no lease", vms[i].id)
	}
	return vms
}

func (b *nettestbed) copyNettool(ctx context.Context, id string) error {
	c, err := b.o.Agent(id)
	if err != nil {
		return err
	}
	f, err := os.Open(b.nettool)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = c.WriteFile(ctx, "/usr/local/bin/nettool", f, types.FileOptions{Mode: 0o755, MakeParents: true})
	return err
}

// leases maps VM ids to their addresses.
func (b *nettestbed) leases() map[string]netip.Addr {
	st, err := b.m.List(context.Background())
	require.NoError(b.t, err)
	out := map[string]netip.Addr{}
	for _, l := range st.Leases {
		out[l.VMID] = l.Addr
	}
	return out
}

// run runs nettool (or any command) in a guest and returns its result.
func run(t testing.TB, o vmm.VMOrchestrator, id string, args ...string) *types.ExecResult {
	t.Helper()
	res, err := o.ExecuteCommand(context.Background(), id, types.Command{Cmd: args[0], Args: args[1:], Timeout: time.Minute}, vmm.ExecIO{})
	require.NoError(t, err)
	return res
}

func out(r *types.ExecResult) string { return strings.TrimSpace(string(r.Stdout)) }

// requireEmpty checks that the network holds no TAP, rule or lease.
func (b *nettestbed) requireEmpty() {
	t := b.t
	st, err := b.m.List(context.Background())
	require.NoError(t, err)
	require.Empty(t, st.Ports, "ports left")
	require.Empty(t, st.VMRules, "nft rules left")
	require.Empty(t, st.Leases, "leases left")
	links, err := b.host.LinkList()
	require.NoError(t, err)
	for _, l := range links {
		require.NotEqual(t, "tuntap", l.Type(), "tap %s left", l.Attrs().Name)
	}
}

// TestNetworkGuests boots 10 nat VMs at once and checks, with real guests:
// distinct addresses configured in each guest, NAT to the outside, no way
// to another VM, to the metadata address or to the host, spoofed sources
// dropped, and nothing left after they are deleted.
func TestNetworkGuests(t *testing.T) {
	b := newNetTestbed(t)
	ctx := t.Context()
	start := time.Now()
	vms := b.startVMs(10)
	t.Logf("10 nat vms created and booted in %s", time.Since(start).Round(time.Millisecond))
	ips := map[netip.Addr]bool{}
	for _, v := range vms {
		ips[v.ip] = true
	}
	require.Len(t, ips, 10, "distinct addresses")
	a, bb := vms[0], vms[1]
	gw := b.m.Gateway().Addr()

	t.Run("the guest has its address and route", func(t *testing.T) {
		for _, v := range vms {
			require.Equal(t, netip.PrefixFrom(v.ip, 24).String(), out(run(t, b.o, v.id, "nettool", "addr", "eth0")))
			require.Equal(t, network.MAC(v.id).String(), out(run(t, b.o, v.id, "cat", "/sys/class/net/eth0/address")))
		}
		console, err := os.ReadFile(filepath.Join(b.o.RunDir(a.id), "console.log"))
		require.NoError(t, err)
		require.Contains(t, string(console), `msg="network configured" config="ip=`+netip.PrefixFrom(a.ip, 24).String(), "the init logs the network it set up")
		// /proc/net/route: the default route (destination 0) via the gateway, in little-endian hex.
		g := gw.As4()
		require.Contains(t, out(run(t, b.o, a.id, "cat", "/proc/net/route")), fmt.Sprintf("eth0\t00000000\t%02X%02X%02X%02X", g[3], g[2], g[1], g[0]))
	})
	t.Run("NAT to the outside", func(t *testing.T) {
		for _, v := range vms[:2] {
			r := run(t, b.o, v.id, "nettool", "dial", netip.AddrPortFrom(upServer.Addr(), portEcho).String(), "10s")
			require.Equal(t, 0, r.ExitCode, "stderr: %s", r.Stderr)
			require.Equal(t, upHost.Addr().String(), out(r), "the server sees the translated address, not %s", v.ip)
		}
	})
	t.Run("no way to another VM", func(t *testing.T) {
		pctx, cancel := context.WithCancel(ctx)
		defer cancel()
		c, err := b.o.Agent(bb.id)
		require.NoError(t, err)
		var lout bytes.Buffer
		p, err := c.Start(pctx, types.Command{Cmd: "nettool", Args: []string{"listen", netip.AddrPortFrom(bb.ip, portVMEcho).String()}, Env: map[string]string{"PATH": "/usr/local/bin"}}, nil, &lout, nil)
		require.NoError(t, err)
		defer p.Signal(syscall.SIGKILL)
		// The listener is real: B reaches it itself.
		require.Eventually(t, func() bool {
			r := run(t, b.o, bb.id, "nettool", "dial", netip.AddrPortFrom(bb.ip, portVMEcho).String(), "2s")
			return r.ExitCode == 0 && out(r) == bb.ip.String()
		}, 30*time.Second, 200*time.Millisecond)
		r := run(t, b.o, a.id, "nettool", "dial", netip.AddrPortFrom(bb.ip, portVMEcho).String(), "2s")
		require.NotEqual(t, 0, r.ExitCode, "A reached B: %s", r.Stdout)
	})
	t.Run("no way to the metadata address or the host", func(t *testing.T) {
		meta := netip.AddrPortFrom(metadataIP, portMeta)
		hostSvc := netip.AddrPortFrom(gw, portHost)
		serveEcho(t, b.hostNS, meta)
		serveEcho(t, b.hostNS, hostSvc)
		// Both services are real: the host reaches them.
		for _, s := range []netip.AddrPort{meta, hostSvc} {
			var err error
			testenv.InNetns(t, b.hostNS, func() {
				var c net.Conn
				if c, err = net.DialTimeout("tcp4", s.String(), 2*time.Second); err == nil {
					c.Close()
				}
			})
			require.NoError(t, err, "the host cannot reach its own %s", s)
			r := run(t, b.o, a.id, "nettool", "dial", s.String(), "2s")
			require.NotEqual(t, 0, r.ExitCode, "the guest reached %s: %s", s, r.Stdout)
		}
	})
	t.Run("spoofed source addresses are dropped", func(t *testing.T) {
		dst := netip.AddrPortFrom(upServer.Addr(), portUDP).String()
		for _, tc := range []struct{ src, msg string }{
			{bb.ip.String(), "spoof-another-vm"},
			{outsideIP.String(), "spoof-outside"},
			{a.ip.String(), "own-address"}, // the control, sent last
		} {
			r := run(t, b.o, a.id, "nettool", "spoof", tc.src, dst, tc.msg)
			require.Equal(t, 0, r.ExitCode, "stderr: %s", r.Stderr)
		}
		require.Eventually(t, func() bool { _, ok := b.udp.from("own-address"); return ok }, 10*time.Second, 20*time.Millisecond,
			"the raw datagram with the guest's own address never arrived")
		src, _ := b.udp.from("own-address")
		require.Equal(t, upHost.Addr().String(), src)
		time.Sleep(300 * time.Millisecond)
		for _, msg := range []string{"spoof-another-vm", "spoof-outside"} {
			src, ok := b.udp.from(msg)
			require.False(t, ok, "%s arrived from %s", msg, src)
		}
	})

	start = time.Now()
	var wg sync.WaitGroup
	errs := make([]error, len(vms))
	for i, v := range vms {
		wg.Go(func() { errs[i] = b.o.DeleteVM(context.Background(), v.id) })
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	t.Logf("10 nat vms deleted in %s", time.Since(start).Round(time.Millisecond))
	b.requireEmpty()
	require.NoError(t, b.m.Teardown(ctx))
	st, err := b.m.List(ctx)
	require.NoError(t, err)
	require.True(t, st.Empty(), "%+v", st)
}

// TestNetworkNotConfigured: a nat VM on a backend without a network
// manager is refused with a hint, and the capability says so.
func TestNetworkNotConfigured(t *testing.T) {
	o := newOrchestrator(t, runDir(t))
	require.False(t, o.Capabilities().Networking)
	sp := vmmtest.NewSpec(t)
	sp.Network = types.NetworkNAT
	_, err := o.CreateVM(t.Context(), sp)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.Contains(t, err.Error(), "--network none")
	_, err = o.GetVMStatus(t.Context(), sp.ID)
	require.ErrorIs(t, err, types.ErrNotFound)
}

// BenchmarkGuestThroughput measures TCP throughput from a nat guest,
// through the bridge and NAT, to a server in the uplink namespace: the
// guest sends benchBytes with nettool, timed by the server.
func BenchmarkGuestThroughput(b *testing.B) {
	tb := newNetTestbed(b)
	v := tb.startVMs(1)[0]
	const benchBytes = 64 << 20
	dst := netip.AddrPortFrom(upServer.Addr(), portSink).String()
	for b.Loop() {
		r := run(b, tb.o, v.id, "nettool", "send", dst, fmt.Sprint(benchBytes))
		if r.ExitCode != 0 || out(r) != fmt.Sprint(benchBytes) {
			b.Fatalf("send: exit %d, %q %s", r.ExitCode, r.Stdout, r.Stderr)
		}
	}
	tb.sink.mu.Lock()
	rates := slices.Clone(tb.sink.rates)
	tb.sink.mu.Unlock()
	slices.Sort(rates)
	if len(rates) > 0 {
		b.ReportMetric(rates[len(rates)/2], "median-MB/s")
		b.ReportMetric(rates[0], "min-MB/s")
	}
}
