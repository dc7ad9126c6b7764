// Package qemu is the VMOrchestrator backend that boots each VM as a QEMU
// `microvm` machine: Debian's cloud kernel, an initramfs whose /init is
// fc-agent, and a copy-on-write overlay of the guest image's ext4 root file
// system on virtio-blk. The host reaches the agent over vhost-user-vsock,
// served by one vhost-device-vsock process per VM, which speaks
// Firecracker's hybrid vsock protocol (pkg/vsock) on its Unix socket: the
// same host-side code the Firecracker backend uses.
//
// Each VM owns a run directory, <RunDir>/<id>, which is the only state:
//
//	vm.json            the spec and the desired state
//	overlay.qcow2      the root disk, backed by the read-only base image
//	qemu.pid, qmp.sock the QEMU process and its monitor
//	vsock.pid          vhost-device-vsock
//	vhost.sock         its vhost-user socket (QEMU side)
//	vsock.sock         its hybrid vsock socket (host side)
//	console.log        the guest's serial console, appended across boots
//	qemu.log, vsock.log the two processes' own output
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
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
	"github.com/aetherium/aetherium-core/pkg/vsock"
)

// Provider is the backend's name in configuration.
const Provider = "qemu"

// Defaults for Config's zero values.
const (
	DefaultBinary       = "qemu-system-x86_64"
	DefaultVsockBinary  = "vhost-device-vsock"
	DefaultImgBinary    = "qemu-img"
	DefaultRunDir       = "/var/lib/aetherium/qemu"
	DefaultReadyTimeout = 90 * time.Second
	DefaultStopTimeout  = 10 * time.Second
	// guestCID is the guest's vsock context id. Each VM has its own
	// vhost-device-vsock, so every guest can use the same one.
	guestCID = 3
)

// Files in a VM's run directory.
const (
	fileSpec     = "vm.json"
	fileOverlay  = "overlay.qcow2"
	fileQEMUPid  = "qemu.pid"
	fileQMP      = "qmp.sock"
	fileVsockPid = "vsock.pid"
	fileVhost    = "vhost.sock"
	fileVsock    = "vsock.sock"
	fileConsole  = "console.log"
	fileQEMULog  = "qemu.log"
	fileVsockLog = "vsock.log"
)

// Config configures the qemu backend. The zero value of every field selects
// its default, except the three image paths, which are required.
type Config struct {
	// Binary is the QEMU system emulator. Default qemu-system-x86_64 on PATH.
	Binary string
	// VsockBinary is vhost-device-vsock. Default: on PATH.
	VsockBinary string
	// ImgBinary is qemu-img, used to make each VM's overlay. Default: on PATH.
	ImgBinary string
	// KernelPath is the guest kernel (a bzImage). Required.
	KernelPath string
	// InitrdPath is the initramfs whose /init is fc-agent. Required.
	InitrdPath string
	// RootfsPath is the base ext4 root file system. VMs never write to it:
	// each gets a qcow2 overlay backed by it. Required.
	RootfsPath string
	// RunDir holds one directory per VM. Keep it short: Unix socket paths
	// are limited to 107 bytes. Default /var/lib/aetherium/qemu.
	RunDir string
	// Accel is "auto" (KVM when the host can run stock kernels under it,
	// TCG otherwise), "kvm" or "tcg". Default auto.
	Accel string
	// KernelArgs are appended to the kernel command line.
	KernelArgs string
	// MaxVCPUs is the most vCPUs one VM may ask for. Default: the host's
	// CPU count.
	MaxVCPUs int
	// ReadyTimeout bounds how long StartVM waits for the agent to answer.
	// Default 90s (software emulation on a loaded host is slow).
	ReadyTimeout time.Duration
	// StopTimeout bounds each step of a graceful stop (agent power-off,
	// then QMP quit) before the next. Default 10s.
	StopTimeout time.Duration
	// Owner is the id of the worker that owns the VMs; ListVMs returns only
	// that owner's VMs when it is set.
	Owner string
	// Network attaches VMs created with network nat (a *network.Manager).
	// Nil: no networking; such VMs are refused with types.ErrInvalid.
	Network Network
	// Logger receives the backend's logs. Default slog.Default().
	Logger *slog.Logger
}

// Orchestrator runs VMs as QEMU microvm machines. It implements
// vmm.VMOrchestrator.
type Orchestrator struct {
	cfg   Config
	accel Accel
	log   *slog.Logger
	locks vmutil.KeyedMutex

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
	qemu, vsock *proc
	client      *agent.Client
	// consoleFrom is the console log's size when this boot began: the
	// boot's own lines come after it.
	consoleFrom int64
	stopping    bool // set while StopVM or DeleteVM ends it on purpose
}

