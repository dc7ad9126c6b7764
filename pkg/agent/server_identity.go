package agent

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unsafe"

	"github.com/mdlayher/arp"
	"github.com/mdlayher/ethernet"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/network/guestnet"
)

// MaxIdentityEntropy bounds SetIdentityRequest.entropy: 512 bytes is four
// times the kernel's input pool (256 bits), ample for a reseed.
const MaxIdentityEntropy = 512

// Files of the guest's identity, relative to identitySys.root.
const (
	hostnameFile      = "etc/hostname"
	machineIDFile     = "etc/machine-id"
	dbusMachineIDFile = "var/lib/dbus/machine-id"
)

// identityRunDir holds the files SetIdentity bind-mounts over read-only
// ones; /run is a tmpfs in every guest (guestinit mounts it).
const identityRunDir = "/run/aetherium/identity"

// identitySys is what SetIdentity does to the system, so that tests can
// record it instead of changing the host they run on. realIdentitySys is
// the guest's.
type identitySys struct {
	// root prefixes the identity files ("/" in a guest).
	root string
	// runDir holds the copies bind-mounted over files that cannot be
	// replaced (a read-only /etc, a file that is a mount point).
	runDir string
	// now reads CLOCK_REALTIME.
	now func() time.Time
	// setClock steps CLOCK_REALTIME.
	setClock func(time.Time) error
	// addEntropy mixes b into the kernel's pool and credits it.
	addEntropy func(b []byte) error
	// reseedCRNG makes the kernel's CRNG reseed from the pool now.
	reseedCRNG func() error
	// setHostname sets the kernel's host name (UTS namespace).
	setHostname func(string) error
	// replace writes a file atomically (replaceFile).
	replace func(path string, data []byte, mode fs.FileMode) error
	// bindMount mounts file src over file dst, first detaching a mount
	// already at dst.
	bindMount func(src, dst string) error
	// setNetwork moves a NIC to a new identity (see netIdentity).
	setNetwork func(netIdentity) error
}

// realIdentitySys acts on the running system.
func realIdentitySys() identitySys {
	return identitySys{
		root:        "/",
		runDir:      identityRunDir,
		now:         time.Now,
		setClock:    setRealtime,
		addEntropy:  addEntropy,
		reseedCRNG:  reseedCRNG,
		setHostname: func(name string) error { return unix.Sethostname([]byte(name)) },
		replace:     replaceFile,
		bindMount:   bindMountFile,
		setNetwork:  setNetworkIdentity,
	}
}

// netIdentity is a checked SetIdentityRequest.network.
type netIdentity struct {
	iface      string           // empty: by current, else guestnet.DefaultInterface
	current    net.HardwareAddr // nil: by name or the default
	mac        net.HardwareAddr // nil: keep
	addr       netip.Prefix
	gateway    netip.Addr // invalid: no default route
	dns        []netip.Addr
	resolvConf string // where dns goes
}

// identityRequest is a checked SetIdentityRequest.
type identityRequest struct {
	hostname  string
	machineID string
	entropy   []byte
	clock     time.Time // zero: keep
	net       *netIdentity
}

// SetIdentity gives a restored clone its own identity; see the protocol
// for the order and contract. Everything is checked before anything
// changes. The clock goes first so that its error stays the request's
// latency, and the entropy before the files so that nothing after the
// call can draw from the clone's inherited CRNG state.
func (s *Server) SetIdentity(_ context.Context, req *agentpb.SetIdentityRequest) (*agentpb.SetIdentityResponse, error) {
	r, err := checkIdentityRequest(req)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	s.identityMu.Lock()
	defer s.identityMu.Unlock()
	return s.idsys.apply(r, s.log)
}

