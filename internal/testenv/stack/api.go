package stack

import (
	"cmp"
	"context"
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/api"
	"github.com/aetherium/aetherium-core/pkg/apikey"
	"github.com/aetherium/aetherium-core/pkg/e2b"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// APIOptions tune StartAPI. The zero value is an API with the pkg/api
// defaults, metrics on and no limits.
type APIOptions struct {
	// Limits are the per-tenant defaults (api.Config.DefaultLimits).
	Limits types.Limits
	// MaxBodyBytes, MaxFileBytes, MaxTTL and ShutdownTimeout: see
	// api.Config (zero: its defaults).
	MaxBodyBytes    int64
	MaxFileBytes    int64
	MaxTTL          time.Duration
	ShutdownTimeout time.Duration
	// MetricsDisabled turns GET /metrics off.
	MetricsDisabled bool
	// TLSCertFile and TLSKeyFile make the API serve HTTPS; URL then starts
	// with https://.
	TLSCertFile string
	TLSKeyFile  string
	// E2B serves the E2B-compatible API (pkg/e2b) at the listener's root,
	// with E2BDomain as its domain (empty: no host routing).
	E2B       bool
	E2BDomain string
	// Service, when set, is what the API serves instead of the stack's
	// Service (a test's variant of it, e.g. over a queue that fails).
	Service *service.Service
}

// API is an aether-api serving the stack's Service on 127.0.0.1.
type API struct {
	// URL is the base URL, e.g. http://127.0.0.1:41234 (no trailing /).
	URL    string
	Server *api.Server
	// E2B is the E2B-compatible API when APIOptions.E2B is set.
	E2B   *e2b.Server
	stack *Stack
	keys  atomic.Int64
	done  chan struct{} // closed when Serve returned
	err   error         // Serve's result
}

// StartAPI runs a real api.Server over s.Service and s.Store on a free
// port, stopped (Shutdown, then Serve's result checked) at the end of t.
func (s *Stack) StartAPI(t testing.TB, o APIOptions) *API {
	t.Helper()
	opts := []api.Option{api.WithStore(s.Store)}
	var e2bSrv *e2b.Server
	if o.E2B {
		e2bSrv = e2b.New(e2b.Config{DefaultLimits: o.Limits, Domain: o.E2BDomain}, s.Service, s.Service, s.Store, s.Store,
			logger(t).With("component", "e2b"))
		opts = append(opts, api.WithFallback(e2bSrv.Handler()))
	}
	srv := api.New(api.Config{
		DefaultLimits:   o.Limits,
		MaxBodyBytes:    o.MaxBodyBytes,
		MaxFileBytes:    o.MaxFileBytes,
		MaxTTL:          o.MaxTTL,
		MetricsEnabled:  !o.MetricsDisabled,
		ShutdownTimeout: o.ShutdownTimeout,
		TLSCertFile:     o.TLSCertFile,
		TLSKeyFile:      o.TLSKeyFile,
	}, cmp.Or(o.Service, s.Service), s.Store, logger(t).With("component", "api"), opts...)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	scheme := "http"
	if o.TLSCertFile != "" && o.TLSKeyFile != "" {
		scheme = "https"
	}
	a := &API{URL: fmt.Sprintf("%s://%s", scheme, ln.Addr()), Server: srv, E2B: e2bSrv, stack: s, done: make(chan struct{})}
	go func() {
		a.err = srv.Serve(context.Background(), ln)
		close(a.done)
	}()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("stopping the API: %v", err)
		}
		if err := a.Wait(); err != nil {
			t.Errorf("API server: %v", err)
		}
	})
	if e2bSrv != nil {
		t.Cleanup(e2bSrv.Close) // runs first, as aether-api does on SIGTERM
	}
	return a
}

// Key creates an API key in the stack's store and returns it whole, for
// an Authorization: Bearer header or AETHERIUM_API_KEY. An empty o.Name
// gets a unique one; an empty o.Tenant is apikey.DefaultTenant.
func (a *API) Key(t testing.TB, o apikey.Options) string {
	t.Helper()
	if o.Name == "" {
		o.Name = fmt.Sprintf("test-key-%d", a.keys.Add(1))
	}
	_, key, err := apikey.Create(context.Background(), a.stack.Store, o)
	require.NoError(t, err)
	return key
}

// Wait blocks until Serve has returned (after a Shutdown) and returns its
// error.
func (a *API) Wait() error {
	<-a.done
	return a.err
}
