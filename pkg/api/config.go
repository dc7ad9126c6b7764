package api

import (
	"cmp"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Defaults of Config, applied with cmp.Or.
const (
	// DefaultMaxBodyBytes leaves room for the 4 MiB of stdin a command may
	// carry, base64-encoded.
	DefaultMaxBodyBytes int64 = 8 << 20
	// DefaultMaxFileBytes bounds one file upload.
	DefaultMaxFileBytes int64 = 1 << 30
	// DefaultReadHeaderTimeout bounds reading a request's headers.
	DefaultReadHeaderTimeout = 10 * time.Second
	// DefaultIdleTimeout closes idle keep-alive connections.
	DefaultIdleTimeout = 2 * time.Minute
	// DefaultShutdownTimeout is how long Shutdown lets requests finish.
	DefaultShutdownTimeout = 30 * time.Second
	// MaxWait caps a long poll (?wait= of GET /v1/tasks/{id}).
	MaxWait = 60 * time.Second
)

// Config tunes a Server. The zero value serves with the defaults above,
// no per-tenant limits, no TTL bound and no metrics.
type Config struct {
	// DefaultLimits apply to every tenant whose key leaves a field zero
	// (zero here too: no limit).
	DefaultLimits types.Limits
	// MaxBodyBytes bounds a JSON request body (413 beyond). Default
	// DefaultMaxBodyBytes.
	MaxBodyBytes int64
	// MaxFileBytes bounds one file upload (413 beyond). Default
	// DefaultMaxFileBytes.
	MaxFileBytes int64
	// MaxTTL bounds ttl_seconds (422 beyond). Zero: no bound.
	MaxTTL time.Duration
	// MetricsEnabled serves GET /metrics in the Prometheus text format.
	MetricsEnabled bool
	// ReadHeaderTimeout bounds reading a request's headers. Default
	// DefaultReadHeaderTimeout.
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes idle keep-alive connections. Default
	// DefaultIdleTimeout.
	IdleTimeout time.Duration
	// ShutdownTimeout is how long Shutdown (and the end of Serve's ctx)
	// lets requests in flight finish before closing their connections.
	// Default DefaultShutdownTimeout.
	ShutdownTimeout time.Duration
	// TLSCertFile and TLSKeyFile, both set, make Serve speak HTTPS (TLS 1.2
	// at least).
	TLSCertFile string
	TLSKeyFile  string
}

func (c Config) withDefaults() Config {
	c.MaxBodyBytes = cmp.Or(c.MaxBodyBytes, DefaultMaxBodyBytes)
	c.MaxFileBytes = cmp.Or(c.MaxFileBytes, DefaultMaxFileBytes)
	c.ReadHeaderTimeout = cmp.Or(c.ReadHeaderTimeout, DefaultReadHeaderTimeout)
	c.IdleTimeout = cmp.Or(c.IdleTimeout, DefaultIdleTimeout)
	c.ShutdownTimeout = cmp.Or(c.ShutdownTimeout, DefaultShutdownTimeout)
	return c
}

// TLS reports whether the config asks for HTTPS.
func (c Config) TLS() bool { return c.TLSCertFile != "" && c.TLSKeyFile != "" }