// checkIdentityRequest validates req; the error says which field is wrong.
func checkIdentityRequest(req *agentpb.SetIdentityRequest) (identityRequest, error) {
	r := identityRequest{hostname: req.GetHostname(), machineID: req.GetMachineId(), entropy: req.GetEntropy()}
	if r.hostname != "" {
		if err := bootparams.ValidHostname(r.hostname); err != nil {
			return r, fmt.Errorf("hostname %q: %w", r.hostname, err)
		}
	}
	if r.machineID != "" {
		if err := ValidMachineID(r.machineID); err != nil {
			return r, err
		}
	}
	if len(r.entropy) > MaxIdentityEntropy {
		return r, fmt.Errorf("entropy has %d bytes; send at most %d", len(r.entropy), MaxIdentityEntropy)
	}
	if ns := req.GetUnixNano(); ns != 0 {
		if ns < 0 {
			return r, fmt.Errorf("unix_nano %d is before 1970; send the host's time", ns)
		}
		r.clock = time.Unix(0, ns)
	}
	if n := req.GetNetwork(); n != nil {
		ni, err := checkNetIdentity(n)
		if err != nil {
			return r, fmt.Errorf("network: %w", err)
		}
		r.net = &ni
	}
	return r, nil
}

// ValidMachineID checks that id is a machine-id(5): 32 lowercase
// hexadecimal digits, not all zero.
func ValidMachineID(id string) error {
	if len(id) != 32 {
		return fmt.Errorf("machine id %q has %d characters; it is 32 lowercase hex digits", id, len(id))
	}
	if strings.Trim(id, "0") == "" {
		return fmt.Errorf("machine id %q is all zero; generate a random one", id)
	}
	for _, c := range []byte(id) {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return fmt.Errorf("machine id %q has %q; it is 32 lowercase hex digits", id, c)
		}
	}
	return nil
}

func checkNetIdentity(n *agentpb.NetworkIdentity) (netIdentity, error) {
	ni := netIdentity{iface: n.GetInterface(), resolvConf: guestnet.DefaultResolvConf}
	if ni.iface != "" {
		if len(ni.iface) >= unix.IFNAMSIZ || strings.ContainsAny(ni.iface, "/ \x00") {
			return ni, fmt.Errorf("interface %q is not an interface name", ni.iface)
		}
	}
	var err error
	if v := n.GetCurrentMac(); v != "" {
		if ni.current, err = parseUnicastMAC(v); err != nil {
			return ni, fmt.Errorf("current_mac: %w", err)
		}
	}
	if v := n.GetMac(); v != "" {
		if ni.mac, err = parseUnicastMAC(v); err != nil {
			return ni, fmt.Errorf("mac: %w", err)
		}
	}
	if ni.addr, err = netip.ParsePrefix(n.GetAddress()); err != nil {
		return ni, fmt.Errorf("address %q: %v; send an IPv4 address with its prefix length, e.g. 10.88.0.5/16", n.GetAddress(), err)
	}
	if !ni.addr.Addr().Is4() || ni.addr.Bits() >= 31 || ni.addr.Addr() == ni.addr.Masked().Addr() {
		return ni, fmt.Errorf("address %s is not an IPv4 host address with a prefix length below 31", ni.addr)
	}
	if v := n.GetGateway(); v != "" {
		if ni.gateway, err = netip.ParseAddr(v); err != nil {
			return ni, fmt.Errorf("gateway %q: %v", v, err)
		}
		if !ni.addr.Masked().Contains(ni.gateway) || ni.gateway == ni.addr.Addr() {
			return ni, fmt.Errorf("gateway %s is not another address of %s", ni.gateway, ni.addr.Masked())
		}
	}
	for _, v := range n.GetDns() {
		a, err := netip.ParseAddr(v)
		if err != nil {
			return ni, fmt.Errorf("dns %q: %v", v, err)
		}
		ni.dns = append(ni.dns, a)
	}
	return ni, nil
}

func parseUnicastMAC(v string) (net.HardwareAddr, error) {
	mac, err := net.ParseMAC(v)
	if err != nil {
		return nil, err
	}
	if len(mac) != 6 || mac[0]&1 != 0 || bytes.Equal(mac, make(net.HardwareAddr, 6)) {
		return nil, fmt.Errorf("%s is not a 6-byte unicast MAC address", mac)
	}
	return mac, nil
}

