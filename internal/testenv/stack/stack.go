// Package stack starts a whole Aetherium Core for integration tests: a
// fresh PostgreSQL database with the schema, a private Redis, the shared
// private dockerd, and any number of workers with the docker backend, plus
// the TaskService in front of them. Everything is real; only the harness is
// test code.
package stack

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/dataplane"
	"github.com/aetherium/aetherium-core/pkg/image"
	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
	"github.com/aetherium/aetherium-core/pkg/tools"
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
	// Token is the stack's random cluster token: the workers' data planes
	// (on 127.0.0.1, a free port each) demand it and Service presents it.
	Token string

	opts Options
	// snapDirs are the workers' snapshot directories (snapshotDir).
	snapMu   sync.Mutex
	snapDirs map[string]string
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
	// Tools is the workers' tool installer (nil: none; VMs asking for
	// tools fail).
	Tools tools.Installer
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

	token := rand.Text()
	s := &Stack{t: t, DSN: dsn, RedisAddr: redisAddr, DockerHost: host, Store: store, Queue: q, Token: token, opts: o,
		Provider: o.Provider, Service: service.NewTaskService(q, store,
			service.WithDataPlane(dataplane.NewClient(token))),
		Workers: map[string]*worker.Worker{}, VMMs: map[string]vmm.VMOrchestrator{}, Networks: map[string]*network.Manager{}, SocketDirs: map[string]string{}}
	for _, id := range o.Workers {
		// Unix socket paths are limited to 108 bytes: keep the directory short.
		dir, err := os.MkdirTemp("", "ae-"+id+"-")
		require.NoError(t, err)
		t.Cleanup(func() { os.RemoveAll(dir) })
		var orch vmm.VMOrchestrator
		if o.Provider == qemu.Provider {
			qc := qemu.Config{KernelPath: img.KernelPath(), InitrdPath: img.InitrdPath(), RootfsPath: img.RootfsPath(),
				RunDir: filepath.Join(dir, "vms"), Owner: id, Logger: logger(t).With("provider", "qemu")}
			qc.Jail.Binary = testenv.Jailer(t) // a test binary has none next to it
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
			dc := docker.Config{Host: host, AgentPath: agentPath, SocketDir: filepath.Join(dir, "vms"), Owner: id,
				Logger: logger(t).With("provider", "docker")}
			if o.Tools != nil {
				dc.ToolsRoot = o.Tools.Root() // as wiring.DockerConfig does: tools:install needs it
			}
			orch, err = docker.New(ctx, dc)
		}
		require.NoError(t, err)
		s.VMMs[id] = orch
		w := s.NewWorker(t, id)
		require.NoError(t, w.Start(ctx))
		s.SocketDirs[id] = filepath.Join(dir, "vms")
		t.Cleanup(func() {
			s.Workers[id].Stop() // before the backend goes away
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

// NewWorker returns a new, unstarted worker with the id, the configuration
// and the orchestrator of the stack's worker id, as a restarted daemon
// would be, and makes it s.Workers[id]. Its data plane takes a free port
// on 127.0.0.1 and its metrics another. The caller starts it; the stack
// stops it at the end of t. Stop the old one first.
func (s *Stack) NewWorker(t testing.TB, id string) *worker.Worker {
	t.Helper()
	orch, ok := s.VMMs[id]
	require.True(t, ok, "stack has no worker %q", id)
	w, err := worker.New(worker.Config{ID: id, Provider: s.Provider, Redis: queue.RedisConfig{Addr: s.RedisAddr},
		TaskCheckInterval: s.opts.TaskCheckInterval, MaxOutputBytes: s.opts.MaxOutputBytes, ShutdownTimeout: 20 * time.Second,
		HeartbeatInterval: time.Second, DataListen: "127.0.0.1:0", ClusterToken: s.Token, MetricsListen: "127.0.0.1:0",
		Tools: s.opts.Tools, SnapshotDir: s.snapshotDir(id), Logger: logger(t)}, s.Store, orch, s.Queue, s.Queue)
	require.NoError(t, err)
	s.Workers[id] = w
	t.Cleanup(w.Stop)
	return w
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
  qemu:
    jail:
      binary: %q
queue:
  redis_addr: %s
storage:
  host: %s
  port: %s
  database: %s
  user: %s
  password: %q
worker:
  data_listen: 127.0.0.1:0
  metrics_listen: 127.0.0.1:0
cluster:
  token: %q
`, s.Provider, testenv.Jailer(t), s.RedisAddr, u.Hostname(), u.Port(), strings.TrimPrefix(u.Path, "/"), u.User.Username(), pass, s.Token)
	path := filepath.Join(t.TempDir(), "aetherium.yaml")
	require.NoError(t, os.WriteFile(path, []byte(body), 0o600))
	return path
}

// snapshotDir is worker id's snapshot directory, the same for every
// incarnation of the worker in one stack (as on a host).
func (s *Stack) snapshotDir(id string) string {
	s.snapMu.Lock()
	defer s.snapMu.Unlock()
	if s.snapDirs == nil {
		s.snapDirs = map[string]string{}
	}
	if d, ok := s.snapDirs[id]; ok {
		return d
	}
	d := filepath.Join(s.t.TempDir(), "snapshots-"+id)
	s.snapDirs[id] = d
	return d
}
