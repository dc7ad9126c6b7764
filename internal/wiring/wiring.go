// Package wiring is the one place that picks concrete implementations
// (PostgreSQL, Redis, a VM backend) from configuration. The binaries in
// cmd/ call it; nothing in pkg/ does.
package wiring

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/config"
	"github.com/aetherium/aetherium-core/pkg/dataplane"
	"github.com/aetherium/aetherium-core/pkg/image"
	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
	"github.com/aetherium/aetherium-core/pkg/tools"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/firecracker"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
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
	*service.Service
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
	// Both connections are opened at once: a short-lived command line pays
	// for their setup on every call (PostgreSQL starts a backend process per
	// connection), so they should not add up.
	type queueResult struct {
		q   *queue.Redis
		err error
	}
	qch := make(chan queueResult, 1)
	go func() {
		q, err := OpenQueue(ctx, c)
		qch <- queueResult{q, err}
	}()
	st, err := OpenStore(ctx, c)
	qr := <-qch
	if err != nil || qr.err != nil {
		if err == nil {
			st.Close()
			err = qr.err
		}
		if qr.q != nil {
			qr.q.Close()
		}
		return nil, err
	}
	q := qr.q
	// Neither the provider nor the default network mode is decided here:
	// this process's vmm section may name another backend than the workers
	// run (the worker that claims a VM records both).
	opts := []service.Option{service.WithLogger(log), service.WithDeadAfter(c.Worker.DeadAfter)}
	if c.VMM.MaxVCPUs > 0 {
		opts = append(opts, service.WithMaxVCPUs(c.VMM.MaxVCPUs))
	}
	if c.API.MaxTTL > 0 {
		opts = append(opts, service.WithMaxTTL(c.API.MaxTTL))
	}
	// Files travel straight to the owning worker's data plane, which
	// demands the cluster token; without one there is no way to reach it.
	if c.Cluster.Token != "" {
		opts = append(opts, service.WithDataPlane(dataplane.NewClient(c.Cluster.Token)))
	}
	return &Service{Service: service.NewTaskService(q, st, opts...), Store: st, Queue: q}, nil
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

// NewOrchestrator builds the configured VM backend for worker owner. store
// keeps the VM network's address leases (nil: the microVM backends run
// without networking).
func NewOrchestrator(ctx context.Context, c *config.Config, owner string, log *slog.Logger, store storage.Store) (vmm.VMOrchestrator, error) {
	p, err := lookupProvider(c.VMM.Provider)
	if err != nil {
		return nil, err
	}
	return p.New(ctx, c, owner, log.With("provider", c.VMM.Provider), store)
}

// FirecrackerConfig maps the vmm.firecracker section to the backend's
// config. Unset image paths come from the newest image in vmm.image_dir.
func FirecrackerConfig(c *config.Config) (firecracker.Config, error) {
	fc := c.VMM.Firecracker
	fc.MaxVCPUs = c.VMM.MaxVCPUs
	if fc.KernelPath == "" || fc.InitrdPath == "" || fc.RootfsPath == "" {
		m, err := image.Latest(c.VMM.ImageDir)
		if err != nil {
			return fc, err
		}
		fc.KernelPath = cmp.Or(fc.KernelPath, m.VmlinuxPath())
		fc.InitrdPath = cmp.Or(fc.InitrdPath, m.InitrdPath())
		fc.RootfsPath = cmp.Or(fc.RootfsPath, m.RootfsPath())
	}
	return fc, nil
}

// networkManager builds the VM network manager of the microVM backends,
// keeping address leases in store; nil when store keeps no leases.
func networkManager(c *config.Config, store storage.Store, log *slog.Logger) (*network.Manager, error) {
	leases, ok := store.(network.LeaseStore)
	if !ok {
		return nil, nil
	}
	nc := NetworkConfig(c)
	nc.Logger = log.With("component", "network")
	// A fixed jailer uid owns every TAP; with leased uids (the default)
	// the backend gives each VM's TAP to its own uid when it boots.
	if j := c.VMM.Firecracker.Jailer; c.VMM.Provider == firecracker.Provider && j.On() && (j.UID != 0 || j.GID != 0) {
		nc.TAPOwner, nc.TAPGroup = j.UID, j.GID
	}
	return network.New(nc, leases)
}

