// Command aether-api is Aetherium Core's HTTP API (docs/api.md): it serves
// the TaskService over PostgreSQL and Redis to API-key holders, and the
// E2B-compatible API (docs/e2b.md) at the root of the same listener.
package main

import (
	"cmp"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/aetherium/aetherium-core/internal/wiring"
	"github.com/aetherium/aetherium-core/pkg/api"
	"github.com/aetherium/aetherium-core/pkg/config"
	"github.com/aetherium/aetherium-core/pkg/e2b"
)

// defaultListen is where the API serves when api.listen is empty.
const defaultListen = "127.0.0.1:8080"

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "aether-api:", err)
		os.Exit(1)
	}
}

func run() error {
	cfgPath := flag.String("config", "", "configuration file (default: $AETHERIUM_CONFIG, ./aetherium.yaml, ~/.config/aetherium/config.yaml)")
	flag.Parse()
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return err
	}
	log := wiring.Logger(cfg.Log, os.Stderr)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	startCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	svc, err := wiring.OpenService(startCtx, cfg, log)
	if err != nil {
		return err
	}
	defer svc.Close()
	c := cfg.API
	if (c.TLSCertFile == "") != (c.TLSKeyFile == "") {
		return fmt.Errorf("api.tls_cert_file and api.tls_key_file must be set together (cert %q, key %q)", c.TLSCertFile, c.TLSKeyFile)
	}
	e2bSrv := e2b.New(e2b.Config{
		DefaultLimits: c.Limits,
		Domain:        c.E2BDomain,
		MaxVCPUs:      cfg.VMM.MaxVCPUs,
	}, svc, svc.Service, svc.Store, svc.Store, log.With("component", "e2b"))
	defer e2bSrv.Close()
	srv := api.New(api.Config{
		DefaultLimits:     c.Limits,
		MaxBodyBytes:      c.MaxBodyBytes,
		MaxFileBytes:      c.MaxFileBytes,
		MaxTTL:            c.MaxTTL,
		MetricsEnabled:    !c.MetricsDisabled,
		ReadHeaderTimeout: c.ReadHeaderTimeout,
		IdleTimeout:       c.IdleTimeout,
		ShutdownTimeout:   c.ShutdownTimeout,
		TLSCertFile:       c.TLSCertFile,
		TLSKeyFile:        c.TLSKeyFile,
	}, svc, svc.Store, log, api.WithStore(svc.Store), api.WithFallback(e2bSrv.Handler()))

	addr := cmp.Or(c.Listen, defaultListen)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listening on %s (api.listen): %w", addr, err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()
	log.Info("serving the API", "addr", ln.Addr().String(), "tls", c.TLSCertFile != "")
	if c.ReadyFile != "" {
		if err := os.WriteFile(c.ReadyFile, []byte(ln.Addr().String()+"\n"), 0o644); err != nil {
			stop()
			<-served
			return fmt.Errorf("writing ready file: %w", err)
		}
		defer os.Remove(c.ReadyFile)
	}
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	log.Info("signal received; draining requests", "timeout", cmp.Or(c.ShutdownTimeout, api.DefaultShutdownTimeout))
	e2bSrv.Close() // E2B process streams end now instead of holding the drain up
	return <-served
}