// apply makes the effects of r, in the documented order. A failure ends it
// with the effects before it in place; retrying the request is harmless.
func (sys identitySys) apply(r identityRequest, log *slog.Logger) (*agentpb.SetIdentityResponse, error) {
	resp := &agentpb.SetIdentityResponse{}
	if !r.clock.IsZero() {
		before := sys.now()
		if err := sys.setClock(r.clock); err != nil {
			return nil, sysError("stepping the clock to "+r.clock.UTC().Format(time.RFC3339Nano), err)
		}
		resp.ClockStepNanos = int64(r.clock.Sub(before))
		log.Info("clock stepped to the host's time", "step", r.clock.Sub(before))
	}
	if len(r.entropy) > 0 {
		if err := sys.addEntropy(r.entropy); err != nil {
			return nil, sysError("adding the host's entropy to the kernel's pool", err)
		}
		if err := sys.reseedCRNG(); err != nil {
			return nil, sysError("reseeding the kernel's CRNG", err)
		}
		log.Info("kernel RNG reseeded", "bytes", len(r.entropy))
	}
	if r.hostname != "" {
		if err := sys.setHostname(r.hostname); err != nil {
			return nil, sysError("setting the hostname to "+r.hostname, err)
		}
		skipped, err := sys.writeIdentityFile(hostnameFile, r.hostname+"\n", 0o644)
		if err != nil {
			return nil, err
		}
		resp.Skipped = append(resp.Skipped, skipped...)
	}
	if r.machineID != "" {
		skipped, err := sys.writeIdentityFile(machineIDFile, r.machineID+"\n", 0o444)
		if err != nil {
			return nil, err
		}
		resp.Skipped = append(resp.Skipped, skipped...)
		// Only a copy is written: a symlink (to /etc/machine-id, as
		// recent dbus packages make it) follows the file it names.
		dbus := filepath.Join(sys.root, dbusMachineIDFile)
		if fi, err := os.Lstat(dbus); err == nil && fi.Mode().IsRegular() {
			skipped, err := sys.writeIdentityFile(dbusMachineIDFile, r.machineID+"\n", 0o444)
			if err != nil {
				return nil, err
			}
			resp.Skipped = append(resp.Skipped, skipped...)
		}
	}
	if r.net != nil {
		if err := sys.setNetwork(*r.net); err != nil {
			return nil, sysError("moving the network interface to its new identity", err)
		}
		log.Info("network identity set", "mac", r.net.mac, "address", r.net.addr, "gateway", r.net.gateway)
	}
	for _, s := range resp.Skipped {
		log.Warn("identity file left as it was", "why", s)
	}
	return resp, nil
}

// sysError is a failed system call as a gRPC status: PermissionDenied
// when the agent lacks the privilege, Internal otherwise.
func sysError(op string, err error) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return status.Errorf(codes.PermissionDenied, "%s: %v; fc-agent must run as root (with CAP_SYS_ADMIN, CAP_SYS_TIME and CAP_NET_ADMIN)", op, err)
	}
	return status.Errorf(codes.Internal, "%s: %v", op, err)
}

