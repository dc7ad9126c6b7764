package e2b

import (
	"context"
	"crypto/sha256"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestMetadataFilter(t *testing.T) {
	cases := []struct {
		name, in string
		want     map[string]string
	}{
		{"none", "", nil},
		{"plain", "a%3Db%26c%3Dd", map[string]string{"a": "b", "c": "d"}},
		// What SDK 2.51.0 sends for {'a b':'c&d=e','ü':'%'} once net/url
		// has removed the query's own encoding.
		{"triple encoded", "a%2520b%3Dc%2526d%253De%26%25C3%25BC%3D%2525", map[string]string{"a b": "c&d=e", "ü": "%"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := metadataFilter(tc.in)
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
		})
	}
	_, err := metadataFilter("%zz")
	require.Error(t, err)
}

func TestHostSandbox(t *testing.T) {
	s := &Server{cfg: Config{Domain: "sbx.example.com"}.withDefaults()}
	cases := []struct {
		host, id, port string
		ok             bool
	}{
		{"49983-7d444840-9dc0-11d1-b245-5ffdce74fad2.sbx.example.com", "7d444840-9dc0-11d1-b245-5ffdce74fad2", "49983", true},
		{"49983-abc.SBX.example.com:443", "abc", "49983", true},
		{"3000-abc.sbx.example.com", "abc", "3000", true},
		{"sbx.example.com", "", "", false},
		{"49983-abc.other.com", "", "", false},
		{"a.49983-abc.sbx.example.com", "", "", false},
		{"127.0.0.1:8080", "", "", false},
	}
	for _, tc := range cases {
		id, port, ok := s.hostSandbox(tc.host)
		require.Equal(t, tc.ok, ok, tc.host)
		if ok {
			require.Equal(t, tc.id, id, tc.host)
			require.Equal(t, tc.port, port, tc.host)
		}
	}
	none := &Server{cfg: Config{}.withDefaults()}
	_, _, ok := none.hostSandbox("49983-abc.sbx.example.com")
	require.False(t, ok, "no domain: no host routing")
}

func TestTokenMatches(t *testing.T) {
	h1 := sha256.Sum256([]byte("one"))
	h2 := sha256.Sum256([]byte("two"))
	hashes := [][]byte{h1[:], h2[:]}
	require.True(t, tokenMatches(hashes, "one"))
	require.True(t, tokenMatches(hashes, "two"))
	require.False(t, tokenMatches(hashes, "three"))
	require.False(t, tokenMatches(hashes, ""))
	require.False(t, tokenMatches(nil, "one"))
}

func TestRPCUser(t *testing.T) {
	cases := []struct {
		header, want string
		ok           bool
	}{
		{"", "", true},
		{"Basic cm9vdDo=", "root", true},
		{"basic dXNlcjo=", "user", true},
		{"Bearer x", "", false},
		{"Basic !!!", "", false},
	}
	for _, tc := range cases {
		h := http.Header{}
		if tc.header != "" {
			h.Set("Authorization", tc.header)
		}
		got, err := rpcUser(h)
		if !tc.ok {
			require.Error(t, err, tc.header)
			continue
		}
		require.NoError(t, err, tc.header)
		require.Equal(t, tc.want, got, tc.header)
	}
}

func TestTimeoutTTL(t *testing.T) {
	n := func(v int64) *int64 { return &v }
	for _, tc := range []struct {
		in   *int64
		want time.Duration
		ok   bool
	}{
		{nil, DefaultTimeout, true},
		{n(1), time.Second, true},
		{n(maxTimeout), maxTimeout * time.Second, true},
		{n(0), 0, false},
		{n(-5), 0, false},
		{n(maxTimeout + 1), 0, false},
		{n(1 << 62), 0, false},
	} {
		got, err := timeoutRequest{Timeout: tc.in}.ttl(DefaultTimeout)
		if !tc.ok {
			require.Error(t, err)
			continue
		}
		require.NoError(t, err)
		require.Equal(t, tc.want, got)
	}
}

type noDialer struct{}

func (noDialer) DialAgent(context.Context, string) (net.Conn, error) {
	return nil, errors.New("not dialled in this test")
}

// TestClientCacheKeepsClientsInUse: the idle sweep closes only clients no
// request holds, so a long process stream is never cut off.
func TestClientCacheKeepsClientsInUse(t *testing.T) {
	cc := newClientCache(noDialer{}, 10*time.Millisecond, slog.New(slog.DiscardHandler))
	defer cc.close()
	held := func(id string) bool {
		cc.mu.Lock()
		defer cc.mu.Unlock()
		_, ok := cc.clients[id]
		return ok
	}
	_, release, err := cc.get(t.Context(), "sb")
	require.NoError(t, err)
	time.Sleep(100 * time.Millisecond)
	require.True(t, held("sb"), "a client in use survives the sweep")
	release()
	release() // harmless twice
	require.Eventually(t, func() bool { return !held("sb") }, 2*time.Second, 10*time.Millisecond, "an idle client is closed")
}