// vmFile is vm.json.
type vmFile struct {
	Spec      types.VMSpec `json:"spec"`
	Owner     string       `json:"owner,omitempty"`
	CreatedAt time.Time    `json:"created_at"`
	// Running is the desired state: true from StartVM until StopVM.
	Running bool `json:"running"`
	// Failed explains why the VM ended without being asked to.
	Failed string `json:"failed,omitempty"`
	// Boots counts StartVM calls that spawned QEMU.
	Boots int `json:"boots"`
	// Net is a nat VM's network; nil for none.
	Net *netFile `json:"network,omitempty"`
}

var _ vmm.VMOrchestrator = (*Orchestrator)(nil)

// idRE is what a VM id may look like: it becomes a directory name.
var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// New checks the configuration and finds the VMs of earlier runs again.
func New(ctx context.Context, cfg Config) (*Orchestrator, error) {
	cfg.Binary = cmp.Or(cfg.Binary, DefaultBinary)
	cfg.VsockBinary = cmp.Or(cfg.VsockBinary, DefaultVsockBinary)
	cfg.ImgBinary = cmp.Or(cfg.ImgBinary, DefaultImgBinary)
	cfg.RunDir = cmp.Or(cfg.RunDir, DefaultRunDir)
	cfg.MaxVCPUs = cmp.Or(cfg.MaxVCPUs, runtime.NumCPU())
	cfg.ReadyTimeout = cmp.Or(cfg.ReadyTimeout, DefaultReadyTimeout)
	cfg.StopTimeout = cmp.Or(cfg.StopTimeout, DefaultStopTimeout)
	cfg.Logger = cmp.Or(cfg.Logger, slog.Default())
	if m, ok := cfg.Network.(*network.Manager); ok && m == nil {
		cfg.Network = nil // a nil *Manager means no networking, not one that panics
	}
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
	for _, b := range []*string{&cfg.Binary, &cfg.VsockBinary, &cfg.ImgBinary} {
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
	if n := len(filepath.Join(dir, "01234567-89ab-cdef-0123-456789abcdef", fileVhost)); n > 107 {
		return nil, fmt.Errorf("%w: run dir %q is too long for Unix socket paths (%d > 107 bytes); choose a shorter one", types.ErrInvalid, dir, n)
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
	o := &Orchestrator{cfg: cfg, accel: accel, log: cfg.Logger.With("provider", Provider), vms: map[string]*vmProcs{}, creating: map[string]string{}, lock: lock}
	o.log.Info("qemu backend ready", "accel", accel.Name, "why", accel.Reason, "run_dir", dir)
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

// recover finds the VMs of an earlier worker: those whose QEMU still runs
// are watched again; those that should run but do not are marked failed and
// their leftovers removed.
func (o *Orchestrator) recover(ctx context.Context) error {
	ids, err := o.listIDs()
	if err != nil {
		return err
	}
	for _, id := range ids {
		unlock := o.locks.Lock(id)
		vf, err := o.readVM(id)
		if err != nil {
			unlock()
			o.log.Warn("skipping unreadable vm directory", "vm_id", id, "err", err)
			continue
		}
		dir := o.RunDir(id)
		q := adopt(o.path(id, fileQEMUPid), dir)
		v := adopt(o.path(id, fileVsockPid), dir)
		switch {
		case q != nil && v != nil:
			p := &vmProcs{qemu: q, vsock: v}
			o.mu.Lock()
			o.vms[id] = p
			o.mu.Unlock()
			go o.watch(id, p)
			o.log.Info("found running vm again", "vm_id", id, "qemu_pid", q.pid)
		default:
			if q != nil {
				q.stop(syscall.SIGKILL, 0)
			}
			if v != nil {
				v.stop(syscall.SIGTERM, time.Second)
			}
			o.cleanRuntime(id)
			if vf.Running {
				vf.Running = false
				vf.Failed = "its VMM was gone when the worker restarted"
				if err := o.writeVM(id, vf); err != nil {
					o.log.Warn("cannot record failed vm", "vm_id", id, "err", err)
				}
				o.log.Warn("vm is gone after a restart; marked failed", "vm_id", id)
			}
		}
		unlock()
	}
	return nil
}

// Capabilities implements vmm.VMOrchestrator.
func (o *Orchestrator) Capabilities() vmm.Capabilities {
	return vmm.Capabilities{Provider: Provider, MaxVCPUs: o.cfg.MaxVCPUs, Isolation: "vm", Networking: o.cfg.Network != nil}
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
	for _, b := range []string{o.cfg.Binary, o.cfg.VsockBinary, o.cfg.ImgBinary} {
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
	for _, p := range o.vms {
		if p.client != nil {
			p.client.Close()
			p.client = nil
		}
	}
	// cfg.Network belongs to the caller, who may share it: it stays open.
	return nil
}

// createPrefix starts the names of CreateVM's temporary directories.
const createPrefix = ".create-"

// CreateVM implements vmm.VMOrchestrator: it writes the VM's directory and
// its overlay disk, attaches a nat VM to the network, and boots nothing.
func (o *Orchestrator) CreateVM(ctx context.Context, spec types.VMSpec) (_ *vmm.VMStatus, err error) {
	if err := spec.Validate(o.cfg.MaxVCPUs); err != nil {
		return nil, err
	}
	if !idRE.MatchString(spec.ID) {
		return nil, fmt.Errorf("%w: vm id %q: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", types.ErrInvalid, spec.ID)
	}
	nat := spec.Network == types.NetworkNAT
	if nat && o.cfg.Network == nil {
		return nil, errNoNetwork
	}
	unlock, err := o.locks.LockContext(ctx, spec.ID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if _, err := o.readVM(spec.ID); err == nil {
		return o.status(spec.ID)
	} else if !errors.Is(err, types.ErrNotFound) {
		return nil, err
	}

	// Build in a temporary directory and rename it into place, so a crash
	// never leaves a half-made VM that looks whole.
	tmp, err := os.MkdirTemp(o.cfg.RunDir, createPrefix+spec.ID+"-")
	if err != nil {
		return nil, fmt.Errorf("creating vm %s: %w", spec.ID, err)
	}
	o.mu.Lock()
	o.creating[spec.ID] = tmp
	o.mu.Unlock()
	defer func() {
		os.RemoveAll(tmp)
		o.mu.Lock()
		delete(o.creating, spec.ID)
		o.mu.Unlock()
	}()
	overlay := filepath.Join(tmp, fileOverlay)
	out, err := exec.CommandContext(ctx, o.cfg.ImgBinary, "create", "-q", "-f", "qcow2",
		"-F", "raw", "-b", o.cfg.RootfsPath, overlay).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("creating vm %s's overlay disk: %v: %s", spec.ID, err, strings.TrimSpace(string(out)))
	}
	vf := &vmFile{Spec: spec, Owner: o.cfg.Owner, CreatedAt: time.Now().UTC()}
	placed := false // the VM's directory is in place
	if nat {
		// A crash from here until the rename leaves a network with no
		// vm.json, which Reconcile removes.
		if vf.Net, err = o.attach(ctx, spec.ID); err != nil {
			// Attach may have leased an address or written rules before it
			// failed; Detach is idempotent and removes whatever is there.
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), o.cfg.StopTimeout)
			if derr := o.detach(dctx, spec.ID); derr != nil {
				o.log.Warn("cannot undo a failed attach; reconcile will", "vm_id", spec.ID, "err", derr)
			}
			cancel()
			return nil, err
		}
		defer func() {
			if err != nil && !placed {
				// A fresh context: the caller's may be what failed.
				dctx, cancel := context.WithTimeout(context.Background(), o.cfg.StopTimeout)
				defer cancel()
				if derr := o.detach(dctx, spec.ID); derr != nil {
					o.log.Warn("cannot undo a failed create's network; Reconcile will", "vm_id", spec.ID, "err", derr)
				}
			}
		}()
	}
	b, err := json.MarshalIndent(vf, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(tmp, fileSpec), b, 0o600); err != nil {
		return nil, fmt.Errorf("creating vm %s: %w", spec.ID, err)
	}
	if err := os.Rename(tmp, o.RunDir(spec.ID)); err != nil {
		return nil, fmt.Errorf("creating vm %s: %w", spec.ID, err)
	}
	placed = true
	o.log.Info("created vm", "vm_id", spec.ID, "vcpus", spec.VCPUs, "memory_mb", spec.MemoryMB, "network", cmp.Or(spec.Network, types.NetworkNone))
	return o.status(spec.ID)
}

// StartVM implements vmm.VMOrchestrator.
func (o *Orchestrator) StartVM(ctx context.Context, id string) error {
	if !idRE.MatchString(id) {
		return notFound(id)
	}
	unlock, err := o.locks.LockContext(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	vf, err := o.readVM(id)
	if err != nil {
		return err
	}
	p := o.procs(id)
	if p == nil || !p.qemu.alive() {
		if p, err = o.boot(ctx, id, vf); err != nil {
			return err
		}
	}
	err = o.waitAgent(ctx, id, p)
	if errors.Is(err, types.ErrUnavailable) && ctx.Err() == nil {
		// A guest that boots but never answers is powered off, so that a
		// retry boots it afresh instead of waiting on the same one again.
		o.stopProcs(id, true)
		o.cleanRuntime(id)
		if vf, rerr := o.readVM(id); rerr == nil {
			vf.Running = false
			_ = o.writeVM(id, vf)
		}
		return fmt.Errorf("%w; vhost-device-vsock's log ends with:\n%s\nthe VM was powered off, so starting it again boots it afresh", err, vmutil.Tail(o.path(id, fileVsockLog), 5))
	}
	return err
}

// boot spawns vhost-device-vsock and QEMU for a VM that does not run.
func (o *Orchestrator) boot(ctx context.Context, id string, vf *vmFile) (p *vmProcs, err error) {
	o.stopProcs(id, true) // leftovers of a crash, if any
	o.cleanRuntime(id)
	dir := o.RunDir(id)
	if vf.Spec.Network == types.NetworkNAT {
		// Idempotent: repairs a TAP lost since (a host reboot, a
		// reconcile) and keeps the lease, so the guest's address stays.
		n, err := o.attach(ctx, id)
		if err != nil {
			return nil, fmt.Errorf("starting vm %s: %w", id, err)
		}
		vf.Net = n
	}

	var vs *proc
	err = o.inNetns(vf.Net, func() (err error) {
		vs, err = spawn(o.cfg.VsockBinary, []string{"--vm", fmt.Sprintf("guest-cid=%d,socket=%s,uds-path=%s",
			guestCID, o.path(id, fileVhost), o.path(id, fileVsock))}, o.path(id, fileVsockLog), o.path(id, fileVsockPid))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("starting vm %s: %w", id, err)
	}
	defer func() {
		if err != nil {
			vs.stop(syscall.SIGTERM, time.Second)
			o.cleanRuntime(id)
			if vf.Running {
				// It never ran: record why instead of "should run".
				vf.Running, vf.Failed = false, err.Error()
				_ = o.writeVM(id, vf)
			}
		}
	}()
	if err := waitFile(o.path(id, fileVhost), vs, 10*time.Second); err != nil {
		return nil, fmt.Errorf("starting vm %s: vhost-device-vsock: %v; its log ends with:\n%s", id, err, vmutil.Tail(o.path(id, fileVsockLog), 10))
	}

	vf.Running = true
	vf.Failed = ""
	vf.Boots++
	if err := o.writeVM(id, vf); err != nil {
		return nil, err
	}
	var consoleFrom int64
	if fi, err := os.Stat(o.path(id, fileConsole)); err == nil {
		consoleFrom = fi.Size()
	}
	var q *proc
	err = o.inNetns(vf.Net, func() (err error) {
		q, err = spawn(o.cfg.Binary, o.qemuArgs(id, vf), o.path(id, fileQEMULog), o.path(id, fileQEMUPid))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("starting vm %s: %w", id, err)
	}
	p = &vmProcs{qemu: q, vsock: vs, consoleFrom: consoleFrom}
	o.mu.Lock()
	o.vms[id] = p
	o.mu.Unlock()
	go o.watch(id, p)
	o.log.Info("started vm", "vm_id", id, "qemu_pid", q.pid, "accel", o.accel.Name, "dir", dir)
	return p, nil
}

// qemuArgs is QEMU's command line for a VM. Every value in it comes from
// the validated spec or the configuration; no shell is involved.
func (o *Orchestrator) qemuArgs(id string, vf *vmFile) []string {
	spec := vf.Spec
	mem := strconv.Itoa(spec.MemoryMB)
	args := append([]string{"console=ttyS0", "reboot=t", "panic=-1"}, ClockArgs(o.accel.Name)...)
	args = append(args, "root=/dev/vda", "rw", bootparams.HostnameArg(spec.Name), o.cfg.KernelArgs)
	if vf.Net != nil {
		args = append(args, vf.Net.KernelArg)
	}
	cmdline := strings.Join(slices.DeleteFunc(args, func(s string) bool { return s == "" }), " ")
	return append([]string{
		"-name", "aetherium-" + id + ",process=aetherium-" + id,
		"-M", "microvm,memory-backend=mem",
		"-accel", o.accel.Name,
		"-smp", strconv.Itoa(spec.VCPUs),
		"-m", mem + "M",
		"-object", "memory-backend-memfd,id=mem,size=" + mem + "M,share=on",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-chardev", "file,id=con,path=" + o.path(id, fileConsole) + ",append=on",
		"-serial", "chardev:con",
		"-kernel", o.cfg.KernelPath,
		"-initrd", o.cfg.InitrdPath,
		"-append", cmdline,
		"-drive", "id=root,file=" + o.path(id, fileOverlay) + ",format=qcow2,if=none,discard=unmap",
		"-device", "virtio-blk-device,drive=root",
		"-chardev", "socket,id=vs0,path=" + o.path(id, fileVhost),
		"-device", "vhost-user-vsock-device,chardev=vs0",
		"-qmp", "unix:" + o.path(id, fileQMP) + ",server=on,wait=off",
	}, netArgs(vf.Net)...)
}

// waitAgent waits until the agent answers over vsock, failing fast when
// QEMU exits first.
func (o *Orchestrator) waitAgent(ctx context.Context, id string, p *vmProcs) error {
	readyCtx, cancel := context.WithTimeout(ctx, o.cfg.ReadyTimeout)
	defer cancel()
	ready := make(chan error, 1)
	go func() {
		// The hybrid vsock dial with retry is the readiness probe: it
		// succeeds once the guest listens on the agent's port. It starts
		// once the init says the agent listens (see agentReadyLine).
		waitConsole(readyCtx, o.path(id, fileConsole), p.consoleFrom, o.cfg.ReadyTimeout/2)
		conn, err := dialAgentRetry(readyCtx, o.path(id, fileVsock))
		if err != nil {
			ready <- err
			return
		}
		conn.Close()
		c, err := o.client(id)
		if err == nil {
			_, err = c.WaitReady(readyCtx)
		}
		ready <- err
	}()
	select {
	case err := <-ready:
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("starting vm %s: waiting for its agent: %w", id, ctx.Err())
		}
		return fmt.Errorf("%w: starting vm %s: its agent did not answer within %s: %v; the serial console ends with:\n%s",
			types.ErrUnavailable, id, o.cfg.ReadyTimeout, err, vmutil.Tail(o.path(id, fileConsole), 20))
	case <-p.qemu.done:
		cancel()
		<-ready
		return fmt.Errorf("starting vm %s: QEMU %s before the agent answered; its log ends with:\n%s\nthe serial console ends with:\n%s",
			id, p.qemu.status, vmutil.Tail(o.path(id, fileQEMULog), 10), vmutil.Tail(o.path(id, fileConsole), 20))
	}
}

// agentReadyLine is what fc-agent as init prints on the console once the
// agent listens.
const agentReadyLine = bootparams.ReadyLine

// waitConsole waits until the console log, past offset from, holds
// agentReadyLine, or limit passes, or ctx ends. Connections over
// vhost-device-vsock made while the guest's vsock driver is still starting
// were seen to wedge the device for good when ten guests booted at once
// under TCG, so the first CONNECT waits for the guest to say it is ready.
// The line is only a hint (a guest that logs less still gets dialled after
// limit); the vsock handshake stays the real test.
func waitConsole(ctx context.Context, path string, from int64, limit time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	// Only what is new since the last look is read; the tail of the last
	// read is kept so a line split across two reads is still found.
	off := from
	var carry []byte
	for {
		if f, err := os.Open(path); err == nil {
			if _, err := f.Seek(off, io.SeekStart); err == nil {
				b, _ := io.ReadAll(io.LimitReader(f, 1<<20))
				off += int64(len(b))
				carry = append(carry, b...)
			}
			f.Close()
			if bytes.Contains(carry, []byte(agentReadyLine)) {
				return
			}
			if keep := len(agentReadyLine) - 1; len(carry) > keep {
				carry = append(carry[:0], carry[len(carry)-keep:]...)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// handshakeWindow bounds one round of vsock dial attempts while a VM boots.
// A CONNECT that reaches the guest while its vsock driver is starting can
// go unanswered for good (seen with ten guests booting at once under TCG),
// and vsock.DialRetry bounds a handshake only by its context; a fresh
// window lets a later attempt succeed instead of waiting out ReadyTimeout.
const handshakeWindow = 5 * time.Second

// dialAgentRetry dials the agent's vsock port until it answers or ctx ends.
func dialAgentRetry(ctx context.Context, sock string) (net.Conn, error) {
	for {
		wctx, cancel := context.WithTimeout(ctx, handshakeWindow)
		conn, err := vsock.DialRetry(wctx, sock, bootparams.AgentPort, vsock.Backoff{Initial: 5 * time.Millisecond, Max: 50 * time.Millisecond})
		cancel()
		if err == nil || ctx.Err() != nil {
			return conn, err
		}
	}
}

// watch waits for QEMU to end. An end nobody asked for marks the VM failed
// and frees what it held, so a killed or crashed VM leaks nothing.
func (o *Orchestrator) watch(id string, p *vmProcs) {
	var vsockDone <-chan struct{} // nil: never
	if p.vsock != nil {
		vsockDone = p.vsock.done
	}
	var why string
	select {
	case <-p.qemu.done:
		why = "QEMU " + p.qemu.status
	case <-vsockDone:
		// QEMU runs on, but nothing reaches its agent any more: the VM is
		// as good as dead, and is ended rather than reported running.
		why = "vhost-device-vsock " + p.vsock.status + ", so the host could no longer reach the agent"
	}
	unlock := o.locks.Lock(id)
	defer unlock()
	o.mu.Lock()
	stopping := p.stopping
	current := o.vms[id] == p && !o.closed
	o.mu.Unlock()
	if stopping || !current {
		return
	}
	o.log.Warn("vm ended unexpectedly", "vm_id", id, "why", why)
	o.stopProcs(id, true)
	o.cleanRuntime(id)
	vf, err := o.readVM(id)
	if err != nil {
		return
	}
	vf.Running = false
	vf.Failed = why + lastLine(o.path(id, fileConsole))
	if err := o.writeVM(id, vf); err != nil {
		o.log.Warn("cannot record failed vm", "vm_id", id, "err", err)
	}
}

// lastLine returns "; console: <last line>" from the serial log, if any.
func lastLine(path string) string {
	t := strings.TrimSpace(vmutil.Tail(path, 1))
	if t == "" || strings.HasPrefix(t, "(") {
		return ""
	}
	return "; console: " + t
}

// StopVM implements vmm.VMOrchestrator. A graceful stop asks the agent to
// power the guest off, then asks QEMU to quit over QMP, then kills it,
// giving each step StopTimeout.
func (o *Orchestrator) StopVM(ctx context.Context, id string, force bool) error {
	if !idRE.MatchString(id) {
		return notFound(id)
	}
	unlock, err := o.locks.LockContext(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	vf, err := o.readVM(id)
	if err != nil {
		return err
	}
	p := o.procs(id)
	if p != nil && p.qemu.alive() {
		o.mu.Lock()
		p.stopping = true
		o.mu.Unlock()
		if !force {
			o.gracefulStop(ctx, id, p)
		}
	}
	o.stopProcs(id, true)
	o.cleanRuntime(id)
	if vf.Running || vf.Failed != "" {
		// A stopped VM is stopped, whatever ended its last run.
		vf.Running, vf.Failed = false, ""
		if err := o.writeVM(id, vf); err != nil {
			return err
		}
		o.log.Info("stopped vm", "vm_id", id, "force", force)
	}
	return nil
}

func (o *Orchestrator) gracefulStop(ctx context.Context, id string, p *vmProcs) {
	wait := func(d time.Duration) bool {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-p.qemu.done:
			return true
		case <-ctx.Done():
			return false
		case <-t.C:
			return false
		}
	}
	// o.client makes the client when this worker has none yet (a VM found
	// again after a restart), so the guest always gets to sync first.
	if c, err := o.client(id); err == nil {
		sctx, cancel := context.WithTimeout(ctx, o.cfg.StopTimeout)
		err := c.Shutdown(sctx, false)
		cancel()
		if err == nil && wait(o.cfg.StopTimeout) {
			return
		}
		o.log.Debug("agent power-off did not end the vm; asking QEMU to quit", "vm_id", id, "err", err)
	}
	if err := qmpQuit(ctx, o.path(id, fileQMP), o.cfg.StopTimeout); err != nil {
		o.log.Debug("QMP quit failed; killing QEMU", "vm_id", id, "err", err)
		return
	}
	wait(o.cfg.StopTimeout)
}

// qmpQuit asks QEMU to exit through its monitor.
//
// go-qemu bounds only the connect, and QMP serves one client at a time, so
// a monitor someone else holds (or a wedged QEMU) would block the greeting
// forever: the exchange runs in a goroutine and is given up after timeout
// or when ctx ends, and the caller goes on to SIGKILL.
func qmpQuit(ctx context.Context, sock string, timeout time.Duration) error {
	done := make(chan error, 1)
	go func() {
		m, err := qmp.NewSocketMonitor("unix", sock, 2*time.Second)
		if err != nil {
			done <- err
			return
		}
		if err := m.Connect(); err != nil {
			done <- err
			return
		}
		defer m.Disconnect()
		_, err = m.Run([]byte(`{"execute":"quit"}`))
		if err != nil && (errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed)) {
			err = nil // QEMU closed the monitor as it quit
		}
		done <- err
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		return fmt.Errorf("QMP did not answer within %s", timeout)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// stopProcs ends the VM's processes (SIGKILL for QEMU when kill is set) and
// forgets them. It must be called with the VM's lock held.
func (o *Orchestrator) stopProcs(id string, kill bool) {
	o.mu.Lock()
	p := o.vms[id]
	if p != nil {
		p.stopping = true
		delete(o.vms, id)
	}
	o.mu.Unlock()
	if p == nil {
		// Not known to this worker: a leftover from an earlier one.
		dir := o.RunDir(id)
		p = &vmProcs{qemu: adopt(o.path(id, fileQEMUPid), dir), vsock: adopt(o.path(id, fileVsockPid), dir)}
	}
	if p.client != nil {
		p.client.Close()
	}
	if p.qemu != nil {
		if kill {
			p.qemu.stop(syscall.SIGKILL, 0)
		} else {
			p.qemu.stop(syscall.SIGTERM, o.cfg.StopTimeout)
		}
	}
	if p.vsock != nil {
		p.vsock.stop(syscall.SIGTERM, 2*time.Second)
	}
}

// cleanRuntime removes what only a running VM has: sockets and pidfiles.
func (o *Orchestrator) cleanRuntime(id string) {
	for _, f := range []string{fileQEMUPid, fileQMP, fileVsockPid, fileVhost, fileVsock} {
		if err := os.Remove(o.path(id, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			o.log.Warn("cannot remove vm file", "vm_id", id, "file", f, "err", err)
		}
	}
}

// DeleteVM implements vmm.VMOrchestrator.
func (o *Orchestrator) DeleteVM(ctx context.Context, id string) error {
	if !idRE.MatchString(id) {
		return nil // no VM can have such an id
	}
	unlock, err := o.locks.LockContext(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	dir := o.RunDir(id)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		// A create that failed half-way may have left a lease or rules;
		// Detach removes whatever is there and is a no-op otherwise.
		return o.detach(ctx, id)
	}
	o.stopProcs(id, true)
	// The network goes before the directory: a failed Detach leaves vm.json
	// in place, so the retried delete (or Reconcile) still knows the VM.
	// A VM whose vm.json cannot be read is detached too, to be safe.
	if vf, err := o.readVM(id); err != nil || vf.Spec.Network == types.NetworkNAT || vf.Net != nil {
		if err := o.detach(ctx, id); err != nil {
			return err
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("removing vm %s's directory: %w", id, err)
	}
	o.log.Info("deleted vm", "vm_id", id)
	return nil
}

// ExecuteCommand implements vmm.VMOrchestrator. The command's environment
// is a default PATH and HOME, overlaid with the VM spec's environment, then
// with cmd.Env.
func (o *Orchestrator) ExecuteCommand(ctx context.Context, id string, cmd types.Command, stream vmm.ExecIO) (*types.ExecResult, error) {
	if err := cmd.Validate(); err != nil {
		return nil, err
	}
	c, vf, err := o.runningAgent(id)
	if err != nil {
		return nil, err
	}
	base := map[string]string{"PATH": bootparams.DefaultPath, "HOME": "/root"}
	maps.Copy(base, vf.Spec.Env)
	return vmutil.Exec(ctx, c, id, base, cmd, stream)
}

// running returns the record of a running VM, or types.ErrNotFound or
// types.ErrConflict.
func (o *Orchestrator) running(id string) (*vmFile, error) {
	if !idRE.MatchString(id) {
		return nil, notFound(id)
	}
	vf, err := o.readVM(id)
	if err != nil {
		return nil, err
	}
	p := o.procs(id)
	if p == nil || !p.qemu.alive() {
		st := types.VMStopped
		if vf.Failed != "" {
			st = types.VMFailed
		}
		return nil, fmt.Errorf("%w: vm %s is %s; start it first", types.ErrConflict, id, st)
	}
	return vf, nil
}

// runningAgent returns the agent client of a running VM and its record.
func (o *Orchestrator) runningAgent(id string) (*agent.Client, *vmFile, error) {
	vf, err := o.running(id)
	if err != nil {
		return nil, nil, err
	}
	c, err := o.client(id)
	return c, vf, err
}

// DialAgent implements vmm.VMOrchestrator: a new hybrid vsock connection
// to the agent's port through vhost-device-vsock.
func (o *Orchestrator) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	return vmutil.DialAgent(ctx, o.dialerOf, id)
}

// dialerOf is the dialer of a running VM's agent as a vmutil.RunningDialer.
func (o *Orchestrator) dialerOf(ctx context.Context, id string) (agent.Dialer, error) {
	if _, err := o.running(id); err != nil {
		return nil, err
	}
	return o.dialer(id), nil
}

// dialer reaches VM id's agent; the cached client and DialAgent share it.
func (o *Orchestrator) dialer(id string) agent.Dialer {
	sock := o.path(id, fileVsock)
	return func(ctx context.Context) (net.Conn, error) { return vsock.Dial(ctx, sock, bootparams.AgentPort) }
}

// WriteFile implements vmm.VMOrchestrator.
func (o *Orchestrator) WriteFile(ctx context.Context, id, path string, r io.Reader, opts types.FileOptions) (int64, error) {
	return vmutil.WriteFile(ctx, o.agentOf, id, path, r, opts)
}

// ReadFile implements vmm.VMOrchestrator.
func (o *Orchestrator) ReadFile(ctx context.Context, id, path string, w io.Writer) (int64, error) {
	return vmutil.ReadFile(ctx, o.agentOf, id, path, w)
}

// agentOf is runningAgent as a vmutil.RunningAgent.
func (o *Orchestrator) agentOf(ctx context.Context, id string) (*agent.Client, error) {
	c, _, err := o.runningAgent(id)
	return c, err
}

// GetVMStatus implements vmm.VMOrchestrator.
func (o *Orchestrator) GetVMStatus(ctx context.Context, id string) (*vmm.VMStatus, error) {
	if !idRE.MatchString(id) {
		return nil, notFound(id)
	}
	return o.status(id)
}

func (o *Orchestrator) status(id string) (*vmm.VMStatus, error) {
	vf, err := o.readVM(id)
	if err != nil {
		return nil, err
	}
	st := &vmm.VMStatus{ID: id, Name: vf.Spec.Name, Labels: vf.Spec.Labels, State: types.VMStopped}
	switch p := o.procs(id); {
	case p != nil && p.qemu.alive():
		st.State = types.VMRunning
	case vf.Failed != "":
		st.State, st.Detail = types.VMFailed, vf.Failed
	case vf.Running:
		// Should run, but this worker holds no process for it (the
		// watcher has not caught up yet, or another worker owns it).
		st.State, st.Detail = types.VMFailed, "its QEMU process is not running"
	}
	return st, nil
}

// ListVMs implements vmm.VMOrchestrator.
func (o *Orchestrator) ListVMs(ctx context.Context) ([]vmm.VMStatus, error) {
	ids, err := o.listIDs()
	if err != nil {
		return nil, err
	}
	out := make([]vmm.VMStatus, 0, len(ids))
	for _, id := range ids {
		vf, err := o.readVM(id)
		if err != nil || (o.cfg.Owner != "" && vf.Owner != o.cfg.Owner) {
			continue
		}
		if st, err := o.status(id); err == nil {
			out = append(out, *st)
		}
	}
	return out, nil
}

// listIDs returns the ids of the VM directories in RunDir.
func (o *Orchestrator) listIDs() ([]string, error) {
	ents, err := os.ReadDir(o.cfg.RunDir)
	if err != nil {
		return nil, fmt.Errorf("listing vms in %s: %w", o.cfg.RunDir, err)
	}
	var ids []string
	for _, e := range ents {
		if e.IsDir() && idRE.MatchString(e.Name()) {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

func (o *Orchestrator) readVM(id string) (*vmFile, error) {
	b, err := os.ReadFile(o.path(id, fileSpec))
	if errors.Is(err, os.ErrNotExist) {
		return nil, notFound(id)
	}
	if err != nil {
		return nil, fmt.Errorf("reading vm %s: %w", id, err)
	}
	var vf vmFile
	if err := json.Unmarshal(b, &vf); err != nil {
		return nil, fmt.Errorf("reading vm %s: %s is corrupt: %w; delete the vm (its processes, disk and network are removed all the same)", id, o.path(id, fileSpec), err)
	}
	return &vf, nil
}

// writeVM replaces vm.json atomically.
func (o *Orchestrator) writeVM(id string, vf *vmFile) error {
	b, err := json.MarshalIndent(vf, "", "  ")
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(o.RunDir(id), fileSpec+".*.tmp")
	if err != nil {
		return fmt.Errorf("writing vm %s: %w", id, err)
	}
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("writing vm %s: %w", id, err)
	}
	if err := os.Rename(f.Name(), o.path(id, fileSpec)); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("writing vm %s: %w", id, err)
	}
	return nil
}

func (o *Orchestrator) procs(id string) *vmProcs {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.vms[id]
}

// client returns the agent client of a running VM, making it on first use.
func (o *Orchestrator) client(id string) (*agent.Client, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	p := o.vms[id]
	if p == nil {
		return nil, fmt.Errorf("%w: vm %s is not running; start it first", types.ErrConflict, id)
	}
	if p.client == nil {
		c, err := agent.NewClient(o.dialer(id))
		if err != nil {
			return nil, err
		}
		p.client = c
	}
	return p.client, nil
}

func notFound(id string) error {
	return fmt.Errorf("%w: vm %s", types.ErrNotFound, id)
}
