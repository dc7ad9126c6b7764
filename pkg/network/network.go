// Package network gives VMs of the qemu and firecracker backends their
// network: one TAP per VM on a bridge, an address from a pool stored in
// PostgreSQL (see LeaseStore), NAT out of an uplink, and isolation rules in
// nftables tables that this package owns alone.
//
// Everything is done through netlink (vishvananda/netlink) and nftables
// (google/nftables), never by running ip or nft. Every operation checks
// before it acts, so a retried or repeated call resumes instead of failing,
// and Reconcile removes what a crashed process left half-made.
//
// What the Manager owns, and so lists and removes:
//   - the bridge Config.Bridge, with the gateway address on it;
//   - every link enslaved to that bridge, and every TAP named like PortName
//     that is on no bridge yet (left by a crash between creating and
//     enslaving it); each port's alias is the id of its VM;
//   - the nftables tables named Config.Table in the inet and the bridge
//     families;
//   - the leases of Config.Pool in the LeaseStore.
//
// Several workers on one host may share the bridge, tables and pool. Each
// VM is claimed by the Config.Owner of the Manager that attached it: a rule
// in the bridge table's "owners" chain (never jumped to) whose comment is
// "aetherium owner=OWNER vm=ID". Attach writes the claim before the lease,
// rules and port, and Detach removes it after them, so every one of them is
// always claimed; Reconcile reads the claims after the rest and removes
// only what its own owner claimed, plus leftovers nobody claimed. Teardown
// removes everyone's. The claims live in the namespace's own tables, so
// they go with the TAPs they describe; `nft flush ruleset` removes them
// with the isolation rules, and the VMs' next Attach writes both back.
//
// The isolation the tables enforce, for traffic from the VMs' ports:
//   - a VM never reaches another VM (bridged frames between ports are
//     dropped, and so is traffic routed back into the bridge);
//   - a frame whose source MAC, or whose IPv4 or ARP source address, is not
//     the port's own is dropped, and so is every protocol but IPv4 and ARP;
//   - a VM never reaches the host itself, any of its addresses and ports
//     (every packet addressed to the namespace's own addresses takes the
//     input hook, where all from the bridge but replies to connections
//     the host opened is dropped), the gateway included: guests use
//     nothing on it, and DNS goes to the servers of Config.DNS;
//   - a VM never reaches 169.254.0.0/16, nor Config.EgressDeny, nor, unless
//     Config.AllowPrivate, PrivateRanges (10.0.0.0/8, 172.16.0.0/12,
//     192.168.0.0/16, 100.64.0.0/10) other than Config.DNS servers on port
//     53 and Config.EgressAllow entries inside them; when
//     Config.EgressAllow is set, nothing outside it;
//   - nobody outside opens connections into the VM subnet.
//
// Permissions: creating links and tables needs CAP_NET_ADMIN in the network
// namespace. A refusal is reported as types.ErrUnavailable with a message
// that names the three ways out (see ErrPermissionHint).
package network

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"

	"github.com/google/uuid"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Defaults of Config.
const (
	DefaultBridge = "aeth0"
	DefaultSubnet = "10.88.0.0/16"
	DefaultTable  = "aetherium"
	DefaultOwner  = "default"
)

// PrivateRanges are the address ranges VMs cannot reach unless
// Config.AllowPrivate is set: RFC 1918 private networks and RFC 6598
// shared address space (carrier-grade NAT, also used by some clouds and
// VPNs for internal services).
var PrivateRanges = []netip.Prefix{
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("100.64.0.0/10"),
}

// KernelArgName is the guest kernel command-line parameter that carries the
// guest's network settings; see Attachment.KernelArg and package guestnet.
const KernelArgName = "aetherium.net"

// portPrefix starts the name of every VM port (TAP) this package creates.
const portPrefix = "at"

