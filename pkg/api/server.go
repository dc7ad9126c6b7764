// Package api is Aetherium Core's HTTP API: a JSON gateway in front of a
// service.TaskService, with API-key authentication, per-tenant scopes,
// NDJSON output streams, file transfer, Prometheus metrics and an OpenAPI
// document (openapi.yaml, served at GET /v1/openapi.json). docs/api.md
// describes it for users.
package api

import (
	"cmp"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/aetherium/aetherium-core/pkg/apikey"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Store is what the API reads from storage itself, beside the service:
// GET /healthz pings it and the aetherium_vms gauge counts its VMs at
// scrape time. storage.Store implements it.
type Store interface {
	// Ping checks the connection.
	Ping(ctx context.Context) error
	// CountVMs counts the live VMs by state and provider.
	CountVMs(ctx context.Context) ([]storage.VMCount, error)
}

// Option adds an optional dependency to New.
type Option func(*Server)

// WithStore gives the server a store for GET /healthz and the VM gauge.
// Without one, /healthz answers ok while the process runs and the gauge
// is not exported.
func WithStore(st Store) Option { return func(s *Server) { s.store = st } }

// WithFallback serves every request that no API route takes with h (for
// example the E2B-compatible API of pkg/e2b at the listener's root),
// instead of the JSON 404.
func WithFallback(h http.Handler) Option { return func(s *Server) { s.fallback = h } }

// Server serves the API. Make one with New; serve it with Serve or mount
// Handler in a server of your own (then call Shutdown before that
// server's Shutdown so that streams end).
type Server struct {
	cfg   Config
	svc   service.TaskService
	keys  apikey.Store
	store Store
	log   *slog.Logger
	// fallback takes the requests no route matches (WithFallback).
	fallback http.Handler

	handler  http.Handler
	registry *prometheus.Registry
	duration *prometheus.HistogramVec

	closing   context.Context // done when Shutdown begins
	drain     context.CancelFunc
	closeOnce sync.Once
	mu        sync.Mutex
	srv       *http.Server
}

// New returns a server acting through svc and authenticating with keys.
func New(cfg Config, svc service.TaskService, keys apikey.Store, log *slog.Logger, opts ...Option) *Server {
	s := &Server{cfg: cfg.withDefaults(), svc: svc, keys: keys, log: log}
	s.closing, s.drain = context.WithCancel(context.Background())
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	for _, o := range opts {
		o(s)
	}
	s.initMetrics()
	mux := http.NewServeMux()
	s.routes(mux)
	s.handler = mux
	if s.fallback != nil {
		s.handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if _, pattern := mux.Handler(r); pattern == "/" {
				s.fallback.ServeHTTP(w, r)
				return
			}
			mux.ServeHTTP(w, r)
		})
	}
	return s
}

// Handler returns the API's http.Handler.
func (s *Server) Handler() http.Handler { return s.handler }

// Serve answers requests on ln until ctx ends or Shutdown is called, then
// drains: requests in flight get ShutdownTimeout to finish, and open
// output streams end at once with an "unavailable" error line. It speaks
// HTTPS when the config names a certificate. Serve returns nil after a
// clean shutdown.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	// No ReadTimeout or WriteTimeout: uploads, downloads and output
	// streams may rightly last long. Streams bound each write instead.
	srv := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: s.cfg.ReadHeaderTimeout,
		IdleTimeout:       s.cfg.IdleTimeout,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
		BaseContext:       func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	s.mu.Lock()
	if s.srv != nil {
		s.mu.Unlock()
		return errors.New("api: Serve called twice")
	}
	s.srv = srv
	s.mu.Unlock()
	select {
	case <-s.closing.Done():
		return http.ErrServerClosed
	default:
	}

	stopped := make(chan error, 1)
	serving := make(chan struct{})
	defer close(serving)
	go func() {
		select {
		case <-ctx.Done():
			stopped <- s.Shutdown(context.Background())
		case <-s.closing.Done():
			stopped <- nil
		case <-serving: // Serve failed on its own
		}
	}()
	var err error
	if s.cfg.TLS() {
		srv.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		err = srv.ServeTLS(ln, s.cfg.TLSCertFile, s.cfg.TLSKeyFile)
	} else {
		err = srv.Serve(ln)
	}
	if !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return <-stopped
}

// Shutdown stops Serve: it ends open output streams, waits for the other
// requests up to ctx's deadline (ShutdownTimeout when ctx has none) and
// then closes what remains. Calling it twice is harmless.
func (s *Server) Shutdown(ctx context.Context) error {
	s.closeOnce.Do(s.drain)
	s.mu.Lock()
	srv := s.srv
	s.mu.Unlock()
	if srv == nil {
		return nil
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.cfg.ShutdownTimeout)
		defer cancel()
	}
	err := srv.Shutdown(ctx)
	if err != nil {
		srv.Close()
		return fmt.Errorf("draining the API: %w; closed the remaining connections", err)
	}
	return nil
}

// handlerFunc is a route handler; the error it returns is written by
// httpError unless the response has begun.
type handlerFunc func(w http.ResponseWriter, r *http.Request) error

// reqInfo travels in a request's context for logs.
type reqInfo struct {
	id     string
	keyID  string
	tenant string
}

type reqInfoKey struct{}

func infoOf(ctx context.Context) *reqInfo {
	if ri, ok := ctx.Value(reqInfoKey{}).(*reqInfo); ok {
		return ri
	}
	return &reqInfo{}
}

