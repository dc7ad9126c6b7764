package network

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// ensureBridge creates the bridge when it is missing, puts the gateway
// address on it and brings it up. It checks each step first.
func (m *Manager) ensureBridge() (netlink.Link, error) {
	br, err := m.nl.LinkByName(m.cfg.Bridge)
	switch {
	case isNotFound(err):
		la := netlink.NewLinkAttrs()
		la.Name = m.cfg.Bridge
		if err := m.nl.LinkAdd(&netlink.Bridge{LinkAttrs: la}); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, m.opError(err, "creating bridge %s", m.cfg.Bridge)
		}
		m.log.Info("created bridge", "bridge", m.cfg.Bridge)
		if br, err = m.nl.LinkByName(m.cfg.Bridge); err != nil {
			return nil, m.opError(err, "reading bridge %s", m.cfg.Bridge)
		}
		// The alias marks the bridge as ours: Teardown removes only such
		// a bridge, never one it found.
		if err := m.nl.LinkSetAlias(br, bridgeAlias); err != nil {
			return nil, m.opError(err, "marking bridge %s", m.cfg.Bridge)
		}
	case err != nil:
		return nil, m.opError(err, "reading bridge %s", m.cfg.Bridge)
	case br.Type() != "bridge":
		return nil, fmt.Errorf("%w: %s exists but is a %s, not a bridge; set network.bridge to another name", types.ErrConflict, m.cfg.Bridge, br.Type())
	}
	gw := m.Gateway()
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: gw.Addr().AsSlice(), Mask: net.CIDRMask(gw.Bits(), 32)}}
	if err := m.nl.AddrReplace(br, addr); err != nil {
		return nil, m.opError(err, "putting %s on bridge %s", gw, m.cfg.Bridge)
	}
	if br.Attrs().Flags&net.FlagUp == 0 {
		if err := m.nl.LinkSetUp(br); err != nil {
			return nil, m.opError(err, "bringing bridge %s up", m.cfg.Bridge)
		}
	}
	return br, nil
}

// enableForwarding turns on IPv4 forwarding in the Manager's namespace,
// which routing VM traffic out of the bridge needs.
func (m *Manager) enableForwarding() error {
	// /proc/sys/net is the namespace of the thread that opens it, hence Do.
	return m.Do(func() error {
		const path = "/proc/sys/net/ipv4/ip_forward"
		b, err := os.ReadFile(path)
		if err == nil && len(b) > 0 && b[0] == '1' {
			return nil
		}
		if err := os.WriteFile(filepath.Clean(path), []byte("1\n"), 0o644); err != nil {
			return m.opError(err, "enabling IPv4 forwarding (%s)", path)
		}
		m.log.Info("enabled IPv4 forwarding")
		return nil
	})
}