// Config configures a Manager. The zero value is usable: it sets up the
// default bridge and subnet in the host's network namespace, without NAT.
type Config struct {
	// Bridge is the name of the bridge that holds the VMs' ports. Default
	// "aeth0".
	Bridge string
	// Subnet is the VMs' IPv4 subnet. Its first host address is the
	// gateway and goes on the bridge; VMs get the following ones. Default
	// 10.88.0.0/16.
	Subnet string
	// Uplink is the interface VM traffic leaves through, masqueraded to
	// its address. Empty: no NAT, VMs reach only what the host routes for
	// them without translation.
	Uplink string
	// DNS are the name servers written into each guest's resolv.conf.
	// Empty: none, and the guest's resolv.conf is left alone. No DNS server
	// runs on the gateway, so do not name the gateway here unless you run
	// one there yourself (and then allow it: the host is closed to VMs).
	DNS []string
	// EgressDeny are CIDRs VMs may never reach, on top of 169.254.0.0/16
	// and, unless AllowPrivate, PrivateRanges.
	EgressDeny []string
	// EgressAllow, when not empty, are the only CIDRs VMs may reach (minus
	// EgressDeny). Empty: everything not denied. An entry that lies inside
	// one of PrivateRanges opens that part even without AllowPrivate, so
	// VMs can be let at one internal mirror and nothing else private.
	EgressAllow []string
	// AllowPrivate lets VMs reach PrivateRanges (10.0.0.0/8,
	// 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10). Default false: they
	// are denied, because that is where the operator's own databases,
	// queues and internal services live, and a guest runs untrusted code.
	// Either way the host itself (every address it has, see the input
	// chain) and 169.254.0.0/16 stay closed, and DNS servers named in DNS
	// stay reachable on port 53.
	AllowPrivate bool
	// Owner names who attaches VMs through this Manager, e.g. the worker
	// id. Each VM's network is claimed by its owner, and Reconcile removes
	// only what its own owner claimed (and leftovers nobody claimed), so
	// workers sharing one bridge and pool never remove each other's VMs.
	// Managers sharing a pool need distinct owners, each kept across
	// restarts so a restarted worker still cleans up after its crash.
	// 1 to 63 characters of [A-Za-z0-9._-]. Default "default".
	Owner string
	// Netns is the path of the network namespace that holds the bridge,
	// the ports and the rules, e.g. /var/run/netns/NAME or
	// /proc/PID/ns/net, and in which VMM processes must run (see Do).
	// Empty: the namespace this process started in.
	Netns string
	// Table names the nftables tables (one inet, one bridge) this Manager
	// owns. Managers in one namespace need different tables and bridges.
	// Default "aetherium".
	Table string
	// Pool names this bridge's address pool in the LeaseStore: workers
	// that share a bridge share a pool, and hosts with their own bridges
	// have their own pools. Default: the hostname, "/", Bridge.
	Pool string
	// TAPOwner and TAPGroup own the TAPs, so a VMM running as that user
	// without CAP_NET_ADMIN (Firecracker under its jailer) can open them.
	// 0: root.
	TAPOwner int
	TAPGroup int
	// Logger receives what the Manager changes. Default: discard.
	Logger *slog.Logger
}

// Manager sets up and tears down VM networking. It is safe for concurrent
// use: concurrent Attach calls for different VMs run in parallel.
type Manager struct {
	cfg     Config
	subnet  netip.Prefix
	gateway netip.Addr
	first   netip.Addr // first address a VM may get
	last    netip.Addr // last address a VM may get
	dns     []netip.Addr
	deny    []netip.Prefix
	allow   []netip.Prefix
	leases  LeaseStore
	log     *slog.Logger
	ns      netns.NsHandle // -1 when cfg.Netns is empty
	nl      *netlink.Handle

	setupMu   sync.Mutex
	setupDone bool
}

