// Package firecracker is the VMOrchestrator backend that runs each VM in its
// own Firecracker process (v1.16 API), started directly or through the
// jailer, and reaches the guest's fc-agent over Firecracker's hybrid vsock.
//
// Each VM has a run directory, SocketDir/<id>, holding its record
// (state.json), the VMM's pid and its console output. The files Firecracker
// itself opens (API socket, vsock socket, copy-on-write rootfs, log and
// metrics) live there too, or, with the jailer, in the jail's root
// <chroot_base_dir>/firecracker/<id>/root where the jailed VMM sees them as
// /api.sock, /rootfs.ext4 and so on. VMs outlive the worker: a restarted
// worker finds them again from the run directories (pid file, then GET / on
// the API socket).
//
// Pause, Resume, Suspend and Snapshot (snapshot.go) use Firecracker's
// snapshot API: a suspended VM's state and memory stay in its root
// (suspend.state, suspend.mem) with its VMM ended; a snapshot is moved
// into a directory of the caller's with a frozen rootfs copy and
// snapshot.json (clone.go), and a VM created from it gets its own rootfs
// copy and hard links to the snapshot's state and memory in its root
// (clone.state, clone.mem), which keep the memory file alive for the
// clone's life.
//
// The API client is written here (client.go) rather than taken from
// firecracker-go-sdk: the SDK's v1.0.0 is generated from an older API (it
// predates v1.16's fields such as vsock_override), it would add go-openapi,
// logrus and the CNI plugins to our dependencies, and the backend uses only
// ten endpoints whose shapes are pinned by the vendored spec in testdata.
// The tests check every request this client sends against that spec, via a
// fake Firecracker (fcfake) that validates bodies with kin-openapi.
package firecracker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/aetherium/aetherium-core/pkg/vmm/internal/jail"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// Orchestrator runs VMs as Firecracker microVMs. It implements
// vmm.VMOrchestrator.
type Orchestrator struct {
	// AgentIO gives WriteFile, ReadFile and DialAgent.
	vmutil.AgentIO
	cfg Config
	log *slog.Logger

	net Net
	// hwErr is why the CPU offers no hardware virtualization, read once.
	hwErr error

	mu    sync.Mutex
	locks vmutil.KeyedMutex       // one per VM id, held by life-cycle steps
	procs map[string]*vmutil.Proc // VMMs this process started or found again
	// clients are the agent clients of running VMs.
	clients vmutil.Clients
	// leases hands each jailed VM its own uid/gid; nil without the
	// jailer or with a fixed uid.
	leases *jail.Leases
}

// Net is the network steps (vmutil.Net).
type Net = vmutil.Net

var (
	_ vmm.VMOrchestrator = (*Orchestrator)(nil)
	_ vmm.Diagnoser      = (*Orchestrator)(nil)
)

