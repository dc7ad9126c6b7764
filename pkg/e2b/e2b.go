// Package e2b serves E2B's sandbox API on top of Aetherium, so that the
// unmodified E2B SDKs drive Aetherium VMs (docs/e2b.md). It has two planes,
// which share one listener because their paths never collide:
//
//   - the control plane (/sandboxes, /v2/sandboxes), authenticated by an
//     Aetherium API key in X-API-KEY and acting through service.TaskService
//     with the key's tenant, limits and TTL bound;
//   - the sandbox plane, E2B's in-sandbox daemon "envd" (Connect RPCs
//     /process.Process/* and /filesystem.Filesystem/*, GET/POST /files,
//     GET /health), keyed by the E2b-Sandbox-Id header or a
//     49983-<id>.<domain> host, authorised only by the sandbox's access
//     token and answered from the guest agent (pkg/agent), reached through
//     the owning worker.
//
// A sandbox is a VM: its id is the VM id, its metadata are the VM's labels
// and its timeout is the VM's TTL.
package e2b

import (
	"cmp"
	"context"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/aetherium/aetherium-core/pkg/apikey"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Defaults of Config, applied with cmp.Or.
const (
	// DefaultTimeout is a sandbox's TTL when create gives none (E2B's).
	DefaultTimeout = 300 * time.Second
	// DefaultCreateWait bounds how long create waits for the VM to run:
	// the SDKs give up on a control-plane call after 60 s.
	DefaultCreateWait = 55 * time.Second
	// DefaultClientIdle closes an agent connection unused for that long.
	DefaultClientIdle = 5 * time.Minute
	// BaseVCPUs and BaseMemoryMB size the built-in template "base" (the
	// default guest image); its vCPUs are capped to MaxVCPUs.
	BaseVCPUs    = 2
	BaseMemoryMB = 512
	// BaseTemplate is the template of sandboxes created without one.
	BaseTemplate = "base"
	// EnvdPort is the port of envd in E2B's sandbox host names.
	EnvdPort = "49983"
	// EnvdVersion is the envd version reported to the SDKs. 0.5.7 makes
	// them leave the user to the server, allows closeStdin and streamed,
	// gzip and octet-stream uploads, and makes them refuse client-side
	// what is not served (file metadata, watch includeEntry).
	EnvdVersion = "0.5.7"
	// ClientID is the clientID answered for every sandbox.
	ClientID = "aetherium"
)

// Config tunes a Server. The zero value works.
type Config struct {
	// DefaultLimits apply to every tenant whose key leaves a field zero
	// (the API's limits; zero: no limit).
	DefaultLimits types.Limits
	// Domain is api.e2b_domain: answered as each sandbox's domain, and
	// requests for host 49983-<id>.<Domain> are served as that sandbox's
	// envd. Empty: no host routing; clients set E2B_SANDBOX_URL.
	Domain string
	// DefaultTimeout is the TTL of a sandbox created without a timeout.
	// Default DefaultTimeout.
	DefaultTimeout time.Duration
	// CreateWait bounds how long create waits for the VM to run. Default
	// DefaultCreateWait.
	CreateWait time.Duration
	// MaxVCPUs caps the vCPUs of the built-in base template. Default: this
	// host's CPU count.
	MaxVCPUs int
	// ClientIdle closes a sandbox's agent connection unused for that
	// long. Default DefaultClientIdle.
	ClientIdle time.Duration
}

func (c Config) withDefaults() Config {
	c.DefaultTimeout = cmp.Or(c.DefaultTimeout, DefaultTimeout)
	c.CreateWait = cmp.Or(c.CreateWait, DefaultCreateWait)
	c.MaxVCPUs = cmp.Or(c.MaxVCPUs, runtime.NumCPU())
	c.ClientIdle = cmp.Or(c.ClientIdle, DefaultClientIdle)
	c.Domain = strings.Trim(strings.ToLower(c.Domain), ".")
	return c
}

// Store is what the server keeps itself, beside the service: sandboxes
// and their token hashes, and templates. storage.Store implements it.
type Store interface {
	// CreateSandbox records a sandbox of an existing VM.
	CreateSandbox(ctx context.Context, sb *storage.Sandbox) error
	// GetSandbox returns the sandbox of a VM, or types.ErrNotFound.
	GetSandbox(ctx context.Context, vmID string) (*storage.Sandbox, error)
	// AddSandboxToken adds one more token hash to a sandbox.
	AddSandboxToken(ctx context.Context, vmID string, hash []byte) error
	// GetTemplate returns a registered template, or types.ErrNotFound.
	GetTemplate(ctx context.Context, name string) (*storage.Template, error)
	// FindSnapshot returns the live snapshot of kind named name, or
	// types.ErrNotFound: a template built into one starts its sandboxes
	// by restoring it.
	FindSnapshot(ctx context.Context, kind types.SnapshotKind, name string) (*types.Snapshot, error)
	// SetVMExpiry sets (nil: clears) when a VM expires: a paused sandbox
	// does not time out, as in E2B.
	SetVMExpiry(ctx context.Context, id string, at *time.Time) (*types.VM, error)
}

// Server serves the E2B API. Make one with New, mount Handler, and call
// Close when done.
type Server struct {
	cfg    Config
	svc    service.TaskService
	dialer service.AgentDialer
	store  Store
	keys   apikey.Store
	log    *slog.Logger

	control http.Handler
	envd    http.Handler
	clients *clientCache

	closing   context.Context // done once Close is called: open streams end
	drain     context.CancelFunc
	closeOnce sync.Once
}

// New returns a server acting through svc, reaching guests through
// dialer, keeping sandboxes and templates in store and authenticating
// control-plane calls with keys.
func New(cfg Config, svc service.TaskService, dialer service.AgentDialer, store Store, keys apikey.Store, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg.withDefaults(), svc: svc, dialer: dialer, store: store, keys: keys, log: log}
	s.closing, s.drain = context.WithCancel(context.Background())
	s.clients = newClientCache(dialer, s.cfg.ClientIdle, log)
	s.control = s.controlRoutes()
	s.envd = s.envdRoutes()
	return s
}

