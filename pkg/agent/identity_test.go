package agent

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mdlayher/arp"
	"github.com/mdlayher/ethernet"
	"github.com/mdlayher/packet"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// fakeIdentity records what SetIdentity does instead of changing the
// machine the tests run on. Files are written for real, under root.
type fakeIdentity struct {
	root, runDir string
	now          time.Time
	// readOnly directories (relative to root) refuse replace with EROFS.
	readOnly map[string]bool

	mu    sync.Mutex
	calls []string
}

func newFakeIdentity(t *testing.T) *fakeIdentity {
	f := &fakeIdentity{
		root:     t.TempDir(),
		runDir:   filepath.Join(t.TempDir(), "run"),
		now:      time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC),
		readOnly: map[string]bool{},
	}
	require.NoError(t, os.MkdirAll(filepath.Join(f.root, "etc"), 0o755))
	return f
}

func (f *fakeIdentity) record(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, fmt.Sprintf(format, args...))
}

func (f *fakeIdentity) takeCalls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.calls
	f.calls = nil
	return c
}

// rel names path relative to the fake's root or run dir.
func (f *fakeIdentity) rel(path string) string {
	if r, err := filepath.Rel(f.root, path); err == nil && !strings.HasPrefix(r, "..") {
		return r
	}
	r, _ := filepath.Rel(f.runDir, path)
	return "run/" + r
}

func (f *fakeIdentity) sys() identitySys {
	return identitySys{
		root:   f.root,
		runDir: f.runDir,
		now:    func() time.Time { return f.now },
		setClock: func(t time.Time) error {
			f.record("clock %d", t.UnixNano())
			return nil
		},
		addEntropy: func(b []byte) error {
			f.record("entropy %d", len(b))
			return nil
		},
		reseedCRNG: func() error {
			f.record("reseed")
			return nil
		},
		setHostname: func(name string) error {
			f.record("hostname %s", name)
			return nil
		},
		replace: func(path string, data []byte, mode fs.FileMode) error {
			f.record("replace %s", f.rel(path))
			if r, _ := filepath.Rel(f.root, filepath.Dir(path)); f.readOnly[r] {
				return &fs.PathError{Op: "open", Path: path, Err: unix.EROFS}
			}
			return replaceFile(path, data, mode)
		},
		bindMount: func(src, dst string) error {
			f.record("bind %s %s", f.rel(src), f.rel(dst))
			return nil
		},
		setNetwork: func(n netIdentity) error {
			f.record("net iface=%q current=%s mac=%s addr=%s gw=%s dns=%v", n.iface, n.current, n.mac, n.addr, n.gateway, n.dns)
			return nil
		},
	}
}

// startIdentityAgent serves an agent whose SetIdentity acts on f.
func startIdentityAgent(t *testing.T, f *fakeIdentity) (*Client, *Server) {
	c, srv := startAgent(t, ServerConfig{})
	srv.idsys = f.sys()
	return c, srv
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	require.NoError(t, os.WriteFile(path, []byte(content), 0o444))
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}

