// Package qemu is the VMOrchestrator backend that boots each VM as a QEMU
// `microvm` machine: Debian's cloud kernel, an initramfs whose /init is
// fc-agent, and a copy-on-write overlay of the guest image's ext4 root file
// system on virtio-blk. The host reaches the agent over a virtio-serial
// port whose QEMU end is a Unix socket, carrying the agent's gRPC over
// yamux (agent.SerialChannel): unlike vhost-user-vsock it survives
// migration, so VMs can be suspended to a file, snapshotted and cloned
// (snapshot.go), and it needs no helper process.
//
// Each VM owns a run directory, <RunDir>/<id>, which is the only state:
//
//	vm.json            the spec and the desired state
//	overlay.qcow2      the root disk, backed by the read-only base image
//	qemu.pid           the QEMU process
//	run/qmp.sock       QEMU's monitor
//	run/agent.sock     the agent's virtio-serial port (QEMU's chardev)
//	state              a suspended VM's saved memory and device state
//	overlay-N.qcow2    the root disk's newer layers, after snapshots
//	jail/              the mount point of the VMM's jail (see jail.go)
//	console.log        the guest's serial console, appended across boots
//	qemu.log           QEMU's own output
//
// With confinement on (the default), each VM has its own uid, and its
// VMM runs through aether-jailer: unprivileged, in a pivot_root jail that
// holds only their own files, behind seccomp, in the VM's cgroup (see
// jail.go and docs/security.md).
//
// VMs survive a worker restart: New finds running ones again from their
// pidfiles, checking that each pid still belongs to that VM.
//
// A VM created with network nat gets a TAP, a MAC and an address from
// Config.Network (a *network.Manager) at CreateVM; vm.json records them,
// QEMU gets the TAP as a virtio-net device and the guest its settings on
// the kernel command line (aetherium.net), and QEMU runs in the network's
// namespace. DeleteVM gives the network back; Reconcile frees what a
// killed worker left half-made.
package qemu

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/jail"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// Files in a VM's run directory.
const (
	fileSpec    = "vm.json"
	fileOverlay = "overlay.qcow2"
	fileQEMUPid = "qemu.pid"
	fileQMP     = dirSockets + "/qmp.sock"
	fileAgent   = dirSockets + "/agent.sock"
	fileState   = "state"
	fileConsole = "console.log"
	fileQEMULog = "qemu.log"
	// fileVsockPid is vhost-device-vsock's, which VMs started before the
	// agent moved to virtio-serial still have; it is ended with them.
	fileVsockPid = "vsock.pid"
)

// Orchestrator runs VMs as QEMU microvm machines. It implements
// vmm.VMOrchestrator.
type Orchestrator struct {
	// AgentIO gives WriteFile, ReadFile and DialAgent.
	vmutil.AgentIO
	cfg   Config
	accel Accel
	// jail confines the VMMs; nil when confinement is off.
	jail  *jail.Manager
	log   *slog.Logger
	locks vmutil.KeyedMutex
	net   vmutil.Net
	// clients are the agent clients of running VMs.
	clients vmutil.Clients
	// chans are the serial channels to running VMs' agents, which their
	// clients and DialAgent share (QEMU's chardev takes one connection).
	chans map[string]*agent.SerialChannel

	lock *os.File // holds the run directory's flock until Close

	mu  sync.Mutex
	vms map[string]*vmProcs // live processes by VM id
	// creating maps the VMs CreateVM is making to their temporary
	// directories, which Reconcile must leave alone.
	creating map[string]string
	closed   bool // set by Close: watchers no longer act on VMs
}

// vmProcs are the processes of one running VM.
type vmProcs struct {
	qemu *vmutil.Proc
	// consoleFrom and qemuLogFrom are the sizes of the console and QEMU
	// logs when this boot began: the boot's own lines come after them.
	// Zero for processes found again after a restart.
	consoleFrom, qemuLogFrom int64
	stopping                 bool // set while StopVM, DeleteVM or Suspend ends it on purpose
}

