package tools

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// cgnat is the shared address space (RFC 6598), which netip does not
// count as private but which reaches a provider's internal hosts.
var cgnat = netip.MustParsePrefix("100.64.0.0/10")

// internalAddr reports whether a is an address the worker's host must not
// fetch for a caller: loopback, link-local (cloud metadata lives at
// 169.254.169.254), private, shared, unspecified or multicast.
func internalAddr(a netip.Addr) bool {
	a = a.Unmap()
	return a.IsLoopback() || a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() || a.IsPrivate() ||
		a.IsUnspecified() || a.IsMulticast() || a.IsInterfaceLocalMulticast() || cgnat.Contains(a)
}

// checkURLs refuses a spec whose options hold an http(s) URL naming an
// internal address, directly or through a name that resolves to one. The
// check resolves names once; mise resolves them again when it downloads,
// so a name whose answer changes in between (DNS rebinding) is not caught
// here: hosts that need that closed must also filter the worker's egress.
func checkURLs(ctx context.Context, s Spec, resolver *net.Resolver) error {
	for _, opt := range strings.Split(s.Options, ",") {
		_, v, ok := strings.Cut(opt, "=")
		if !ok || !(strings.HasPrefix(v, "http://") || strings.HasPrefix(v, "https://")) {
			continue
		}
		u, err := url.Parse(v)
		if err != nil || u.Hostname() == "" {
			return fmt.Errorf("%w: tool spec %q: %q is not a URL with a host", types.ErrInvalid, s, v)
		}
		host := u.Hostname()
		var addrs []netip.Addr
		if a, err := netip.ParseAddr(host); err == nil {
			addrs = []netip.Addr{a}
		} else {
			ips, err := resolver.LookupNetIP(ctx, "ip", host)
			if err != nil {
				return fmt.Errorf("%w: tool spec %q: cannot resolve %s: %v", types.ErrUnavailable, s, host, err)
			}
			addrs = ips
		}
		for _, a := range addrs {
			if internalAddr(a) {
				return fmt.Errorf("%w: tool spec %q: %s is %s, a loopback, link-local or private address; the worker's host does not fetch those for callers (an operator can allow a trusted local mirror with tools.allow_private_urls)",
					types.ErrInvalid, s, host, a)
			}
		}
	}
	return nil
}