// Close ends the open process streams (the processes run on; clients
// can reconnect to them elsewhere) and closes the agent connections the
// server holds; later sandbox-plane calls answer unavailable. Call it
// when the server begins to drain, so that streams do not hold the drain
// up. Calling it twice is harmless.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		s.drain()
		s.clients.close()
	})
}

// streamCtx returns a context that also ends when Close is called.
func (s *Server) streamCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(s.closing, cancel)
	return ctx, func() { stop(); cancel() }
}

// closed reports whether Close was called.
func (s *Server) closed() bool { return s.closing.Err() != nil }

// Handler returns the handler of both planes.
func (s *Server) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if id, port, ok := s.hostSandbox(r.Host); ok {
			if port != EnvdPort {
				writeEnvdError(w, http.StatusBadGateway, "port "+port+" of sandbox "+id+" is not served: Aetherium serves only envd (port "+EnvdPort+"), not ports opened in the sandbox")
				return
			}
			r.Header.Set(headerSandboxID, id)
			s.envd.ServeHTTP(w, r)
			return
		}
		if isEnvdPath(r.URL.Path) {
			s.envd.ServeHTTP(w, r)
			return
		}
		s.control.ServeHTTP(w, r)
	})
}

// hostSandbox parses a host name <port>-<id>.<domain>.
func (s *Server) hostSandbox(host string) (id, port string, ok bool) {
	if s.cfg.Domain == "" {
		return "", "", false
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	label, ok := strings.CutSuffix(strings.ToLower(host), "."+s.cfg.Domain)
	if !ok || strings.Contains(label, ".") {
		return "", "", false
	}
	port, id, ok = strings.Cut(label, "-")
	return id, port, ok && port != "" && id != ""
}

// isEnvdPath reports whether a path belongs to the sandbox plane.
func isEnvdPath(p string) bool {
	return p == "/files" || p == "/health" ||
		strings.HasPrefix(p, "/process.Process/") || strings.HasPrefix(p, "/filesystem.Filesystem/")
}