func TestSetIdentityOrderAndIdempotence(t *testing.T) {
	f := newFakeIdentity(t)
	writeFile(t, filepath.Join(f.root, hostnameFile), "template\n")
	writeFile(t, filepath.Join(f.root, machineIDFile), "0123456789abcdef0123456789abcdef\n")
	writeFile(t, filepath.Join(f.root, dbusMachineIDFile), "0123456789abcdef0123456789abcdef\n")
	c, _ := startIdentityAgent(t, f)

	id := Identity{
		Hostname:  "clone-1",
		MachineID: NewMachineID(),
		Entropy:   make([]byte, 64),
		Time:      f.now.Add(90 * time.Second),
		Net: &NetIdentity{
			MAC:     net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 7},
			Addr:    netip.MustParsePrefix("10.88.0.7/16"),
			Gateway: netip.MustParseAddr("10.88.0.1"),
			DNS:     []netip.Addr{netip.MustParseAddr("192.0.2.53")},
		},
	}
	require.NoError(t, c.SetIdentity(t.Context(), id))
	clock := fmt.Sprintf("clock %d", id.Time.UnixNano())
	network := `net iface="" current= mac=02:aa:00:00:00:07 addr=10.88.0.7/16 gw=10.88.0.1 dns=[192.0.2.53]`
	require.Equal(t, []string{
		clock, "entropy 64", "reseed", "hostname clone-1",
		"replace etc/hostname", "replace etc/machine-id", "replace var/lib/dbus/machine-id",
		network,
	}, f.takeCalls())
	require.Equal(t, "clone-1\n", readFile(t, filepath.Join(f.root, hostnameFile)))
	require.Equal(t, id.MachineID+"\n", readFile(t, filepath.Join(f.root, machineIDFile)))
	require.Equal(t, id.MachineID+"\n", readFile(t, filepath.Join(f.root, dbusMachineIDFile)))
	fi, err := os.Stat(filepath.Join(f.root, machineIDFile))
	require.NoError(t, err)
	require.Equal(t, fs.FileMode(0o444), fi.Mode().Perm(), "the file keeps its mode")
	entries, err := os.ReadDir(filepath.Join(f.root, "etc"))
	require.NoError(t, err)
	require.Len(t, entries, 2, "no temporary file is left: %v", entries)

	// Again: the files already hold the identity and are not rewritten.
	require.NoError(t, c.SetIdentity(t.Context(), id))
	require.Equal(t, []string{clock, "entropy 64", "reseed", "hostname clone-1", network}, f.takeCalls())
	require.Equal(t, id.MachineID+"\n", readFile(t, filepath.Join(f.root, machineIDFile)))
}

func TestSetIdentityReportsClockStep(t *testing.T) {
	f := newFakeIdentity(t)
	c, _ := startIdentityAgent(t, f)
	resp, err := c.api.SetIdentity(t.Context(), &agentpb.SetIdentityRequest{UnixNano: f.now.Add(-1500 * time.Millisecond).UnixNano()})
	require.NoError(t, err)
	require.Equal(t, int64(-1500*time.Millisecond), resp.GetClockStepNanos())
	require.Len(t, f.takeCalls(), 1)
}

func TestSetIdentityEmptyChangesNothing(t *testing.T) {
	f := newFakeIdentity(t)
	writeFile(t, filepath.Join(f.root, hostnameFile), "template\n")
	c, _ := startIdentityAgent(t, f)
	resp, err := c.api.SetIdentity(t.Context(), &agentpb.SetIdentityRequest{})
	require.NoError(t, err)
	require.Zero(t, resp.GetClockStepNanos())
	require.Empty(t, resp.GetSkipped())
	require.Empty(t, f.takeCalls())
	require.Equal(t, "template\n", readFile(t, filepath.Join(f.root, hostnameFile)))
}

func TestSyncClockOnlyStepsTheClock(t *testing.T) {
	f := newFakeIdentity(t)
	c, _ := startIdentityAgent(t, f)
	before := time.Now()
	require.NoError(t, c.SyncClock(t.Context()))
	calls := f.takeCalls()
	require.Len(t, calls, 1)
	var ns int64
	_, err := fmt.Sscanf(calls[0], "clock %d", &ns)
	require.NoError(t, err)
	require.WithinRange(t, time.Unix(0, ns), before, time.Now())
}