// New validates cfg and opens the network namespace it names. leases may
// be nil for a Manager that only sets up, lists and tears down (as the CLI
// does); Attach then fails. Call Close when done.
func New(cfg Config, leases LeaseStore) (*Manager, error) {
	cfg.Bridge = cmp.Or(cfg.Bridge, DefaultBridge)
	cfg.Subnet = cmp.Or(cfg.Subnet, DefaultSubnet)
	cfg.Table = cmp.Or(cfg.Table, DefaultTable)
	cfg.Owner = cmp.Or(cfg.Owner, DefaultOwner)
	if cfg.Pool == "" {
		host, _ := os.Hostname()
		cfg.Pool = cmp.Or(host, "localhost") + "/" + cfg.Bridge
	}
	m := &Manager{cfg: cfg, leases: leases, log: cfg.Logger, ns: -1}
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	if err := checkIfName("network.bridge", cfg.Bridge); err != nil {
		return nil, err
	}
	if !validOwner(cfg.Owner) {
		return nil, fmt.Errorf("%w: network owner %q must be 1 to 63 characters of [A-Za-z0-9._-] (the worker id serves)", types.ErrInvalid, cfg.Owner)
	}
	if cfg.Uplink != "" {
		if err := checkIfName("network.uplink", cfg.Uplink); err != nil {
			return nil, err
		}
	}
	subnet, err := netip.ParsePrefix(cfg.Subnet)
	if err != nil || !subnet.Addr().Is4() || subnet.Bits() > 29 || subnet.Bits() < 8 {
		return nil, fmt.Errorf("%w: network.subnet %q must be an IPv4 CIDR between /8 and /29, e.g. %s", types.ErrInvalid, cfg.Subnet, DefaultSubnet)
	}
	m.subnet = subnet.Masked()
	m.gateway = m.subnet.Addr().Next()
	m.first = m.gateway.Next()
	m.last = lastAddr(m.subnet).Prev() // the broadcast address is no host's
	for _, s := range cfg.DNS {
		a, err := netip.ParseAddr(s)
		if err != nil || !a.Is4() {
			return nil, fmt.Errorf("%w: network.dns %q is not an IPv4 address", types.ErrInvalid, s)
		}
		m.dns = append(m.dns, a)
	}
	if m.deny, err = parseCIDRs("network.egress_deny", cfg.EgressDeny); err != nil {
		return nil, err
	}
	if m.allow, err = parseCIDRs("network.egress_allow", cfg.EgressAllow); err != nil {
		return nil, err
	}
	if cfg.Netns != "" {
		ns, err := netns.GetFromPath(cfg.Netns)
		if err != nil {
			return nil, fmt.Errorf("%w: opening network namespace %s: %v; create it (e.g. `ip netns add NAME`) or leave network.netns empty for the host's", types.ErrInvalid, cfg.Netns, err)
		}
		m.ns = ns
		m.nl, err = netlink.NewHandleAt(ns)
		if err != nil {
			ns.Close()
			return nil, m.opError(err, "opening netlink in %s", cfg.Netns)
		}
	} else {
		m.nl, err = netlink.NewHandle()
		if err != nil {
			return nil, m.opError(err, "opening netlink")
		}
	}
	return m, nil
}

// Close releases the namespace and netlink handles. It changes nothing on
// the host and may be called twice.
func (m *Manager) Close() error {
	if m.nl != nil {
		m.nl.Close()
		m.nl = nil
	}
	if m.ns >= 0 {
		m.ns.Close()
		m.ns = -1
	}
	return nil
}

// Bridge is the bridge's name.
func (m *Manager) Bridge() string { return m.cfg.Bridge }

// Gateway is the bridge's address, the VMs' default route.
func (m *Manager) Gateway() netip.Prefix { return netip.PrefixFrom(m.gateway, m.subnet.Bits()) }

// Pool is the lease pool of this bridge.
func (m *Manager) Pool() string { return m.cfg.Pool }

// Owner is who this Manager attaches VMs for (Config.Owner).
func (m *Manager) Owner() string { return m.cfg.Owner }

// Attachment is one VM's network: what the VMM and the guest need.
type Attachment struct {
	// VMID is the VM the attachment belongs to.
	VMID string `json:"vm_id"`
	// TAP is the name of the VM's port on the bridge; pass it to the VMM
	// (QEMU: -netdev tap,ifname=TAP,script=no,downscript=no).
	TAP string `json:"tap"`
	// MAC is the guest's MAC address: deterministic and locally
	// administered. The VMM must give it to the guest's NIC; the
	// anti-spoofing rules drop frames from any other.
	MAC net.HardwareAddr `json:"mac"`
	// IP is the guest's address with the subnet's length.
	IP netip.Prefix `json:"ip"`
	// Gateway is the default route, on the bridge.
	Gateway netip.Addr `json:"gateway"`
	// DNS are the name servers for the guest; may be empty.
	DNS []netip.Addr `json:"dns,omitempty"`
	// KernelArg is the guest kernel command-line parameter carrying all of
	// the above, e.g. "aetherium.net=ip=10.88.0.2/16,gw=10.88.0.1,mac=02:..".
	// Package guestnet parses the value after "aetherium.net=".
	KernelArg string `json:"kernel_arg"`
}

// GuestValue is KernelArg without its "aetherium.net=" name: the string
// guestnet.Parse reads.
func (a *Attachment) GuestValue() string {
	_, v, _ := strings.Cut(a.KernelArg, "=")
	return v
}