// writeIdentityFile makes the file rel under sys.root hold content. A file
// that already does is left alone, so a repeated request writes nothing.
// It replaces the file atomically (a reader sees the old or the new
// content); where it cannot (a read-only /etc, a file that is a mount
// point), it writes a copy under sys.runDir and bind-mounts it over the
// file. A missing file in a read-only directory is left missing, and
// named in skipped.
func (sys identitySys) writeIdentityFile(rel, content string, mode fs.FileMode) (skipped []string, err error) {
	path := filepath.Join(sys.root, rel)
	if cur, err := os.ReadFile(path); err == nil && string(cur) == content {
		return nil, nil
	}
	if fi, err := os.Stat(path); err == nil {
		mode = fi.Mode().Perm()
	}
	err = sys.replace(path, []byte(content), mode)
	if err == nil {
		return nil, nil
	}
	if !errors.Is(err, unix.EROFS) && !errors.Is(err, unix.EBUSY) && !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EACCES) {
		return nil, status.Errorf(codes.Internal, "writing /%s: %v", rel, err)
	}
	if _, serr := os.Stat(path); serr != nil {
		return []string{fmt.Sprintf("/%s: cannot create it (%v) and there is no file to mount over", rel, err)}, nil
	}
	copyPath := filepath.Join(sys.runDir, strings.ReplaceAll(rel, "/", "_"))
	if err := os.MkdirAll(sys.runDir, 0o755); err != nil {
		return nil, status.Errorf(codes.Internal, "writing /%s: making %s for a copy to mount over it: %v", rel, sys.runDir, err)
	}
	if err := sys.replace(copyPath, []byte(content), mode); err != nil {
		return nil, status.Errorf(codes.Internal, "writing /%s: writing the copy %s to mount over it: %v", rel, copyPath, err)
	}
	if err := sys.bindMount(copyPath, path); err != nil {
		return nil, sysError(fmt.Sprintf("writing /%s: it cannot be replaced, and mounting a copy over it failed", rel), err)
	}
	return nil, nil
}

// replaceFile writes data to a temporary file beside path, syncs it and
// renames it over path.
func replaceFile(path string, data []byte, mode fs.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// bindMountFile mounts src over dst. A mount already at dst (an earlier
// call's, or a container runtime's) is detached first, so repeated
// identities do not stack mounts.
func bindMountFile(src, dst string) error {
	if err := unix.Unmount(dst, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("unmounting %s: %w", dst, err)
	}
	if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind-mounting %s on %s: %w", src, dst, err)
	}
	return nil
}

// setRealtime steps CLOCK_REALTIME to t (clock_settime(2); needs
// CAP_SYS_TIME).
func setRealtime(t time.Time) error {
	ts := unix.NsecToTimespec(t.UnixNano())
	return unix.ClockSettime(unix.CLOCK_REALTIME, &ts)
}

// addEntropy mixes b into the kernel's input pool and credits it with
// 8 bits a byte (random(4) RNDADDENTROPY; needs CAP_SYS_ADMIN). The host
// draws it from its own CSPRNG, so full credit is honest. x/sys/unix has
// the request number but not struct rand_pool_info, so the struct is
// built here: int entropy_count, int buf_size, then the bytes.
func addEntropy(b []byte) error {
	info := make([]byte, 8+len(b))
	binary.NativeEndian.PutUint32(info[0:], uint32(len(b)*8))
	binary.NativeEndian.PutUint32(info[4:], uint32(len(b)))
	copy(info[8:], b)
	return urandomIoctl("RNDADDENTROPY", unix.RNDADDENTROPY, unsafe.Pointer(&info[0]))
}

// reseedCRNG makes the kernel's CRNG reseed from the input pool at once
// (RNDRESEEDCRNG, Linux 4.17+; needs CAP_SYS_ADMIN), so that two clones
// holding the same CRNG state diverge before anything draws from it.
func reseedCRNG() error {
	return urandomIoctl("RNDRESEEDCRNG", unix.RNDRESEEDCRNG, nil)
}

// urandomIoctl makes the random(4) ioctl req on /dev/urandom with arg.
func urandomIoctl(name string, req uintptr, arg unsafe.Pointer) error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	conn, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var errno unix.Errno
	if err := conn.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, req, uintptr(arg))
	}); err != nil {
		return err
	}
	if errno != 0 {
		return fmt.Errorf("ioctl %s on /dev/urandom: %w", name, errno)
	}
	return nil
}