func TestSetIdentityRefusesBadInput(t *testing.T) {
	f := newFakeIdentity(t)
	writeFile(t, filepath.Join(f.root, hostnameFile), "template\n")
	c, _ := startIdentityAgent(t, f)
	goodID := NewMachineID()
	net := func(n *agentpb.NetworkIdentity) *agentpb.SetIdentityRequest {
		if n.Address == "" {
			n.Address = "10.88.0.7/16"
		}
		// Each bad request also carries good fields: none may take effect.
		return &agentpb.SetIdentityRequest{Hostname: "ok", MachineId: goodID, UnixNano: 1, Network: n}
	}
	for name, tc := range map[string]struct {
		req  *agentpb.SetIdentityRequest
		want string
	}{
		"hostname with a dot":   {&agentpb.SetIdentityRequest{Hostname: "a.b", UnixNano: 1}, "hostname"},
		"hostname too long":     {&agentpb.SetIdentityRequest{Hostname: strings.Repeat("a", 64)}, "hostname"},
		"machine id upper case": {&agentpb.SetIdentityRequest{MachineId: strings.ToUpper(goodID)}, "machine id"},
		"machine id short":      {&agentpb.SetIdentityRequest{MachineId: goodID[:31]}, "32"},
		"machine id zero":       {&agentpb.SetIdentityRequest{MachineId: strings.Repeat("0", 32)}, "all zero"},
		"machine id not hex":    {&agentpb.SetIdentityRequest{MachineId: "g" + goodID[1:]}, "hex"},
		"entropy too large":     {&agentpb.SetIdentityRequest{Entropy: make([]byte, MaxIdentityEntropy+1), Hostname: "ok"}, "at most 512"},
		"time before 1970":      {&agentpb.SetIdentityRequest{UnixNano: -1}, "1970"},
		"address not CIDR":      {net(&agentpb.NetworkIdentity{Address: "10.88.0.7"}), "prefix length"},
		"address IPv6":          {net(&agentpb.NetworkIdentity{Address: "fd00::7/64"}), "IPv4"},
		"address of the subnet": {net(&agentpb.NetworkIdentity{Address: "10.88.0.0/16"}), "host address"},
		"gateway outside":       {net(&agentpb.NetworkIdentity{Gateway: "10.89.0.1"}), "gateway"},
		"gateway is the guest":  {net(&agentpb.NetworkIdentity{Gateway: "10.88.0.7"}), "gateway"},
		"gateway garbage":       {net(&agentpb.NetworkIdentity{Gateway: "x"}), "gateway"},
		"mac garbage":           {net(&agentpb.NetworkIdentity{Mac: "02:aa"}), "mac"},
		"mac multicast":         {net(&agentpb.NetworkIdentity{Mac: "03:aa:00:00:00:01"}), "unicast"},
		"current mac zero":      {net(&agentpb.NetworkIdentity{CurrentMac: "00:00:00:00:00:00"}), "current_mac"},
		"dns garbage":           {net(&agentpb.NetworkIdentity{Dns: []string{"192.0.2.53", "dns.example"}}), "dns"},
		"interface with slash":  {net(&agentpb.NetworkIdentity{Interface: "../eth0"}), "interface"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := c.api.SetIdentity(t.Context(), tc.req)
			require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
			require.Contains(t, status.Convert(err).Message(), tc.want)
			require.Empty(t, f.takeCalls(), "a refused request has no effect")
		})
	}
	require.Equal(t, "template\n", readFile(t, filepath.Join(f.root, hostnameFile)))

	// Through the client, refusals are types.ErrInvalid; a network
	// without an address does not leave the host.
	err := c.SetIdentity(t.Context(), Identity{MachineID: "nope"})
	require.ErrorIs(t, err, types.ErrInvalid)
	err = c.SetIdentity(t.Context(), Identity{Hostname: "ok", Net: &NetIdentity{}})
	require.ErrorIs(t, err, types.ErrInvalid)
	require.Empty(t, f.takeCalls())
}

func TestSetIdentityReadOnlyEtc(t *testing.T) {
	f := newFakeIdentity(t)
	writeFile(t, filepath.Join(f.root, machineIDFile), "0123456789abcdef0123456789abcdef\n")
	f.readOnly["etc"] = true
	c, _ := startIdentityAgent(t, f)
	id := NewMachineID()
	resp, err := c.api.SetIdentity(t.Context(), &agentpb.SetIdentityRequest{Hostname: "clone-2", MachineId: id})
	require.NoError(t, err)
	// /etc/hostname is missing and cannot be made; the machine id gets a
	// copy mounted over it.
	require.Len(t, resp.GetSkipped(), 1)
	require.Contains(t, resp.GetSkipped()[0], "/etc/hostname")
	require.Equal(t, []string{
		"hostname clone-2", "replace etc/hostname",
		"replace etc/machine-id", "replace run/etc_machine-id", "bind run/etc_machine-id etc/machine-id",
	}, f.takeCalls())
	require.Equal(t, id+"\n", readFile(t, filepath.Join(f.runDir, "etc_machine-id")))
	_, err = os.Stat(filepath.Join(f.root, hostnameFile))
	require.ErrorIs(t, err, fs.ErrNotExist)
}