// NetworkConfig maps the network section to the manager's config.
func NetworkConfig(c *config.Config) network.Config {
	n := c.Network
	return network.Config{
		Bridge: n.Bridge, Subnet: n.Subnet, Uplink: n.Uplink, DNS: n.DNS,
		EgressDeny: n.EgressDeny, EgressAllow: n.EgressAllow, AllowPrivate: n.AllowPrivate,
		Netns: n.Netns, Table: n.Table, Pool: n.Pool,
		// Workers sharing a bridge reconcile only the VMs they claimed.
		Owner: c.Worker.ID,
	}
}

// QEMUConfig maps the vmm.qemu section to the backend's config. The guest
// image's files come from the section when set, else from the newest image
// in vmm.image_dir.
func QEMUConfig(c *config.Config) (qemu.Config, error) {
	qc := c.VMM.QEMU
	qc.MaxVCPUs = c.VMM.MaxVCPUs
	if qc.KernelPath == "" || qc.InitrdPath == "" || qc.RootfsPath == "" {
		m, err := image.Latest(c.VMM.ImageDir)
		if err != nil {
			return qc, err
		}
		qc.KernelPath = cmp.Or(qc.KernelPath, m.KernelPath())
		qc.InitrdPath = cmp.Or(qc.InitrdPath, m.InitrdPath())
		qc.RootfsPath = cmp.Or(qc.RootfsPath, m.RootfsPath())
	}
	return qc, nil
}

// DiagnoseVMM returns the configured backend's host checks for doctor.
func DiagnoseVMM(ctx context.Context, c *config.Config) []vmm.Check {
	p, err := lookupProvider(c.VMM.Provider)
	if err != nil {
		return nil
	}
	return p.Diagnose(ctx, c)
}

// CheckVMM checks from this host that the configured backend is usable,
// without creating anything: every check of its Diagnose but the
// accelerator (TCG is slow, not broken) must pass.
func CheckVMM(ctx context.Context, c *config.Config) error {
	p, err := lookupProvider(c.VMM.Provider)
	if err != nil {
		return err
	}
	if p.Check != nil {
		return p.Check(ctx, c)
	}
	for _, ch := range p.Diagnose(ctx, c) {
		if !ch.OK && ch.Name != "accelerator" {
			return fmt.Errorf("%w: %s: %s; %s", types.ErrUnavailable, ch.Name, ch.Detail, ch.Fix)
		}
	}
	return nil
}

// Tools builds the tool installer of the tools section (the mise
// implementation of pkg/tools).
func Tools(c *config.Config, log *slog.Logger) (*tools.Mise, error) {
	return tools.NewMise(tools.Config{Root: c.Tools.CacheDir, Mise: c.Tools.MiseBinary, Env: c.Tools.Env, AllowPrivateURLs: c.Tools.AllowPrivateURLs,
		Logger: log.With("component", "tools")})
}

// WorkerTools is the tool installer a worker runs with. A worker without
// mise still creates VMs without tools, so a missing mise is only logged
// (VMs asking for tools then fail saying how to install it), unless
// tools.defaults are set, which every VM needs.
func WorkerTools(c *config.Config, log *slog.Logger) (tools.Installer, error) {
	m, err := Tools(c, log)
	if err == nil {
		return m, nil
	}
	if len(c.Tools.Defaults) > 0 {
		return nil, fmt.Errorf("tools.defaults are set, but: %w", err)
	}
	log.Warn("tools are unavailable on this worker; VMs asking for tools will fail", "err", err)
	return nil, nil
}