// PortName is the name of vmID's port (TAP): "at" and 12 hex digits, from
// the id's bytes when it is a UUID and from its SHA-256 otherwise. The name
// lets Reconcile find ports whose VM is gone even when a crash left them
// without their alias.
func PortName(vmID string) string {
	if id, err := uuid.Parse(vmID); err == nil {
		return portPrefix + hex.EncodeToString(id[:6])
	}
	sum := sha256.Sum256([]byte(vmID))
	return portPrefix + hex.EncodeToString(sum[:6])
}

// isPortName reports whether name has PortName's shape.
// bridgeAlias is the alias of a bridge the Manager created.
const bridgeAlias = "aetherium-bridge"

func isPortName(name string) bool {
	if len(name) != len(portPrefix)+12 || !strings.HasPrefix(name, portPrefix) {
		return false
	}
	_, err := hex.DecodeString(name[len(portPrefix):])
	return err == nil && strings.ToLower(name) == name
}

// MAC is vmID's guest MAC address: 02 (locally administered, unicast)
// followed by five bytes of the id's SHA-256, so the same VM always gets
// the same address.
func MAC(vmID string) net.HardwareAddr {
	sum := sha256.Sum256([]byte(vmID))
	return net.HardwareAddr{0x02, sum[0], sum[1], sum[2], sum[3], sum[4]}
}

// attachment builds vmID's Attachment for the address addr.
func (m *Manager) attachment(vmID string, addr netip.Addr) *Attachment {
	a := &Attachment{
		VMID:    vmID,
		TAP:     PortName(vmID),
		MAC:     MAC(vmID),
		IP:      netip.PrefixFrom(addr, m.subnet.Bits()),
		Gateway: m.gateway,
		DNS:     slices.Clone(m.dns),
	}
	parts := []string{"ip=" + a.IP.String(), "gw=" + a.Gateway.String(), "mac=" + a.MAC.String()}
	for _, d := range a.DNS {
		parts = append(parts, "dns="+d.String())
	}
	a.KernelArg = KernelArgName + "=" + strings.Join(parts, ",")
	return a
}

// ErrPermissionHint is what a refused network operation tells the user.
const ErrPermissionHint = "Permission denied (network operations): run the worker as root, " +
	"or grant it CAP_NET_ADMIN (`setcap cap_net_admin+ep bin/worker`), " +
	"or set the bridge and NAT up front as root with `aether-cli network setup`"

// opError wraps err from a netlink or nftables call doing what format
// says; a refusal for lack of privilege becomes ErrUnavailable with
// ErrPermissionHint.
func (m *Manager) opError(err error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	if isPermission(err) {
		return fmt.Errorf("%s: %w: %s: %v", what, types.ErrUnavailable, ErrPermissionHint, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// isPermission reports whether err is the kernel refusing for lack of
// privilege. netlink's tuntap path formats its errno into text, so the
// text is checked too.
func isPermission(err error) bool {
	if errors.Is(err, os.ErrPermission) {
		return true
	}
	s := err.Error()
	return strings.Contains(s, "operation not permitted") || strings.Contains(s, "permission denied")
}

// checkIfName rejects names the kernel would reject as interface names.
func checkIfName(field, name string) error {
	if name == "" || len(name) > 15 || strings.ContainsAny(name, "/ \t\n:") || name == "." || name == ".." {
		return fmt.Errorf("%w: %s %q is not a valid interface name (1 to 15 characters, no '/', ':' or spaces)", types.ErrInvalid, field, name)
	}
	return nil
}

func parseCIDRs(field string, in []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range in {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			a, aerr := netip.ParseAddr(s)
			if aerr != nil {
				return nil, fmt.Errorf("%w: %s %q is not an IPv4 CIDR such as 192.0.2.0/24", types.ErrInvalid, field, s)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		if !p.Addr().Is4() {
			return nil, fmt.Errorf("%w: %s %q: only IPv4 is supported (VMs get no IPv6 and cannot send it)", types.ErrInvalid, field, s)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// validOwner reports whether s can be an owner: it goes into nftables
// rule comments, where a space would end it.
func validOwner(s string) bool {
	if s == "" || len(s) > 63 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}

// lastAddr is the highest address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := 32 - p.Bits()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v |= (1<<host - 1)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// ctxErr returns ctx's error, so long steps can stop between operations.
func ctxErr(ctx context.Context, what string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}