func TestSetIdentityLeavesDbusSymlink(t *testing.T) {
	f := newFakeIdentity(t)
	writeFile(t, filepath.Join(f.root, machineIDFile), "0123456789abcdef0123456789abcdef\n")
	dbus := filepath.Join(f.root, dbusMachineIDFile)
	require.NoError(t, os.MkdirAll(filepath.Dir(dbus), 0o755))
	require.NoError(t, os.Symlink("../../../etc/machine-id", dbus))
	c, _ := startIdentityAgent(t, f)
	id := NewMachineID()
	require.NoError(t, c.SetIdentity(t.Context(), Identity{MachineID: id}))
	require.Equal(t, []string{"replace etc/machine-id"}, f.takeCalls())
	require.Equal(t, id+"\n", readFile(t, dbus), "the link follows /etc/machine-id")
	fi, err := os.Lstat(dbus)
	require.NoError(t, err)
	require.Equal(t, fs.ModeSymlink, fi.Mode().Type())
}

func TestSetIdentityStopsAtAFailure(t *testing.T) {
	f := newFakeIdentity(t)
	c, srv := startIdentityAgent(t, f)
	sys := f.sys()
	sys.reseedCRNG = func() error { return unix.EPERM }
	srv.idsys = sys
	err := c.SetIdentity(t.Context(), Identity{Hostname: "clone-3", Entropy: []byte{1}, Time: f.now})
	require.ErrorIs(t, err, types.ErrInvalid, "EPERM is PermissionDenied")
	require.ErrorContains(t, err, "reseeding")
	require.Equal(t, []string{fmt.Sprintf("clock %d", f.now.UnixNano()), "entropy 1"}, f.takeCalls())
}

func TestSetIdentityOnOldAgent(t *testing.T) {
	c := oldAgentClient(t)
	err := c.SetIdentity(t.Context(), Identity{Hostname: "x"})
	require.ErrorIs(t, err, types.ErrNotSupported)
	require.ErrorContains(t, err, "this call needs 6")
	require.ErrorIs(t, c.SyncClock(t.Context()), types.ErrNotSupported)
}

func TestNewMachineID(t *testing.T) {
	seen := map[string]bool{}
	for range 100 {
		id := NewMachineID()
		require.NoError(t, ValidMachineID(id))
		require.False(t, seen[id])
		seen[id] = true
	}
}

// TestKernelEntropyIoctls runs the real RNDADDENTROPY and RNDRESEEDCRNG on
// this machine: adding host entropy and reseeding harm nothing.
func TestKernelEntropyIoctls(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Skip(t, "RNDADDENTROPY and RNDRESEEDCRNG need CAP_SYS_ADMIN; run the tests as root")
	}
	b := make([]byte, 64)
	rand.Read(b)
	require.NoError(t, addEntropy(b))
	require.NoError(t, reseedCRNG())
}

