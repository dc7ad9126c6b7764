// Package stack starts a whole Aetherium Core for integration tests: a
// fresh PostgreSQL database with the schema, a private Redis, the shared
// private dockerd, and any number of workers with the docker backend, plus
// the TaskService in front of them. Everything is real; only the harness is
// test code.
package stack

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/image"
	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/docker"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
	"github.com/aetherium/aetherium-core/pkg/worker"
)

// Stack is a running Aetherium Core.
type Stack struct {
	t          testing.TB
	DSN        string
	RedisAddr  string
	DockerHost string
	Provider   string
	Store      *postgres.Store
	Queue      *queue.Redis
	Service    *service.Service
	Workers    map[string]*worker.Worker
	VMMs       map[string]vmm.VMOrchestrator
	Networks   map[string]*network.Manager
	SocketDirs map[string]string
}

// Options tune a stack.
type Options struct {
	// Workers to start, by id. Default: one worker "w1".
	Workers []string
	// TaskCheckInterval of the workers (default: the worker's default).
	TaskCheckInterval time.Duration
	// MaxOutputBytes of the workers (default: the worker's default).
	MaxOutputBytes int
	// Provider is the workers' VM backend: docker (default) or qemu, which
	// boots real microVMs from the guest image (testenv.GuestImage).
	Provider string
	// Network, for qemu, gives the workers a network manager with this
	// config (its Netns should be a namespace the test made), with leases
	// in the stack's PostgreSQL. nil: no networking.
	Network *network.Config
}

// Start brings a stack up and registers its teardown with t.Cleanup.
func Start(t testing.TB, o Options) *Stack {
	t.Helper()
	if len(o.Workers) == 0 {
		o.Workers = []string{"w1"}
	}
	dsn := testenv.Postgres(t)
	redisAddr := testenv.Redis(t)
	var host, agentPath string
	var img *image.Manifest
	switch o.Provider {
	case "", docker.Provider:
		o.Provider = docker.Provider
		host = testenv.Dockerd(t)
		agentPath = testenv.BuildBinary(t, "fc-agent")
	case qemu.Provider:
		img = testenv.GuestImage(t)
	default:
		t.Fatalf("stack: unknown provider %q", o.Provider)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	require.NoError(t, postgres.MigrateUp(ctx, dsn))
	store, err := postgres.Open(ctx, dsn)
	require.NoError(t, err)
	t.Cleanup(store.Close)
	q, err := queue.NewRedis(ctx, queue.RedisConfig{Addr: redisAddr})
	require.NoError(t, err)
	t.Cleanup(func() { q.Close() })

	s := &Stack{t: t, DSN: dsn, RedisAddr: redisAddr, DockerHost: host, Store: store, Queue: q,
		Provider: o.Provider, Service: service.NewTaskService(q, store, service.WithProvider(o.Provider)), Workers: map[string]*worker.Worker{},
		VMMs: map[string]vmm.VMOrchestrator{}, Networks: map[string]*network.Manager{}, SocketDirs: map[string]string{}}
	for _, id := range o.Workers {
		// Unix socket paths are limited to 108 bytes: keep the directory short.
		dir, err := os.MkdirTemp("", "ae-"+id+"-")
		require.NoError(t, err)
		t.Cleanup(func() { os.RemoveAll(dir) })
		var orch vmm.VMOrchestrator
		if o.Provider == qemu.Provider {
			qc := qemu.Config{KernelPath: img.KernelPath(), InitrdPath: img.InitrdPath(), RootfsPath: img.RootfsPath(),
				RunDir: filepath.Join(dir, "vms"), Owner: id, Logger: logger(t).With("provider", "qemu")}
			if o.Network != nil {
				nc := *o.Network
				nc.Logger = logger(t).With("component", "network")
				m, err := network.New(nc, store)
				require.NoError(t, err)
				t.Cleanup(func() { m.Close() })
				s.Networks[id] = m
				qc.Network = m
			}
			orch, err = qemu.New(ctx, qc)
		} else {
			orch, err = docker.New(ctx, docker.Config{Host: host, AgentPath: agentPath, SocketDir: filepath.Join(dir, "vms"), Owner: id,
				Logger: logger(t).With("provider", "docker")})
		}
		require.NoError(t, err)
		w, err := worker.New(worker.Config{ID: id, Provider: o.Provider, Redis: queue.RedisConfig{Addr: redisAddr}, TaskCheckInterval: o.TaskCheckInterval,
			MaxOutputBytes: o.MaxOutputBytes, ShutdownTimeout: 20 * time.Second, HeartbeatInterval: time.Second, Logger: logger(t)},
			store, orch, q, q)
		require.NoError(t, err)
		require.NoError(t, w.Start(ctx))
		s.Workers[id], s.VMMs[id], s.SocketDirs[id] = w, orch, filepath.Join(dir, "vms")
		t.Cleanup(func() {
			w.Stop()
			// Remove whatever VMs the test left so nothing leaks into the
			// next test.
			cctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if vms, err := orch.ListVMs(cctx); err == nil {
				for _, v := range vms {
					_ = orch.DeleteVM(cctx, v.ID)
				}
			}
			orch.Close()
		})
	}
	return s
}

// logger sends warnings and errors to the test log.
func logger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s", p)
	return len(p), nil
}

// ConfigFile writes an aetherium.yaml pointing at this stack and returns
// its path, for tests of the binaries.
func (s *Stack) ConfigFile(t testing.TB) string {
	t.Helper()
	u, err := url.Parse(s.DSN)
	require.NoError(t, err)
	pass, _ := u.User.Password()
	body := fmt.Sprintf(`vmm:
  provider: %s
queue:
  redis_addr: %s
storage:
  host: %s
  port: %s
  database: %s
  user: %s
  password: %q
`, s.Provider, s.RedisAddr, u.Hostname(), u.Port(), strings.TrimPrefix(u.Path, "/"), u.User.Username(), pass)
	path := filepath.Join(t.TempDir(), "aetherium.yaml")
	require.NoError(t, os.WriteFile(path, []byte(body), 0o600))
	return path
}