// ensurePort makes vmID's port a member of the bridge, up, with the VM id
// as its alias. A link already named PortName(vmID) is adopted as it is
// (a retried Attach, or a test's veth standing in for a TAP); otherwise a
// persistent TAP is created for the VMM to open.
func (m *Manager) ensurePort(br netlink.Link, vmID string) error {
	name := PortName(vmID)
	link, err := m.nl.LinkByName(name)
	if isNotFound(err) {
		la := netlink.NewLinkAttrs()
		la.Name = name
		tap := &netlink.Tuntap{
			LinkAttrs: la,
			Mode:      netlink.TUNTAP_MODE_TAP,
			// VNET_HDR lets QEMU offload checksums; QEMU may still open
			// the TAP without it.
			Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE,
			// A VMM without CAP_NET_ADMIN (Firecracker under the jailer's
			// uid) may open only a TAP its uid or gid owns.
			Owner: uint32(m.cfg.TAPOwner),
			Group: uint32(m.cfg.TAPGroup),
		}
		// The TAP is made through /dev/net/tun, which acts in the
		// calling thread's namespace, hence Do.
		err = m.Do(func() error {
			err := netlink.LinkAdd(tap)
			// LinkAdd keeps the queue's fd open; the TAP persists without it.
			for _, f := range tap.Fds {
				f.Close()
			}
			return err
		})
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return m.opError(err, "creating tap %s for vm %s", name, vmID)
		}
		m.log.Info("created tap", "tap", name, "vm_id", vmID)
		link, err = m.nl.LinkByName(name)
	}
	if err != nil {
		return m.opError(err, "reading port %s of vm %s", name, vmID)
	}
	if alias := link.Attrs().Alias; alias != vmID {
		if alias != "" {
			return fmt.Errorf("%w: port %s belongs to vm %s, not %s (their ids share a port name); delete that vm first", types.ErrConflict, name, alias, vmID)
		}
		if err := m.nl.LinkSetAlias(link, vmID); err != nil {
			return m.opError(err, "labelling port %s with vm %s", name, vmID)
		}
	}
	if link.Attrs().MasterIndex != br.Attrs().Index {
		if err := m.nl.LinkSetMaster(link, br); err != nil {
			return m.opError(err, "adding port %s to bridge %s", name, m.cfg.Bridge)
		}
	}
	// The bridge itself keeps isolated ports from talking to each other;
	// the nftables rules say the same, as a second line.
	if err := m.nl.LinkSetIsolated(link, true); err != nil {
		return m.opError(err, "isolating port %s on bridge %s", name, m.cfg.Bridge)
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := m.nl.LinkSetUp(link); err != nil {
			return m.opError(err, "bringing port %s up", name)
		}
	}
	return nil
}

// deleteLink removes the link named name; a missing one is fine.
func (m *Manager) deleteLink(name string) error {
	link, err := m.nl.LinkByName(name)
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return m.opError(err, "reading link %s", name)
	}
	if err := m.nl.LinkDel(link); err != nil && !isNotFound(err) {
		return m.opError(err, "deleting link %s", name)
	}
	m.log.Info("deleted link", "link", name, "alias", link.Attrs().Alias)
	return nil
}

// Port is a VM port found on the host.
type Port struct {
	// Name is the link's name.
	Name string `json:"name"`
	// VMID is the link's alias: the VM it was made for. Empty when a crash
	// came before the alias was set.
	VMID string `json:"vm_id,omitempty"`
	// Kind is the link type, "tuntap" for TAPs.
	Kind string `json:"kind"`
	// OnBridge tells whether the port is a member of the bridge yet.
	OnBridge bool `json:"on_bridge"`
	// Up tells whether the link is up.
	Up bool `json:"up"`
}

// ports lists the Manager's ports: links named like PortName on the
// bridge, and such TAPs on no bridge (half made). brIndex is 0 when the
// bridge does not exist.
func (m *Manager) ports(brIndex int) ([]Port, error) {
	links, err := m.nl.LinkList()
	if err != nil {
		return nil, m.opError(err, "listing links")
	}
	var out []Port
	for _, l := range links {
		a := l.Attrs()
		// Only links named like PortName are ours: a bridge that was there
		// before us may hold other ports, which are never touched.
		if !isPortName(a.Name) {
			continue
		}
		onBridge := brIndex != 0 && a.MasterIndex == brIndex
		orphan := a.MasterIndex == 0 && l.Type() == "tuntap"
		if !onBridge && !orphan {
			continue
		}
		out = append(out, Port{Name: a.Name, VMID: a.Alias, Kind: l.Type(), OnBridge: onBridge, Up: a.Flags&net.FlagUp != 0})
	}
	return out, nil
}

// bridgeIndex returns the bridge's index, 0 when it does not exist.
func (m *Manager) bridgeIndex() (int, error) {
	br, err := m.nl.LinkByName(m.cfg.Bridge)
	if isNotFound(err) {
		return 0, nil
	}
	if err != nil {
		return 0, m.opError(err, "reading bridge %s", m.cfg.Bridge)
	}
	return br.Attrs().Index, nil
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return err != nil && (errors.As(err, &nf) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT))
}

// ifname pads an interface name as nftables compares it: NUL-terminated.
func ifname(name string) []byte { return append([]byte(name), 0) }