// handle registers h under pattern ("METHOD /path") with the middleware
// every route shares: request id, metrics, logging, and, when auth is
// set, the API key and the caller's scope.
func (s *Server) handle(mux *http.ServeMux, pattern string, auth bool, h handlerFunc) {
	method, route, ok := strings.Cut(pattern, " ")
	if !ok {
		method, route = "", pattern
	}
	mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		method := cmp.Or(method, r.Method)
		ri := &reqInfo{id: newRequestID()}
		sw := &statusWriter{ResponseWriter: w}
		sw.Header().Set("X-Request-Id", ri.id)
		defer func() {
			code := sw.code()
			s.duration.WithLabelValues(method, route, strconv.Itoa(code)).Observe(time.Since(start).Seconds())
			lvl := slog.LevelDebug
			if code >= 500 {
				lvl = slog.LevelWarn
			}
			s.log.Log(r.Context(), lvl, "request", "method", method, "route", route, "status", code,
				"duration", time.Since(start), "request_id", ri.id, "key_id", ri.keyID, "tenant", ri.tenant)
		}()
		ctx := context.WithValue(r.Context(), reqInfoKey{}, ri)
		if auth {
			k, err := s.authenticate(ctx, r)
			if err != nil {
				s.writeError(sw, r.WithContext(ctx), err)
				return
			}
			ri.keyID, ri.tenant = k.ID, k.Tenant
			ctx = service.WithScope(ctx, service.Scope{Tenant: k.Tenant, Admin: k.Admin, Limits: k.Limits.Merge(s.cfg.DefaultLimits)})
		}
		r = r.WithContext(ctx)
		if err := h(sw, r); err != nil {
			s.writeError(sw, r, err)
		}
	})
}

// authenticate finds the caller's key in the Authorization or X-API-Key
// header. The key itself never reaches a log or an error.
func (s *Server) authenticate(ctx context.Context, r *http.Request) (*types.APIKey, error) {
	key := r.Header.Get("X-API-Key")
	if h := r.Header.Get("Authorization"); h != "" {
		scheme, tok, ok := strings.Cut(h, " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") {
			return nil, apikey.ErrUnauthenticated
		}
		key = tok
	}
	k, err := apikey.Authenticate(ctx, s.keys, key)
	switch {
	case errors.Is(err, apikey.ErrUnauthenticated):
		s.log.Info("rejected an API key", "key_id", apikey.ID(strings.TrimSpace(key)), "request_id", infoOf(ctx).id)
		return nil, err
	case err != nil:
		s.log.Error("checking an API key", "key_id", apikey.ID(strings.TrimSpace(key)), "request_id", infoOf(ctx).id, "error", err)
		return nil, fmt.Errorf("%w: cannot check the API key: the key store does not answer; try again shortly", types.ErrUnavailable)
	}
	return k, nil
}

// writeError answers err as JSON, or only logs it when the response has
// already begun.
func (s *Server) writeError(w *statusWriter, r *http.Request, err error) {
	ri := infoOf(r.Context())
	status, body := httpError(err, ri.id)
	if status >= 500 {
		s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "request_id", ri.id, "key_id", ri.keyID, "error", err)
	}
	if w.wrote {
		return
	}
	writeJSON(w, status, map[string]errorBody{"error": body})
}

// writeJSON answers v as JSON with status.
func writeJSON(w http.ResponseWriter, status int, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encoding the response: %w", err)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)+1))
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
	return nil
}

// decode reads a JSON body into v, strictly: one object, known fields
// only, at most MaxBodyBytes.
func (s *Server) decode(w http.ResponseWriter, r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		switch {
		case errors.As(err, &tooBig):
			return err
		case errors.Is(err, io.EOF):
			return badRequest("the request body is empty; send a JSON object")
		}
		return badRequest("the request body is not valid JSON for this route: %s", strings.TrimPrefix(err.Error(), "json: "))
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return err
		}
		return badRequest("the request body holds more than one JSON value; send one object")
	}
	return nil
}

// pathID parses the {name} path value as a UUID.
func pathID(r *http.Request, name string) (uuid.UUID, error) {
	v := r.PathValue(name)
	id, err := uuid.Parse(v)
	if err != nil {
		return uuid.Nil, badRequest("%q is not a valid id: ids are UUIDs such as 7d444840-9dc0-11d1-b245-5ffdce74fad2", v)
	}
	return id, nil
}

// queryBool parses a boolean query parameter; absent is false.
func queryBool(r *http.Request, name string) (bool, error) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, badRequest("query parameter %s=%q is not a boolean; use true or false", name, v)
	}
	return b, nil
}

// statusWriter remembers the status for metrics and logs and whether the
// response has begun. Unwrap lets http.ResponseController flush through.
type statusWriter struct {
	http.ResponseWriter
	status int
	wrote  bool
}

func (w *statusWriter) WriteHeader(code int) {
	if !w.wrote {
		w.status, w.wrote = code, true
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if !w.wrote {
		w.status, w.wrote = http.StatusOK, true
	}
	return w.ResponseWriter.Write(p)
}

func (w *statusWriter) Flush() {
	if !w.wrote {
		w.status, w.wrote = http.StatusOK, true
	}
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) code() int {
	if !w.wrote {
		return http.StatusOK
	}
	return w.status
}

func newRequestID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// waitCtx returns a context that also ends when Shutdown begins, so that
// waits do not hold the drain up.
func (s *Server) waitCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(s.closing, cancel)
	return ctx, func() { stop(); cancel() }
}

// shuttingDown reports whether Shutdown has begun.
func (s *Server) shuttingDown() bool { return s.closing.Err() != nil }