// TestSetNetworkIdentity moves a veth end in a test-made namespace, as a
// clone's NIC: new MAC and address, the old address and neighbours gone,
// the default route and resolv.conf written, and a gratuitous ARP seen on
// the other end.
func TestSetNetworkIdentity(t *testing.T) {
	ns := testenv.NewNetns(t)
	h := testenv.NetlinkAt(t, ns)
	oldMAC := net.HardwareAddr{0x02, 0xbb, 0, 0, 0, 1}
	newMAC := net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 7}
	require.NoError(t, h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", HardwareAddr: oldMAC}, PeerName: "peer0"}))
	eth0, err := h.LinkByName("eth0")
	require.NoError(t, err)
	peer, err := h.LinkByName("peer0")
	require.NoError(t, err)
	require.NoError(t, h.LinkSetUp(peer))
	require.NoError(t, h.LinkSetUp(eth0))
	require.NoError(t, h.AddrAdd(eth0, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 1, 0, 5), Mask: net.CIDRMask(24, 32)}}))
	require.NoError(t, h.NeighAdd(&netlink.Neigh{LinkIndex: eth0.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_REACHABLE,
		IP: net.IPv4(10, 1, 0, 9), HardwareAddr: net.HardwareAddr{0x02, 0xcc, 0, 0, 0, 9}}))
	resolv := filepath.Join(t.TempDir(), "resolv.conf")

	n := netIdentity{
		current:    oldMAC,
		mac:        newMAC,
		addr:       netip.MustParsePrefix("10.2.0.7/24"),
		gateway:    netip.MustParseAddr("10.2.0.1"),
		dns:        []netip.Addr{netip.MustParseAddr("192.0.2.53")},
		resolvConf: resolv,
	}
	var garp *arp.Packet
	var runErr error
	testenv.InNetns(t, ns, func() {
		runErr = func() error {
			ifi, err := net.InterfaceByName("peer0")
			if err != nil {
				return err
			}
			conn, err := packet.Listen(ifi, packet.Raw, unix.ETH_P_ARP, nil)
			if err != nil {
				return err
			}
			defer conn.Close()
			if err := setNetworkIdentity(n); err != nil {
				return err
			}
			// Again, now found by name: nothing more to do.
			n.current, n.iface = nil, "eth0"
			if err := setNetworkIdentity(n); err != nil {
				return fmt.Errorf("second call: %w", err)
			}
			buf := make([]byte, 1500)
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			for {
				k, _, err := conn.ReadFrom(buf)
				if err != nil {
					return fmt.Errorf("waiting for the gratuitous ARP: %w", err)
				}
				var fr ethernet.Frame
				if fr.UnmarshalBinary(buf[:k]) != nil {
					continue
				}
				var p arp.Packet
				if p.UnmarshalBinary(fr.Payload) == nil && p.SenderIP == n.addr.Addr() {
					garp = &p
					return nil
				}
			}
		}()
	})
	require.NoError(t, runErr)
	require.Equal(t, arp.OperationRequest, garp.Operation)
	require.Equal(t, newMAC, garp.SenderHardwareAddr)
	require.Equal(t, n.addr.Addr(), garp.TargetIP)

	eth0, err = h.LinkByName("eth0")
	require.NoError(t, err)
	require.Equal(t, newMAC, eth0.Attrs().HardwareAddr)
	require.NotZero(t, eth0.Attrs().Flags&net.FlagUp)
	addrs, err := h.AddrList(eth0, netlink.FAMILY_V4)
	require.NoError(t, err)
	require.Len(t, addrs, 1)
	require.Equal(t, "10.2.0.7/24", addrs[0].IPNet.String())
	routes, err := h.RouteList(eth0, netlink.FAMILY_V4)
	require.NoError(t, err)
	var gw string
	for _, r := range routes {
		if r.Dst == nil || r.Dst.String() == "0.0.0.0/0" {
			gw = r.Gw.String()
		}
	}
	require.Equal(t, "10.2.0.1", gw)
	neighs, err := h.NeighList(eth0.Attrs().Index, netlink.FAMILY_V4)
	require.NoError(t, err)
	for _, nb := range neighs {
		require.NotEqual(t, "10.1.0.9", nb.IP.String(), "the old neighbour entry is gone")
	}
	require.Contains(t, readFile(t, resolv), "nameserver 192.0.2.53\n")

	// A NIC that is not there is an error, not a silent no-op.
	testenv.InNetns(t, ns, func() {
		runErr = setNetworkIdentity(netIdentity{iface: "eth9", addr: n.addr})
	})
	require.Error(t, runErr)
	require.True(t, errors.Is(runErr, unix.ENODEV) || strings.Contains(runErr.Error(), "eth9"), "%v", runErr)
}
