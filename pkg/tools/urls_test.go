package tools

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
)

func TestInternalAddr(t *testing.T) {
	for _, a := range []string{"127.0.0.1", "::1", "169.254.169.254", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "fd00::1", "fe80::1", "0.0.0.0", "::ffff:127.0.0.1", "224.0.0.1"} {
		require.True(t, internalAddr(netip.MustParseAddr(a)), a)
	}
	for _, a := range []string{"203.0.113.7", "8.8.8.8", "2001:db8::1", "100.128.0.1"} {
		require.False(t, internalAddr(netip.MustParseAddr(a)), a)
	}
}

// TestCheckURLs: a spec whose URL names an internal address, literally or
// through a name, is refused with a message naming the setting; public
// addresses and options that are not URLs pass.
func TestCheckURLs(t *testing.T) {
	ctx := context.Background()
	// A resolver that answers every name from a fake DNS server would be
	// heavy; "localhost" resolves through /etc/hosts on every host.
	for _, raw := range []string{
		"http:hello[url=http://127.0.0.1:8080/hello-{{version}}.tar.gz]@1.0.0",
		"http:hello[url=http://169.254.169.254/latest/meta-data]@1",
		"http:hello[url=http://localhost/x.tar.gz]@1",
		"http:hello[url=http://10.0.0.5/x.tar.gz]@1",
	} {
		s, err := ParseSpec(raw)
		require.NoError(t, err, raw)
		err = checkURLs(ctx, s, net.DefaultResolver)
		require.ErrorIs(t, err, types.ErrInvalid, raw)
		require.ErrorContains(t, err, "tools.allow_private_urls", raw)
	}
	for _, raw := range []string{
		"http:hello[url=https://203.0.113.7/hello.tar.gz]@1.0.0",
		"node@22",
		"npm:cowsay@1.6.0",
	} {
		s, err := ParseSpec(raw)
		require.NoError(t, err, raw)
		require.NoError(t, checkURLs(ctx, s, net.DefaultResolver), raw)
	}
}

// TestInstallRefusesPrivateURL: by default an installer refuses a spec
// that would make the host fetch from loopback, before running mise.
func TestInstallRefusesPrivateURL(t *testing.T) {
	srv := newToolServer(t)
	m, err := NewMise(Config{Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	_, err = m.Install(context.Background(), []Spec{srv.spec(t, "1.0.0")})
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "127.0.0.1")
	require.Zero(t, srv.requests.Load(), "nothing was fetched")
}

// TestMiseEnv: mise gets PATH, locale and proxies of the worker's
// environment and nothing else, with npm's install scripts off.
func TestMiseEnv(t *testing.T) {
	env := miseBaseEnv([]string{"PATH=/usr/bin", "DATABASE_URL=postgres://secret", "AETHERIUM_API_KEY=aek_x", "MISE_DATA_DIR=/x", "HTTPS_PROXY=http://proxy:3128", "HOME=/root", "LANG=C.UTF-8"})
	require.Equal(t, []string{"PATH=/usr/bin", "HTTPS_PROXY=http://proxy:3128", "LANG=C.UTF-8", "npm_config_ignore_scripts=true"}, env)
	require.False(t, slices.ContainsFunc(env, func(kv string) bool { return strings.Contains(kv, "secret") }))
}
