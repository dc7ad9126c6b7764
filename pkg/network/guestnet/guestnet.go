//go:build linux

// Package guestnet configures a guest's network from the value of the
// kernel command-line parameter aetherium.net that the host's network
// manager (pkg/network, Attachment.KernelArg) writes: the guest init
// (fc-agent) calls Parse on that value, then Apply.
//
// The value is comma-separated key=value pairs:
//
//	ip=10.88.0.5/16,gw=10.88.0.1,mac=02:aa:bb:cc:dd:ee,dns=192.0.2.53,dns=192.0.2.54
//
// ip is required; gw, mac and dns are optional, and dns may repeat.
package guestnet

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
)

// DefaultInterface is configured when the value names no MAC, or no
// interface has it.
const DefaultInterface = "eth0"

// DefaultResolvConf is where Apply writes name servers.
const DefaultResolvConf = "/etc/resolv.conf"

// Config is a guest's network configuration.
type Config struct {
	// IP is the guest's address and the subnet's length.
	IP netip.Prefix
	// Gateway is the default route; invalid (zero) for none.
	Gateway netip.Addr
	// MAC selects the interface to configure; nil for DefaultInterface.
	MAC net.HardwareAddr
	// DNS are written to ResolvConf as name servers; none leaves it alone.
	DNS []netip.Addr
	// ResolvConf is the file Apply writes DNS to. Default
	// DefaultResolvConf. Parse never sets it.
	ResolvConf string
}

// Parse reads the value of aetherium.net (without the "aetherium.net="
// part). It only parses; errors say which part is wrong.
func Parse(value string) (Config, error) {
	var c Config
	value = strings.TrimSpace(value)
	if value == "" {
		return c, errors.New("aetherium.net is empty; expected e.g. ip=10.88.0.5/16,gw=10.88.0.1")
	}
	seen := map[string]bool{}
	for _, part := range strings.Split(value, ",") {
		k, v, ok := strings.Cut(part, "=")
		if !ok || v == "" {
			return Config{}, fmt.Errorf("aetherium.net: %q is not key=value", part)
		}
		if seen[k] && k != "dns" {
			return Config{}, fmt.Errorf("aetherium.net: %s given twice", k)
		}
		seen[k] = true
		var err error
		switch k {
		case "ip":
			c.IP, err = netip.ParsePrefix(v)
			if err == nil && (!c.IP.Addr().Is4() || c.IP.Addr() == c.IP.Masked().Addr()) {
				err = errors.New("not an IPv4 host address with a prefix length")
			}
		case "gw":
			c.Gateway, err = netip.ParseAddr(v)
			if err == nil && !c.Gateway.Is4() {
				err = errors.New("not an IPv4 address")
			}
		case "mac":
			c.MAC, err = net.ParseMAC(v)
			if err == nil && len(c.MAC) != 6 {
				err = errors.New("not a 6-byte MAC address")
			}
		case "dns":
			var a netip.Addr
			a, err = netip.ParseAddr(v)
			if err == nil && !a.Is4() {
				err = errors.New("not an IPv4 address")
			}
			c.DNS = append(c.DNS, a)
		default:
			return Config{}, fmt.Errorf("aetherium.net: unknown key %q (known: ip, gw, mac, dns)", k)
		}
		if err != nil {
			return Config{}, fmt.Errorf("aetherium.net: %s=%q: %v", k, v, err)
		}
	}
	if !c.IP.IsValid() {
		return Config{}, errors.New("aetherium.net: no ip=")
	}
	if c.Gateway.IsValid() && !c.IP.Masked().Contains(c.Gateway) {
		return Config{}, fmt.Errorf("aetherium.net: gateway %s is outside %s", c.Gateway, c.IP.Masked())
	}
	return c, nil
}

// String is c in Parse's format.
func (c Config) String() string {
	parts := []string{"ip=" + c.IP.String()}
	if c.Gateway.IsValid() {
		parts = append(parts, "gw="+c.Gateway.String())
	}
	if c.MAC != nil {
		parts = append(parts, "mac="+c.MAC.String())
	}
	for _, d := range c.DNS {
		parts = append(parts, "dns="+d.String())
	}
	return strings.Join(parts, ",")
}

// Apply configures the running system (the calling thread's network
// namespace): it brings lo and the interface with c.MAC (else eth0) up,
// puts c.IP on it, routes by default via c.Gateway and writes c.DNS to the
// resolv.conf. It is idempotent.
func Apply(c Config) error {
	if !c.IP.IsValid() {
		return errors.New("configuring the network: no address")
	}
	if lo, err := netlink.LinkByName("lo"); err == nil {
		if err := netlink.LinkSetUp(lo); err != nil {
			return fmt.Errorf("bringing lo up: %w", err)
		}
	}
	link, err := findLink(c.MAC)
	if err != nil {
		return err
	}
	name := link.Attrs().Name
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("bringing %s up: %w", name, err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: c.IP.Addr().AsSlice(), Mask: net.CIDRMask(c.IP.Bits(), 32)}}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return fmt.Errorf("adding %s to %s: %w", c.IP, name, err)
	}
	if c.Gateway.IsValid() {
		route := &netlink.Route{
			LinkIndex: link.Attrs().Index,
			Dst:       &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
			Gw:        c.Gateway.AsSlice(),
		}
		if err := netlink.RouteReplace(route); err != nil {
			return fmt.Errorf("adding the default route via %s on %s: %w", c.Gateway, name, err)
		}
	}
	if len(c.DNS) > 0 {
		path := c.ResolvConf
		if path == "" {
			path = DefaultResolvConf
		}
		var b strings.Builder
		b.WriteString("# written by fc-agent from aetherium.net\n")
		for _, d := range c.DNS {
			fmt.Fprintf(&b, "nameserver %s\n", d)
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return fmt.Errorf("writing %s: %w", path, err)
		}
		if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
			return fmt.Errorf("writing %s: %w", path, err)
		}
	}
	return nil
}

// findLink returns the interface with mac, or DefaultInterface when mac is
// nil or no interface has it.
func findLink(mac net.HardwareAddr) (netlink.Link, error) {
	if mac != nil {
		links, err := netlink.LinkList()
		if err != nil {
			return nil, fmt.Errorf("listing interfaces: %w", err)
		}
		for _, l := range links {
			if l.Attrs().HardwareAddr.String() == mac.String() {
				return l, nil
			}
		}
	}
	link, err := netlink.LinkByName(DefaultInterface)
	if err != nil {
		if mac != nil {
			return nil, fmt.Errorf("no interface has MAC %s, and %s: %w", mac, DefaultInterface, err)
		}
		return nil, fmt.Errorf("finding %s: %w", DefaultInterface, err)
	}
	return link, nil
}
