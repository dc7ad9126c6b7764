package guestnet_test

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/network/guestnet"
)

func TestParse(t *testing.T) {
	mac, _ := net.ParseMAC("02:aa:bb:cc:dd:ee")
	for _, tc := range []struct {
		in   string
		want guestnet.Config
		err  string
	}{
		{in: "ip=10.88.0.5/16,gw=10.88.0.1,mac=02:aa:bb:cc:dd:ee,dns=192.0.2.53,dns=192.0.2.54", want: guestnet.Config{
			IP: netip.MustParsePrefix("10.88.0.5/16"), Gateway: netip.MustParseAddr("10.88.0.1"), MAC: mac,
			DNS: []netip.Addr{netip.MustParseAddr("192.0.2.53"), netip.MustParseAddr("192.0.2.54")},
		}},
		{in: "ip=10.88.0.5/16", want: guestnet.Config{IP: netip.MustParsePrefix("10.88.0.5/16")}},
		{in: "", err: "empty"},
		{in: "gw=10.88.0.1", err: "no ip="},
		{in: "ip=10.88.0.5", err: "ip="},
		{in: "ip=10.88.0.0/16", err: "host address"},
		{in: "ip=fd00::5/64", err: "IPv4"},
		{in: "ip=10.88.0.5/16,gw=10.99.0.1", err: "outside"},
		{in: "ip=10.88.0.5/16,ip=10.88.0.6/16", err: "twice"},
		{in: "ip=10.88.0.5/16,mac=zz", err: "mac="},
		{in: "ip=10.88.0.5/16,color=red", err: "unknown key"},
		{in: "ip=10.88.0.5/16,dns", err: "key=value"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := guestnet.Parse(tc.in)
			if tc.err != "" {
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
			require.Equal(t, tc.in, got.String(), "String is Parse's format")
		})
	}
}

func FuzzParse(f *testing.F) {
	f.Add("ip=10.88.0.5/16,gw=10.88.0.1,mac=02:aa:bb:cc:dd:ee,dns=192.0.2.53")
	f.Add("ip=10.0.0.2/8")
	f.Add("ip=,gw=")
	f.Fuzz(func(t *testing.T, in string) {
		c, err := guestnet.Parse(in)
		if err != nil {
			return
		}
		// What parses prints back to something that parses the same.
		again, err := guestnet.Parse(c.String())
		require.NoError(t, err)
		require.Equal(t, c, again)
	})
}

// TestApply configures a veth end in a test namespace, twice.
func TestApply(t *testing.T) {
	ns := testenv.NewNetns(t)
	h := testenv.NetlinkAt(t, ns)
	mac := net.HardwareAddr{0x02, 1, 2, 3, 4, 5}
	require.NoError(t, h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vm0", HardwareAddr: mac}, PeerName: "peer0"}))
	resolv := filepath.Join(t.TempDir(), "etc", "resolv.conf")
	cfg, err := guestnet.Parse("ip=10.88.0.5/16,gw=10.88.0.1,mac=02:01:02:03:04:05,dns=192.0.2.53")
	require.NoError(t, err)
	cfg.ResolvConf = resolv
	for range 2 {
		testenv.InNetns(t, ns, func() { err = guestnet.Apply(cfg) })
		require.NoError(t, err)
	}
	link, err := h.LinkByName("vm0")
	require.NoError(t, err)
	require.NotZero(t, link.Attrs().Flags&net.FlagUp, "the interface with the MAC is up")
	addrs, err := h.AddrList(link, netlink.FAMILY_V4)
	require.NoError(t, err)
	require.Len(t, addrs, 1)
	require.Equal(t, "10.88.0.5/16", addrs[0].IPNet.String())
	routes, err := h.RouteList(link, netlink.FAMILY_V4)
	require.NoError(t, err)
	var gw string
	for _, r := range routes {
		if r.Dst == nil || r.Dst.String() == "0.0.0.0/0" {
			gw = r.Gw.String()
		}
	}
	require.Equal(t, "10.88.0.1", gw)
	b, err := os.ReadFile(resolv)
	require.NoError(t, err)
	require.Contains(t, string(b), "nameserver 192.0.2.53\n")
}