// setNetworkIdentity moves a NIC to n: its MAC, its addresses (the others
// go; the primary must go before the new one is added, or its
// secondaries would go with it), its neighbour entries (learned under the
// old identity), then guestnet.Apply as at boot (address, default route,
// resolv.conf), and a gratuitous ARP so that the host's bridge and
// neighbour table learn the new pair at once.
func setNetworkIdentity(n netIdentity) error {
	link, err := findIdentityLink(n)
	if err != nil {
		return err
	}
	name := link.Attrs().Name
	if n.mac != nil && !bytes.Equal(link.Attrs().HardwareAddr, n.mac) {
		if err := netlink.LinkSetHardwareAddr(link, n.mac); err != nil {
			// A NIC without live MAC changes refuses while up.
			if !errors.Is(err, unix.EBUSY) {
				return fmt.Errorf("setting the MAC of %s to %s: %w", name, n.mac, err)
			}
			if err := netlink.LinkSetDown(link); err != nil {
				return fmt.Errorf("bringing %s down to change its MAC: %w", name, err)
			}
			if err := netlink.LinkSetHardwareAddr(link, n.mac); err != nil {
				return fmt.Errorf("setting the MAC of %s to %s: %w", name, n.mac, err)
			}
		}
	}
	if link, err = netlink.LinkByIndex(link.Attrs().Index); err != nil {
		return fmt.Errorf("reading %s back: %w", name, err)
	}
	addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("listing the addresses of %s: %w", name, err)
	}
	for _, a := range addrs {
		p, ok := netipPrefix(a.IPNet)
		if ok && p == n.addr {
			continue
		}
		if err := netlink.AddrDel(link, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("removing the old address %s from %s: %w", a.IPNet, name, err)
		}
	}
	neighs, err := netlink.NeighList(link.Attrs().Index, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("listing the neighbours of %s: %w", name, err)
	}
	for _, nb := range neighs {
		if nb.State&netlink.NUD_PERMANENT != 0 {
			continue
		}
		if err := netlink.NeighDel(&nb); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("removing the neighbour entry of %s on %s: %w", nb.IP, name, err)
		}
	}
	cfg := guestnet.Config{IP: n.addr, Gateway: n.gateway, MAC: link.Attrs().HardwareAddr, DNS: n.dns, ResolvConf: n.resolvConf}
	if err := guestnet.Apply(cfg); err != nil {
		return err
	}
	return announce(link.Attrs().Index, n.addr.Addr())
}

// findIdentityLink returns the NIC n names: by name, else by its current
// MAC, else guestnet.DefaultInterface.
func findIdentityLink(n netIdentity) (netlink.Link, error) {
	if n.iface != "" {
		l, err := netlink.LinkByName(n.iface)
		if err != nil {
			return nil, fmt.Errorf("finding interface %s: %w", n.iface, err)
		}
		return l, nil
	}
	if n.current != nil {
		links, err := netlink.LinkList()
		if err != nil {
			return nil, fmt.Errorf("listing interfaces: %w", err)
		}
		for _, l := range links {
			if bytes.Equal(l.Attrs().HardwareAddr, n.current) {
				return l, nil
			}
		}
		return nil, fmt.Errorf("no interface has MAC %s", n.current)
	}
	l, err := netlink.LinkByName(guestnet.DefaultInterface)
	if err != nil {
		return nil, fmt.Errorf("finding %s: %w", guestnet.DefaultInterface, err)
	}
	return l, nil
}

func netipPrefix(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

// announce broadcasts a gratuitous ARP request (RFC 5227's announcement:
// sender and target are ip) from the interface with index ifindex.
func announce(ifindex int, ip netip.Addr) error {
	ifi, err := net.InterfaceByIndex(ifindex)
	if err != nil {
		return fmt.Errorf("finding interface %d to announce %s: %w", ifindex, ip, err)
	}
	c, err := arp.Dial(ifi)
	if err != nil {
		return fmt.Errorf("opening an ARP socket on %s: %w", ifi.Name, err)
	}
	defer c.Close()
	p, err := arp.NewPacket(arp.OperationRequest, ifi.HardwareAddr, ip, ethernet.Broadcast, ip)
	if err != nil {
		return fmt.Errorf("building the gratuitous ARP for %s: %w", ip, err)
	}
	if err := c.WriteTo(p, ethernet.Broadcast); err != nil {
		return fmt.Errorf("sending a gratuitous ARP for %s on %s: %w", ip, ifi.Name, err)
	}
	return nil
}
