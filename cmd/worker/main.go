// Command worker is the Aetherium Core worker daemon: it takes tasks from
// Redis and does them with the configured VM backend.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/aetherium/aetherium-core/internal/wiring"
	"github.com/aetherium/aetherium-core/pkg/config"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
	"github.com/aetherium/aetherium-core/pkg/worker"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
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

	startCtx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	if cfg.Worker.AutoMigrate {
		if err := postgres.MigrateUp(startCtx, cfg.Storage.DSN()); err != nil {
			return fmt.Errorf("applying migrations: %w", err)
		}
	}
	store, err := wiring.OpenStore(startCtx, cfg)
	if err != nil {
		return err
	}
	defer store.Close()
	q, err := wiring.OpenQueue(startCtx, cfg)
	if err != nil {
		return err
	}
	defer q.Close()
	orch, err := wiring.NewOrchestrator(startCtx, cfg, cfg.Worker.ID, log, store)
	if err != nil {
		return err
	}
	defer orch.Close()
	installer, err := wiring.WorkerTools(cfg, log)
	if err != nil {
		return err
	}
	w, err := worker.New(worker.Config{
		ID:                cfg.Worker.ID,
		Provider:          cfg.VMM.Provider,
		NetworkByDefault:  cfg.Network.Enabled,
		Redis:             wiring.RedisConfig(cfg),
		Concurrency:       cfg.Worker.Concurrency,
		TaskCheckInterval: cfg.Queue.TaskCheckInterval,
		ShutdownTimeout:   cfg.Worker.ShutdownTimeout,
		HeartbeatInterval: cfg.Worker.HeartbeatInterval,
		DeadAfter:         cfg.Worker.DeadAfter,
		SnapshotDir:       cfg.Worker.SnapshotDir,
		MaxOutputBytes:    cfg.VMM.MaxOutputBytes,
		DataListen:        cfg.Worker.DataListen,
		DataAdvertise:     cfg.Worker.DataAdvertise,
		ClusterToken:      cfg.Cluster.Token,
		MetricsListen:     cfg.Worker.MetricsListen,
		ExpiryInterval:    cfg.Worker.ExpiryInterval,
		Tools:             installer,
		ToolDefaults:      cfg.Tools.Defaults,
		Logger:            log,
	}, store, orch, q, q)
	if err != nil {
		return err
	}
	if err := w.Start(startCtx); err != nil {
		return err
	}
	if cfg.Worker.ReadyFile != "" {
		if err := os.WriteFile(cfg.Worker.ReadyFile, []byte(cfg.Worker.ID+"\n"), 0o644); err != nil {
			w.Stop()
			return fmt.Errorf("writing ready file: %w", err)
		}
		defer os.Remove(cfg.Worker.ReadyFile)
	}
	<-ctx.Done()
	log.Info("signal received; draining tasks in flight", "timeout", cfg.Worker.ShutdownTimeout)
	w.Stop()
	return nil
}