// New checks cfg and prepares the socket directory. It does not require
// KVM or the binary: Health and Diagnose report on those.
func New(ctx context.Context, cfg Config) (*Orchestrator, error) {
	cfg.setDefaults()
	if cfg.MaxVCPUs < 0 || cfg.ReadyTimeout < 0 || cfg.StopTimeout < 0 {
		return nil, fmt.Errorf("%w: firecracker backend: max vcpus, ready timeout and stop timeout must not be negative", types.ErrInvalid)
	}
	if cfg.MaxMemoryMB < 0 {
		return nil, fmt.Errorf("%w: vmm.firecracker.max_memory_mb is %d; give a positive size in MiB, or 0 for the default (host RAM minus %d MiB)", types.ErrInvalid, cfg.MaxMemoryMB, vmm.HostMemoryReserveMB)
	}
	if cfg.KernelPath == "" || cfg.RootfsPath == "" {
		return nil, fmt.Errorf("%w: firecracker backend: set vmm.firecracker.kernel_path (an ELF vmlinux) and vmm.firecracker.rootfs_path (an ext4 image); see docs/firecracker.md", types.ErrInvalid)
	}
	if v := cfg.Jailer.CgroupVersion; v != 1 && v != 2 {
		return nil, fmt.Errorf("%w: firecracker jailer cgroup_version %d: use 1 or 2", types.ErrInvalid, v)
	}
	if cfg.Jailer.UID < 0 || cfg.Jailer.GID < 0 {
		return nil, fmt.Errorf("%w: firecracker jailer uid and gid must not be negative", types.ErrInvalid)
	}
	if (cfg.Jailer.UID == 0) != (cfg.Jailer.GID == 0) {
		return nil, fmt.Errorf("%w: firecracker jailer uid %d and gid %d: set both (a fixed pair for every VM) or neither (a leased pair per VM); a VMM must never run as uid or gid 0", types.ErrInvalid, cfg.Jailer.UID, cfg.Jailer.GID)
	}
	if cfg.Jailer.On() && !strings.Contains(filepath.Base(cfg.Binary), "firecracker") {
		return nil, fmt.Errorf("%w: the jailer only execs a binary whose name contains \"firecracker\"; rename %s", types.ErrInvalid, cfg.Binary)
	}
	for _, p := range []*string{&cfg.SocketDir, &cfg.KernelPath, &cfg.RootfsPath, &cfg.InitrdPath, &cfg.Jailer.ChrootBaseDir} {
		if *p == "" {
			continue
		}
		abs, err := filepath.Abs(*p)
		if err != nil {
			return nil, fmt.Errorf("%w: path %q: %v", types.ErrInvalid, *p, err)
		}
		*p = abs
	}
	if err := os.MkdirAll(cfg.SocketDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating socket dir: %w", err)
	}
	o := &Orchestrator{
		cfg:   cfg,
		log:   cfg.Logger.With("provider", Provider),
		net:   vmutil.NewNet(cfg.Network),
		procs: map[string]*vmutil.Proc{},
	}
	o.AgentIO = vmutil.AgentIO{Agent: o.agentOf, Dialer: o.dialerOf}
	// Other processes may use the socket dir too (a second worker, a
	// CLI): a VM's life-cycle steps hold its lock across all of them.
	o.locks.Dir = cfg.SocketDir
	if cfg.Jailer.leased() {
		l, err := jail.NewLeases(filepath.Join(cfg.Jailer.StateDir, "uids"), cfg.Jailer.UIDBase, cfg.Jailer.GIDBase, cfg.Jailer.Count)
		if err != nil {
			return nil, fmt.Errorf("firecracker jailer: %w", err)
		}
		o.leases = l
		// Leases of VMs whose run directory is gone (a create cut short,
		// a wiped socket dir) are freed; the grace spares another
		// process's create in flight.
		if uids, err := l.Reap(cfg.SocketDir, func(holder string) bool {
			_, err := o.readRecord(filepath.Base(holder))
			return err == nil || !errors.Is(err, types.ErrNotFound)
		}, time.Minute); err != nil {
			o.log.Warn("reaping jail uid leases", "err", err)
		} else if len(uids) > 0 {
			o.log.Info("freed jail uid leases of vanished VMs", "uids", uids)
		}
	}
	_, o.hwErr = hardwareVirt()
	if o.net.Enabled() {
		// TAPs, rules and leases of VMs whose create a crash cut short go
		// now; every VM with a record keeps its network.
		ctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		if err := o.net.Reconcile(ctx, o.log, o.recordedIDs()); err != nil {
			o.log.Warn("reconciling the network of earlier runs", "err", err)
		}
	}
	return o, nil
}

// recordedIDs returns the ids of every VM in SocketDir that has a record,
// whoever owns it: their networks must stay.
func (o *Orchestrator) recordedIDs() []string {
	entries, _ := os.ReadDir(o.cfg.SocketDir)
	var ids []string
	for _, e := range entries {
		if _, err := os.Stat(filepath.Join(o.cfg.SocketDir, e.Name(), stateFileName)); err == nil {
			ids = append(ids, e.Name())
		}
	}
	return ids
}

// Capabilities implements vmm.VMOrchestrator.
func (o *Orchestrator) Capabilities() vmm.Capabilities {
	return vmm.Capabilities{Provider: Provider, MaxVCPUs: o.cfg.MaxVCPUs, MaxMemoryMB: o.cfg.MaxMemoryMB, Isolation: "vm", PauseResume: true, Snapshot: true, Suspend: true,
		Networking: o.net.Enabled()}
}

// Health implements vmm.VMOrchestrator. It runs at every heartbeat, so it
// is the cheap subset of Diagnose (see health).
func (o *Orchestrator) Health(context.Context) error { return health(o.cfg, o.hwErr) }

// Close implements vmm.VMOrchestrator. VMs keep running.
func (o *Orchestrator) Close() error {
	o.clients.CloseAll()
	return nil
}

func notFound(id string) error { return vmutil.NotFound(id) }

// Diagnose checks this host for the backend as configured (see Diagnose).
func (o *Orchestrator) Diagnose(ctx context.Context) []vmm.Check { return Diagnose(ctx, o.cfg) }