var (
	_ vmm.VMOrchestrator = (*Orchestrator)(nil)
	_ vmm.Diagnoser      = (*Orchestrator)(nil)
	_ vmm.UsageReporter  = (*Orchestrator)(nil)
)

// New checks the configuration and finds the VMs of earlier runs again.
func New(ctx context.Context, cfg Config) (*Orchestrator, error) {
	cfg.Binary = cmp.Or(cfg.Binary, DefaultBinary)
	cfg.ImgBinary = cmp.Or(cfg.ImgBinary, DefaultImgBinary)
	cfg.RunDir = cmp.Or(cfg.RunDir, DefaultRunDir)
	cfg.MaxVCPUs = cmp.Or(cfg.MaxVCPUs, runtime.NumCPU())
	if cfg.MaxMemoryMB < 0 {
		return nil, fmt.Errorf("%w: vmm.qemu.max_memory_mb is %d; give a positive size in MiB, or 0 for the default (host RAM minus %d MiB)", types.ErrInvalid, cfg.MaxMemoryMB, vmm.HostMemoryReserveMB)
	}
	cfg.MaxMemoryMB = cmp.Or(cfg.MaxMemoryMB, vmm.DefaultMaxMemoryMB())
	cfg.ReadyTimeout = cmp.Or(cfg.ReadyTimeout, DefaultReadyTimeout)
	cfg.StopTimeout = cmp.Or(cfg.StopTimeout, DefaultStopTimeout)
	cfg.Logger = cmp.Or(cfg.Logger, slog.Default())
	if cfg.MaxVCPUs < 0 || cfg.ReadyTimeout < 0 || cfg.StopTimeout < 0 {
		return nil, fmt.Errorf("%w: qemu backend: max vcpus, ready timeout and stop timeout must not be negative", types.ErrInvalid)
	}
	accel, err := resolveAccel(cfg.Accel)
	if err != nil {
		return nil, fmt.Errorf("%w: qemu backend: %v", types.ErrInvalid, err)
	}
	for _, f := range []struct{ name, path string }{{"kernel", cfg.KernelPath}, {"initramfs", cfg.InitrdPath}, {"rootfs", cfg.RootfsPath}} {
		if f.path == "" {
			return nil, fmt.Errorf("%w: qemu backend: no guest %s path; build the guest image with `aether-cli image build` (or `make guest-image`)", types.ErrInvalid, f.name)
		}
		abs, err := filepath.Abs(f.path)
		if err != nil {
			return nil, fmt.Errorf("%w: guest %s %q: %v", types.ErrInvalid, f.name, f.path, err)
		}
		if _, err := os.Stat(abs); err != nil {
			return nil, fmt.Errorf("%w: guest %s: %v; build the guest image with `aether-cli image build` (or `make guest-image`)", types.ErrInvalid, f.name, err)
		}
		switch f.name {
		case "kernel":
			cfg.KernelPath = abs
		case "initramfs":
			cfg.InitrdPath = abs
		default:
			cfg.RootfsPath = abs
		}
	}
	for _, b := range []*string{&cfg.Binary, &cfg.ImgBinary} {
		p, err := exec.LookPath(*b)
		if err != nil {
			return nil, fmt.Errorf("%w: qemu backend: %v; install it with `./scripts/setup.sh`", types.ErrUnavailable, err)
		}
		*b = p
	}
	dir, err := filepath.Abs(cfg.RunDir)
	if err != nil {
		return nil, fmt.Errorf("%w: run dir %q: %v", types.ErrInvalid, cfg.RunDir, err)
	}
	cfg.RunDir = dir
	if n := len(filepath.Join(dir, "01234567-89ab-cdef-0123-456789abcdef", fileAgent)); n > 107 {
		return nil, fmt.Errorf("%w: run dir %q is too long for Unix socket paths (%d > 107 bytes); choose a shorter one", types.ErrInvalid, dir, n)
	}
	jm, err := newJail(cfg.Jail)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating run dir: %w", err)
	}
	// One orchestrator per run directory: a second one (another worker
	// sharing the directory) would adopt, watch and reconcile VMs that
	// are not its own.
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("locking run dir %s: %w", dir, err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("%w: run dir %s is in use by another worker (%v); give each worker its own vmm.qemu.run_dir", types.ErrConflict, dir, err)
	}
	o := &Orchestrator{cfg: cfg, accel: accel, jail: jm, net: vmutil.NewNet(cfg.Network), log: cfg.Logger.With("provider", Provider), vms: map[string]*vmProcs{}, chans: map[string]*agent.SerialChannel{}, creating: map[string]string{}, lock: lock}
	o.AgentIO = vmutil.AgentIO{Agent: o.agentOf, Dialer: o.dialerOf}
	o.log.Info("qemu backend ready", "accel", accel.Name, "why", accel.Reason, "run_dir", dir, "confined", jm != nil)
	if jm == nil {
		o.log.Warn("VM CONFINEMENT IS OFF: QEMU runs as root without seccomp, jail or cgroup; set vmm.qemu.jail.enabled back to true unless you are debugging a VMM")
	}
	if err := o.recover(ctx); err != nil {
		lock.Close()
		return nil, err
	}
	// Half-made creates of a crashed worker, and their TAPs, go now.
	if err := o.Reconcile(ctx); err != nil {
		o.log.Warn("reconciling leftovers of an earlier run", "err", err)
	}
	return o, nil
}

