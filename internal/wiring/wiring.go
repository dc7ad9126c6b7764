// Package wiring is the one place that picks concrete implementations
// (PostgreSQL, Redis, a VM backend) from configuration. The binaries in
// cmd/ call it; nothing in pkg/ does.
package wiring

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/config"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/docker"
)

// Logger builds the process logger from the log section.
func Logger(c config.Log, w *os.File) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(strings.ToUpper(c.Level)))
	opts := &slog.HandlerOptions{Level: lvl}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// OpenStore connects to the configured store.
func OpenStore(ctx context.Context, c *config.Config) (storage.Store, error) {
	return postgres.Open(ctx, c.Storage.DSN())
}

// RedisConfig returns the queue's Redis location.
func RedisConfig(c *config.Config) queue.RedisConfig {
	return queue.RedisConfig{Addr: c.Queue.RedisAddr, Password: c.Queue.RedisPassword, DB: c.Queue.RedisDB}
}

// OpenQueue connects to the configured queue.
func OpenQueue(ctx context.Context, c *config.Config) (*queue.Redis, error) {
	return queue.NewRedis(ctx, RedisConfig(c))
}

// Service is a TaskService with the connections it holds.
type Service struct {
	*service.TaskService
	Store storage.Store
	Queue *queue.Redis
}

// Close releases the connections.
func (s *Service) Close() {
	s.Queue.Close()
	s.Store.Close()
}

// OpenService connects to storage and the queue and returns the API.
func OpenService(ctx context.Context, c *config.Config, log *slog.Logger) (*Service, error) {
	st, err := OpenStore(ctx, c)
	if err != nil {
		return nil, err
	}
	q, err := OpenQueue(ctx, c)
	if err != nil {
		st.Close()
		return nil, err
	}
	opts := []service.Option{service.WithProvider(c.VMM.Provider), service.WithLogger(log)}
	if c.VMM.MaxVCPUs > 0 {
		opts = append(opts, service.WithMaxVCPUs(c.VMM.MaxVCPUs))
	}
	return &Service{TaskService: service.NewTaskService(q, st, opts...), Store: st, Queue: q}, nil
}

// AgentPath is where the fc-agent binary is expected when the config names
// none: next to the running executable (bin/ after `make build`).
func AgentPath(c *config.Config) string {
	if c.VMM.Docker.AgentPath != "" {
		return c.VMM.Docker.AgentPath
	}
	exe, err := os.Executable()
	if err != nil {
		return "fc-agent"
	}
	return filepath.Join(filepath.Dir(exe), "fc-agent")
}

// NewOrchestrator builds the configured VM backend for worker owner.
func NewOrchestrator(ctx context.Context, c *config.Config, owner string, log *slog.Logger) (vmm.VMOrchestrator, error) {
	switch c.VMM.Provider {
	case "docker":
		return docker.New(ctx, docker.Config{
			Host:        c.VMM.Docker.Host,
			AgentPath:   AgentPath(c),
			BusyboxPath: c.VMM.Docker.BusyboxPath,
			SocketDir:   c.VMM.Docker.SocketDir,
			Image:       c.VMM.Docker.Image,
			MaxVCPUs:    c.VMM.MaxVCPUs,
			Owner:       owner,
			Logger:      log.With("provider", "docker"),
		})
	default:
		return nil, fmt.Errorf("%w: vmm.provider %q is not available in this build yet; use docker", types.ErrNotSupported, c.VMM.Provider)
	}
}

// CheckVMM checks from this host that the configured backend is usable,
// without creating anything.
func CheckVMM(ctx context.Context, c *config.Config) error {
	switch c.VMM.Provider {
	case "docker":
		return docker.Ping(ctx, c.VMM.Docker.Host)
	default:
		return fmt.Errorf("%w: vmm.provider %q is not available in this build yet", types.ErrNotSupported, c.VMM.Provider)
	}
}