// Accel reports the accelerator VMs use and why.
func (o *Orchestrator) Accel() Accel { return o.accel }

// RunDir returns the directory of VM id.
func (o *Orchestrator) RunDir(id string) string { return filepath.Join(o.cfg.RunDir, id) }

func (o *Orchestrator) path(id, name string) string { return filepath.Join(o.cfg.RunDir, id, name) }

// Capabilities implements vmm.VMOrchestrator.
func (o *Orchestrator) Capabilities() vmm.Capabilities {
	return vmm.Capabilities{Provider: Provider, MaxVCPUs: o.cfg.MaxVCPUs, MaxMemoryMB: o.cfg.MaxMemoryMB, Isolation: "vm", Networking: o.net.Enabled(),
		PauseResume: true, Suspend: true, Snapshot: true}
}

// Health implements vmm.VMOrchestrator.
func (o *Orchestrator) Health(ctx context.Context) error {
	for _, p := range []string{o.cfg.KernelPath, o.cfg.InitrdPath, o.cfg.RootfsPath} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("%w: guest image file missing: %v; rebuild it with `aether-cli image build`", types.ErrUnavailable, err)
		}
	}
	// Health runs at every heartbeat: it only looks the binaries up
	// (Diagnose, for doctor, runs them).
	for _, b := range []string{o.cfg.Binary, o.cfg.ImgBinary} {
		if _, err := exec.LookPath(b); err != nil {
			return fmt.Errorf("%w: %v; reinstall it with `./scripts/setup.sh`", types.ErrUnavailable, err)
		}
	}
	return nil
}

// Close implements vmm.VMOrchestrator. VMs keep running, and the VMs'
// watchers stop recording their ends: from now on that is the business of
// whichever Orchestrator (a restarted worker) finds them again.
func (o *Orchestrator) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return nil
	}
	o.closed = true
	o.lock.Close() // releases the run directory's lock
	for id, c := range o.chans {
		c.Close()
		delete(o.chans, id)
	}
	o.clients.CloseAll()
	// cfg.Network belongs to the caller, who may share it: it stays open.
	return nil
}

// createPrefix starts the names of CreateVM's temporary directories.
const createPrefix = ".create-"

func notFound(id string) error { return vmutil.NotFound(id) }

// Diagnose checks this host for the backend as configured (see Diagnose).
func (o *Orchestrator) Diagnose(ctx context.Context) []vmm.Check { return Diagnose(ctx, o.cfg) }
