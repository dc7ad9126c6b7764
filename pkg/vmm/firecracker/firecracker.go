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
// The API client is written here (client.go) rather than taken from
// firecracker-go-sdk: the SDK's v1.0.0 is generated from an older API (it
// predates v1.16's fields such as vsock_override), it would add go-openapi,
// logrus and the CNI plugins to our dependencies, and the backend uses only
// ten endpoints whose shapes are pinned by the vendored spec in testdata.
// The tests check every request this client sends against that spec, via a
// fake Firecracker (fcfake) that validates bodies with kin-openapi.
package firecracker

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
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

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
	"github.com/aetherium/aetherium-core/pkg/vsock"
)

// Provider is the backend's name in configuration.
const Provider = "firecracker"

// Defaults for Config's zero values.
const (
	DefaultBinary        = "firecracker"
	DefaultJailerBinary  = "jailer"
	DefaultSocketDir     = "/var/lib/aetherium/firecracker"
	DefaultChrootBaseDir = "/srv/jailer"
	DefaultCgroupVersion = 2
	DefaultLogLevel      = "Warning"
	DefaultReadyTimeout  = 30 * time.Second
	DefaultStopTimeout   = 10 * time.Second
	// MaxFirecrackerVCPUs is the API's upper bound on vcpu_count.
	MaxFirecrackerVCPUs = 32
	// GuestCID is the guest's vsock context id; each VM has its own vsock
	// device, so every guest can use the first free one.
	GuestCID = 3
)

// Names of the files in a VM's run directory or jail root.
const (
	apiSockName   = "api.sock"
	vsockSockName = "vsock.sock"
	rootfsName    = "rootfs.ext4"
	kernelName    = "vmlinux"
	initrdName    = "initrd.img"
	logName       = "firecracker.log"
	metricsName   = "metrics.json"
	snapStateName = "snapshot.state"
	snapMemName   = "snapshot.mem"
	stateFileName = "state.json"
	pidFileName   = "firecracker.pid"
	consoleName   = "console.log"
	// runningMarker exists from a successful start until StopVM: a VMM
	// that exits while it is there crashed or was killed from outside.
	runningMarker    = "running"
	maxSocketPathLen = 107 // sun_path holds 108 bytes with the final NUL
)

// Config configures the firecracker backend. The zero value of every field
// selects its default.
type Config struct {
	// Binary is the firecracker executable, a path or a name looked up in
	// PATH. Default "firecracker".
	Binary string
	// Jailer runs each VMM through Firecracker's jailer. Default off.
	Jailer JailerConfig
	// KernelPath is the guest kernel, an uncompressed ELF vmlinux. Required.
	KernelPath string
	// InitrdPath is the initramfs whose /init is fc-agent (it loads the
	// virtio and vsock modules, then mounts /dev/vda). Empty: none.
	InitrdPath string
	// RootfsPath is the ext4 root file system image; each VM gets a
	// copy-on-write copy of it as /dev/vda. Required.
	RootfsPath string
	// SocketDir holds one run directory per VM. Keep it short: unix socket
	// paths are limited to 107 bytes. Default /var/lib/aetherium/firecracker.
	SocketDir string
	// BootArgs are appended to the kernel command line the backend builds.
	BootArgs string
	// Network gives nat VMs their TAP, address and isolation rules (the
	// same manager the qemu backend uses); its namespace is where the VMM
	// runs unless the jailer joins one of its own. nil: no networking.
	Network network.VMNetwork
	// LogLevel is Firecracker's log level: Error, Warning, Info, Debug,
	// Trace or Off. Default Warning.
	LogLevel string
	// MaxVCPUs is the most vCPUs one VM may ask for. Default: the host's CPU
	// count, at most 32 (Firecracker's limit).
	MaxVCPUs int
	// ReadyTimeout bounds how long StartVM waits for the API socket and then
	// for the guest agent. Default 30s.
	ReadyTimeout time.Duration
	// StopTimeout is how long each step of a graceful StopVM (agent
	// poweroff, then Ctrl-Alt-Del) waits for the VMM to exit before the
	// next. Default 10s.
	StopTimeout time.Duration
	// Owner is the id of the worker that owns the VMs; ListVMs returns only
	// that owner's VMs when it is set.
	Owner string
	// Logger receives the backend's logs. Default slog.Default().
	Logger *slog.Logger
}

// JailerConfig configures Firecracker's jailer (docs/jailer.md).
type JailerConfig struct {
	// Enabled starts every VMM through the jailer.
	Enabled bool
	// Binary is the jailer executable, a path or a name in PATH. Default
	// "jailer".
	Binary string
	// UID and GID are what the jailer drops to before it execs Firecracker.
	// Zero keeps root; set a dedicated unprivileged user in production.
	UID int
	GID int
	// ChrootBaseDir is where jails are built. Default /srv/jailer.
	ChrootBaseDir string
	// CgroupVersion is 1 or 2. Default 2.
	CgroupVersion int
	// ParentCgroup places each VM's cgroup under this relative path.
	// Empty: the jailer's default (the firecracker binary's name).
	ParentCgroup string
	// NetNS is the path of a network namespace handle the VMM joins, e.g.
	// /var/run/netns/aetherium. Empty: the host's namespace.
	NetNS string
}

func (c *Config) setDefaults() {
	c.Binary = cmp.Or(c.Binary, DefaultBinary)
	c.Jailer.Binary = cmp.Or(c.Jailer.Binary, DefaultJailerBinary)
	c.Jailer.ChrootBaseDir = cmp.Or(c.Jailer.ChrootBaseDir, DefaultChrootBaseDir)
	c.Jailer.CgroupVersion = cmp.Or(c.Jailer.CgroupVersion, DefaultCgroupVersion)
	c.SocketDir = cmp.Or(c.SocketDir, DefaultSocketDir)
	c.LogLevel = cmp.Or(c.LogLevel, DefaultLogLevel)
	c.MaxVCPUs = cmp.Or(c.MaxVCPUs, min(runtime.NumCPU(), MaxFirecrackerVCPUs))
	c.ReadyTimeout = cmp.Or(c.ReadyTimeout, DefaultReadyTimeout)
	c.StopTimeout = cmp.Or(c.StopTimeout, DefaultStopTimeout)
	c.Logger = cmp.Or(c.Logger, slog.Default())
}

// runRoot is the directory under which the VMM-visible files of every VM
// live.
func (c *Config) runRoot() string {
	if c.Jailer.Enabled {
		return filepath.Join(c.Jailer.ChrootBaseDir, filepath.Base(c.Binary))
	}
	return c.SocketDir
}

// paths locates one VM's files.
type paths struct {
	run    string // SocketDir/<id>: record, pid, console
	jail   string // jailer only: <chroot_base>/<exec name>/<id>
	root   string // host directory of the files the VMM opens
	jailed bool
}

func (c *Config) paths(id string) paths {
	run := filepath.Join(c.SocketDir, id)
	if !c.Jailer.Enabled {
		return paths{run: run, root: run}
	}
	jail := filepath.Join(c.runRoot(), id)
	return paths{run: run, jail: jail, root: filepath.Join(jail, "root"), jailed: true}
}

// host is the host path of a VMM file.
func (p paths) host(name string) string { return filepath.Join(p.root, name) }

// vmm is the path of a VMM file as the VMM sees it (inside its chroot).
func (p paths) vmm(name string) string {
	if p.jailed {
		return "/" + name
	}
	return p.host(name)
}

// VMOptions are per-VM settings beyond the spec.
type VMOptions struct {
	// TAPDevice, when set, is attached as the guest's eth0 (a
	// network-interface). It must exist on the host (in the jailer's
	// network namespace when one is set).
	TAPDevice string `json:"tap_device,omitempty"`
	// GuestMAC is eth0's MAC address. Empty: Firecracker picks one.
	GuestMAC string `json:"guest_mac,omitempty"`
	// KernelArg is the guest's network configuration for its init
	// (aetherium.net=...), appended to the boot arguments.
	KernelArg string `json:"kernel_arg,omitempty"`
}

// record is a VM's state.json: what the backend must remember across
// restarts of the worker.
type record struct {
	ID       string            `json:"id"`
	Name     string            `json:"name"`
	VCPUs    int               `json:"vcpus"`
	MemoryMB int               `json:"memory_mb"`
	Labels   map[string]string `json:"labels,omitempty"`
	Env      map[string]string `json:"env,omitempty"`
	Owner    string            `json:"owner,omitempty"`
	Options  VMOptions         `json:"options"`
	Created  time.Time         `json:"created_at"`
	// Attached is set when the backend's network manager attached the VM,
	// so delete knows to detach it.
	Attached bool `json:"attached,omitempty"`
}

// proc is a running VMM process.
type proc struct {
	pid    int
	exited chan struct{} // closed when it ended; nil if not our child
}

// Orchestrator runs VMs as Firecracker microVMs. It implements
// vmm.VMOrchestrator.
type Orchestrator struct {
	cfg Config
	log *slog.Logger

	mu      sync.Mutex
	locks   vmutil.KeyedMutex        // one per VM id, held by life-cycle steps
	procs   map[string]*proc         // VMMs this process started
	clients map[string]*agent.Client // by VM id
}

var _ vmm.VMOrchestrator = (*Orchestrator)(nil)

// New checks cfg and prepares the socket directory. It does not require
// KVM or the binary: Health and Diagnose report on those.
func New(cfg Config) (*Orchestrator, error) {
	cfg.setDefaults()
	if cfg.MaxVCPUs < 0 || cfg.ReadyTimeout < 0 || cfg.StopTimeout < 0 {
		return nil, fmt.Errorf("%w: firecracker backend: max vcpus, ready timeout and stop timeout must not be negative", types.ErrInvalid)
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
	if cfg.Jailer.Enabled && !strings.Contains(filepath.Base(cfg.Binary), "firecracker") {
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
		cfg:     cfg,
		log:     cfg.Logger.With("provider", Provider),
		procs:   map[string]*proc{},
		clients: map[string]*agent.Client{},
	}
	if cfg.Network != nil {
		// TAPs, rules and leases of VMs whose create a crash cut short go
		// now; every VM with a record keeps its network.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if gone, err := cfg.Network.Reconcile(ctx, o.recordedIDs()); err != nil {
			o.log.Warn("reconciling the network of earlier runs", "err", err)
		} else if len(gone) > 0 {
			o.log.Info("removed the network of vms that no longer exist", "vm_ids", gone)
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
	return vmm.Capabilities{Provider: Provider, MaxVCPUs: o.cfg.MaxVCPUs, Isolation: "vm", PauseResume: true, Snapshot: true,
		Networking: o.cfg.Network != nil}
}

// Health implements vmm.VMOrchestrator: every check of Diagnose must pass.
func (o *Orchestrator) Health(context.Context) error { return health(o.cfg) }

// Close implements vmm.VMOrchestrator. VMs keep running.
func (o *Orchestrator) Close() error {
	o.mu.Lock()
	clients := o.clients
	o.clients = map[string]*agent.Client{}
	o.mu.Unlock()
	for _, c := range clients {
		c.Close()
	}
	return nil
}

// idRE is what a VM id may look like: the jailer accepts alphanumerics and
// hyphens, at most 64, and the id becomes part of host paths.
var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9-]{0,63}$`)

func notFound(id string) error { return fmt.Errorf("%w: vm %s", types.ErrNotFound, id) }

func (o *Orchestrator) lock(id string) func() { return o.locks.Lock(id) }

func (o *Orchestrator) readRecord(id string) (*record, error) {
	b, err := os.ReadFile(filepath.Join(o.cfg.paths(id).run, stateFileName))
	if errors.Is(err, os.ErrNotExist) {
		return nil, notFound(id)
	} else if err != nil {
		return nil, fmt.Errorf("reading vm %s: %w", id, err)
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("reading vm %s: %s is corrupt: %w; delete the vm", id, stateFileName, err)
	}
	return &r, nil
}

// CreateVM implements vmm.VMOrchestrator.
func (o *Orchestrator) CreateVM(ctx context.Context, spec types.VMSpec) (*vmm.VMStatus, error) {
	return o.CreateVMWithOptions(ctx, spec, VMOptions{})
}

// CreateVMWithOptions is CreateVM with the per-VM options of this backend.
// It copies the rootfs (reflink when possible) and, with the jailer, builds
// the jail's root; it does not start Firecracker.
func (o *Orchestrator) CreateVMWithOptions(ctx context.Context, spec types.VMSpec, opts VMOptions) (*vmm.VMStatus, error) {
	if !idRE.MatchString(spec.ID) {
		return nil, fmt.Errorf("%w: vm id %q must be 1-64 characters of [A-Za-z0-9-]", types.ErrInvalid, spec.ID)
	}
	if err := spec.Validate(o.cfg.MaxVCPUs); err != nil {
		return nil, err
	}
	if spec.Network == types.NetworkNAT && opts.TAPDevice == "" && o.cfg.Network == nil {
		return nil, fmt.Errorf("%w: networking is not configured; set network.enabled (and the network section) in the worker's configuration, or create the vm with --network none", types.ErrInvalid)
	}
	p := o.cfg.paths(spec.ID)
	for _, s := range []string{p.host(apiSockName), p.host(vsockSockName)} {
		if len(s) > maxSocketPathLen {
			return nil, fmt.Errorf("%w: socket path %s is %d bytes, over the %d a unix socket allows; choose a shorter socket dir or chroot base dir", types.ErrInvalid, s, len(s), maxSocketPathLen)
		}
	}
	unlock := o.lock(spec.ID)
	defer unlock()
	if _, err := o.readRecord(spec.ID); err == nil {
		return o.status(ctx, spec.ID)
	} else if !errors.Is(err, types.ErrNotFound) {
		return nil, err
	}
	attached := false
	undo := func() {
		os.RemoveAll(p.run)
		if p.jailed {
			os.RemoveAll(p.jail)
		}
		if attached {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), o.cfg.StopTimeout)
			defer cancel()
			if err := o.cfg.Network.Detach(dctx, spec.ID); err != nil {
				o.log.Warn("cannot detach a vm whose create failed; reconcile will", "vm_id", spec.ID, "err", err)
			}
		}
	}
	if err := o.prepare(p, spec.ID); err != nil {
		undo()
		return nil, fmt.Errorf("creating vm %s: %w", spec.ID, err)
	}
	if spec.Network == types.NetworkNAT && opts.TAPDevice == "" {
		a, err := o.cfg.Network.Attach(ctx, spec.ID)
		if err != nil {
			attached = true // Attach may have leased or written rules: undo detaches
			undo()
			return nil, fmt.Errorf("attaching vm %s to the network: %w", spec.ID, err)
		}
		attached = true
		opts.TAPDevice, opts.GuestMAC, opts.KernelArg = a.TAP, a.MAC.String(), a.KernelArg
	}
	rec := record{ID: spec.ID, Name: spec.Name, VCPUs: spec.VCPUs, MemoryMB: spec.MemoryMB,
		Labels: spec.Labels, Env: spec.Env, Owner: o.cfg.Owner, Options: opts, Created: time.Now().UTC(), Attached: attached}
	b, _ := json.MarshalIndent(rec, "", "  ")
	// state.json is written last: its presence means the VM exists.
	if err := writeFileAtomic(filepath.Join(p.run, stateFileName), b); err != nil {
		undo()
		return nil, fmt.Errorf("creating vm %s: %w", spec.ID, err)
	}
	o.log.Info("created vm", "vm_id", spec.ID, "vcpus", spec.VCPUs, "memory_mb", spec.MemoryMB, "jailed", p.jailed)
	return o.status(ctx, spec.ID)
}

// prepare makes the run directory (and jail root) with the VM's rootfs
// copy, log and metrics files. It is safe to run again after a crash.
func (o *Orchestrator) prepare(p paths, id string) error {
	if err := os.MkdirAll(p.run, 0o700); err != nil {
		return err
	}
	if p.jailed {
		if err := os.MkdirAll(p.root, 0o700); err != nil {
			return err
		}
	}
	if _, err := os.Stat(p.host(rootfsName)); err != nil {
		method, err := cloneFile(o.cfg.RootfsPath, p.host(rootfsName), 0o600)
		if err != nil {
			return fmt.Errorf("copying the rootfs %s: %w", o.cfg.RootfsPath, err)
		}
		o.log.Info("copied rootfs", "vm_id", id, "method", method)
	}
	// Firecracker opens the log and metrics paths but does not create them.
	for _, name := range []string{logName, metricsName} {
		f, err := os.OpenFile(p.host(name), os.O_CREATE|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		f.Close()
	}
	if !p.jailed {
		return nil
	}
	// The jailed VMM sees only its root: link the kernel and initrd in.
	// They stay owned by their owner (a hard link shares the inode); the
	// VMM only reads them.
	if _, err := linkOrCopy(o.cfg.KernelPath, p.host(kernelName)); err != nil {
		return fmt.Errorf("putting the kernel into the jail: %w", err)
	}
	if o.cfg.InitrdPath != "" {
		if _, err := linkOrCopy(o.cfg.InitrdPath, p.host(initrdName)); err != nil {
			return fmt.Errorf("putting the initrd into the jail: %w", err)
		}
	}
	for _, f := range []string{p.root, p.host(rootfsName), p.host(logName), p.host(metricsName)} {
		if err := os.Chown(f, o.cfg.Jailer.UID, o.cfg.Jailer.GID); err != nil {
			return fmt.Errorf("giving %s to the jailer's uid %d: %w", f, o.cfg.Jailer.UID, err)
		}
	}
	return nil
}

func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// bootArgs is the guest kernel command line. fc-agent's init reads root=
// and aetherium.hostname=; reboot=k makes a guest reboot (and Ctrl-Alt-Del)
// end the Firecracker process.
func (o *Orchestrator) bootArgs(rec *record) string {
	args := "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw " + bootparams.HostnameArg(rec.Name)
	if rec.Options.KernelArg != "" {
		args += " " + rec.Options.KernelArg
	}
	if o.cfg.BootArgs != "" {
		args += " " + o.cfg.BootArgs
	}
	return args
}

// StartVM implements vmm.VMOrchestrator. A paused VM is resumed.
func (o *Orchestrator) StartVM(ctx context.Context, id string) error {
	if !idRE.MatchString(id) {
		return notFound(id)
	}
	unlock := o.lock(id)
	defer unlock()
	rec, err := o.readRecord(id)
	if err != nil {
		return err
	}
	p := o.cfg.paths(id)
	if pr := o.running(id); pr != nil {
		info, err := NewClient(p.host(apiSockName)).Describe(ctx)
		switch {
		case err == nil && info.State == InstanceRunning:
			return o.waitAgent(ctx, id, p, pr)
		case err == nil && info.State == InstancePaused:
			if err := NewClient(p.host(apiSockName)).PatchVM(ctx, "Resumed"); err != nil {
				return fmt.Errorf("resuming vm %s: %w", id, err)
			}
			return o.waitAgent(ctx, id, p, pr)
		}
		// A VMM left half-configured by an interrupted start: begin again.
		o.log.Warn("replacing a firecracker process that never started its guest", "vm_id", id, "pid", pr.pid)
		o.kill(ctx, id, pr)
	}
	if rec.Attached && o.cfg.Network != nil {
		// The TAP and rules may be gone (a host reboot, a network
		// teardown); Attach is idempotent and repairs them.
		a, err := o.cfg.Network.Attach(ctx, id)
		if err != nil {
			return fmt.Errorf("starting vm %s: attaching it to the network: %w", id, err)
		}
		if a.TAP != rec.Options.TAPDevice || a.MAC.String() != rec.Options.GuestMAC || a.KernelArg != rec.Options.KernelArg {
			rec.Options.TAPDevice, rec.Options.GuestMAC, rec.Options.KernelArg = a.TAP, a.MAC.String(), a.KernelArg
			b, _ := json.MarshalIndent(rec, "", "  ")
			if err := writeFileAtomic(filepath.Join(p.run, stateFileName), b); err != nil {
				return fmt.Errorf("starting vm %s: %w", id, err)
			}
		}
	}
	pr, c, err := o.spawn(ctx, id, p)
	if err != nil {
		return err
	}
	fail := func(err error) error {
		o.kill(context.WithoutCancel(ctx), id, pr)
		return fmt.Errorf("starting vm %s: %w", id, err)
	}
	steps := []struct {
		what string
		do   func() error
	}{
		{"configuring the logger", func() error {
			return c.PutLogger(ctx, Logger{LogPath: p.vmm(logName), Level: o.cfg.LogLevel, ShowLevel: true})
		}},
		{"configuring metrics", func() error { return c.PutMetrics(ctx, Metrics{MetricsPath: p.vmm(metricsName)}) }},
		{"setting the machine config", func() error {
			return c.PutMachineConfig(ctx, MachineConfig{VCPUCount: rec.VCPUs, MemSizeMiB: rec.MemoryMB})
		}},
		{"setting the boot source", func() error {
			bs := BootSource{KernelImagePath: o.cfg.KernelPath, InitrdPath: o.cfg.InitrdPath, BootArgs: o.bootArgs(rec)}
			if p.jailed {
				bs.KernelImagePath = p.vmm(kernelName)
				if bs.InitrdPath != "" {
					bs.InitrdPath = p.vmm(initrdName)
				}
			}
			return c.PutBootSource(ctx, bs)
		}},
		{"attaching the rootfs", func() error {
			return c.PutDrive(ctx, Drive{DriveID: "rootfs", PathOnHost: p.vmm(rootfsName), IsRootDevice: true})
		}},
		{"adding the vsock device", func() error {
			return c.PutVsock(ctx, Vsock{GuestCID: GuestCID, UDSPath: p.vmm(vsockSockName)})
		}},
		{"attaching the network interface", func() error {
			if rec.Options.TAPDevice == "" {
				return nil
			}
			return c.PutNetworkInterface(ctx, NetworkInterface{IfaceID: "eth0", HostDevName: rec.Options.TAPDevice, GuestMAC: rec.Options.GuestMAC})
		}},
		{"starting the instance", func() error { return c.Action(ctx, ActionInstanceStart) }},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			return fail(fmt.Errorf("%s: %w", s.what, err))
		}
	}
	o.log.Info("started vm", "vm_id", id, "pid", pr.pid)
	if err := o.waitAgent(ctx, id, p, pr); err != nil {
		o.kill(context.WithoutCancel(ctx), id, pr)
		return err
	}
	return o.markRunning(id)
}

// markRunning records that the VM runs by request, so that an exit nobody
// asked for is reported as a crash.
func (o *Orchestrator) markRunning(id string) error {
	if err := os.WriteFile(filepath.Join(o.cfg.paths(id).run, runningMarker), nil, 0o600); err != nil {
		return fmt.Errorf("starting vm %s: %w", id, err)
	}
	return nil
}

// spawn starts the VMM (directly or through the jailer) and waits for its
// API socket to answer.
func (o *Orchestrator) spawn(ctx context.Context, id string, p paths) (*proc, *Client, error) {
	// Sockets of an earlier run would make Firecracker fail to bind; the
	// marker of a crashed run is no longer news.
	os.Remove(filepath.Join(p.run, runningMarker))
	os.Remove(p.host(apiSockName))
	os.Remove(p.host(vsockSockName))
	bin, err := exec.LookPath(o.cfg.Binary)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: starting vm %s: firecracker binary %q: %v; install Firecracker v1.16 and set vmm.firecracker.binary (see `aether-cli doctor`)", types.ErrUnavailable, id, o.cfg.Binary, err)
	}
	var cmd *exec.Cmd
	if p.jailed {
		jailer, err := exec.LookPath(o.cfg.Jailer.Binary)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: starting vm %s: jailer binary %q: %v; install the jailer of the same release or disable vmm.firecracker.jailer", types.ErrUnavailable, id, o.cfg.Jailer.Binary, err)
		}
		bin, _ = filepath.Abs(bin)
		cmd = exec.Command(jailer, o.jailerArgs(id, bin)...)
	} else {
		cmd = exec.Command(bin, "--api-sock", p.host(apiSockName), "--id", id)
	}
	console, err := os.OpenFile(filepath.Join(p.run, consoleName), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("starting vm %s: %w", id, err)
	}
	defer console.Close()
	cmd.Stdout, cmd.Stderr = console, console
	cmd.Dir = p.run
	// Its own session: the VM survives the worker and its signals.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	start := cmd.Start
	if o.cfg.Network != nil && !(p.jailed && o.cfg.Jailer.NetNS != "") {
		// The VMM opens its TAP by name, so it runs where the TAPs are.
		start = func() error { return o.cfg.Network.Do(cmd.Start) }
	}
	if err := start(); err != nil {
		return nil, nil, fmt.Errorf("%w: starting vm %s: %v", types.ErrUnavailable, id, err)
	}
	pr := &proc{pid: cmd.Process.Pid, exited: make(chan struct{})}
	go func() {
		cmd.Wait()
		close(pr.exited)
	}()
	o.mu.Lock()
	o.procs[id] = pr
	o.mu.Unlock()
	if err := os.WriteFile(filepath.Join(p.run, pidFileName), []byte(strconv.Itoa(pr.pid)), 0o600); err != nil {
		o.kill(ctx, id, pr)
		return nil, nil, fmt.Errorf("starting vm %s: %w", id, err)
	}

	c := NewClient(p.host(apiSockName))
	rctx, cancel := context.WithTimeout(ctx, o.cfg.ReadyTimeout)
	defer cancel()
	for {
		_, err := c.Describe(rctx)
		if err == nil {
			return pr, c, nil
		}
		select {
		case <-pr.exited:
			return nil, nil, fmt.Errorf("%w: starting vm %s: firecracker exited before its API socket answered; its output ends with:\n%s",
				types.ErrUnavailable, id, vmutil.Tail(filepath.Join(p.run, consoleName), 20))
		case <-rctx.Done():
			o.kill(context.WithoutCancel(ctx), id, pr)
			if ctx.Err() != nil {
				return nil, nil, fmt.Errorf("starting vm %s: %w", id, ctx.Err())
			}
			return nil, nil, fmt.Errorf("%w: starting vm %s: firecracker's API socket %s did not answer within %s: %v",
				types.ErrUnavailable, id, p.host(apiSockName), o.cfg.ReadyTimeout, err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// jailerArgs builds the jailer's command line (docs/jailer.md). The API
// socket is put at /api.sock in the jail, beside the VM's other files.
func (o *Orchestrator) jailerArgs(id, execFile string) []string {
	j := o.cfg.Jailer
	args := []string{
		"--id", id,
		"--exec-file", execFile,
		"--uid", strconv.Itoa(j.UID),
		"--gid", strconv.Itoa(j.GID),
		"--chroot-base-dir", j.ChrootBaseDir,
		"--cgroup-version", strconv.Itoa(j.CgroupVersion),
	}
	if j.ParentCgroup != "" {
		args = append(args, "--parent-cgroup", j.ParentCgroup)
	}
	if j.NetNS != "" {
		args = append(args, "--netns", j.NetNS)
	}
	return append(args, "--", "--api-sock", "/"+apiSockName)
}

// waitAgent waits until fc-agent answers over hybrid vsock, or the VMM
// exits, or ReadyTimeout passes.
func (o *Orchestrator) waitAgent(ctx context.Context, id string, p paths, pr *proc) error {
	c, err := o.client(id)
	if err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, o.cfg.ReadyTimeout)
	defer cancel()
	ready := make(chan error, 1)
	go func() {
		_, err := c.WaitReady(rctx)
		ready <- err
	}()
	var exited <-chan struct{}
	if pr != nil {
		exited = pr.exited
	}
	select {
	case err := <-ready:
		if err == nil {
			return nil
		}
		o.dropClient(id)
		if ctx.Err() != nil {
			return fmt.Errorf("starting vm %s: waiting for its agent: %w", id, ctx.Err())
		}
		return fmt.Errorf("%w: starting vm %s: VSock connection timeout: fc-agent did not answer on vsock port %d via %s within %s: %v; check that the guest kernel has virtio_vsock and that fc-agent is the initramfs's /init. Firecracker's log ends with:\n%s",
			types.ErrUnavailable, id, bootparams.AgentPort, p.host(vsockSockName), o.cfg.ReadyTimeout, err, vmutil.Tail(p.host(logName), 20))
	case <-exited:
		cancel()
		<-ready
		o.dropClient(id)
		return fmt.Errorf("%w: starting vm %s: firecracker exited before the agent answered; its output ends with:\n%s",
			types.ErrUnavailable, id, vmutil.Tail(filepath.Join(p.run, consoleName), 20))
	}
}

// running returns the VMM process of VM id when one is alive: ours, or one
// found through the pid file (a VM started before the worker restarted).
func (o *Orchestrator) running(id string) *proc {
	o.mu.Lock()
	pr := o.procs[id]
	o.mu.Unlock()
	if pr != nil {
		select {
		case <-pr.exited:
			o.mu.Lock()
			if o.procs[id] == pr {
				delete(o.procs, id)
			}
			o.mu.Unlock()
			return nil
		default:
			return pr
		}
	}
	b, err := os.ReadFile(filepath.Join(o.cfg.paths(id).run, pidFileName))
	if err != nil {
		return nil
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || !isVMM(pid, id) {
		return nil
	}
	return &proc{pid: pid}
}

// isVMM reports whether pid is alive and is the VMM of VM id, so that a
// recycled pid is not taken for it.
func isVMM(pid int, id string) bool {
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		return false
	}
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		// The state follows the command name in parentheses.
		if i := strings.LastIndexByte(string(st), ')'); i > 0 && strings.HasPrefix(string(st[i+1:]), " Z") {
			return false
		}
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(string(cmdline), "\x00")
	for i, a := range args {
		if a == "--id="+id || (a == "--id" && i+1 < len(args) && args[i+1] == id) {
			return true
		}
	}
	return false
}

// exitedWithin waits up to d for the VMM to end.
func (o *Orchestrator) exitedWithin(ctx context.Context, id string, pr *proc, d time.Duration) bool {
	if pr.exited != nil {
		select {
		case <-pr.exited:
			return true
		default:
		}
	}
	t := time.NewTimer(d)
	defer t.Stop()
	if pr.exited != nil {
		select {
		case <-pr.exited:
			return true
		case <-t.C:
		case <-ctx.Done():
		}
		return false
	}
	for {
		if !isVMM(pr.pid, id) {
			return true
		}
		select {
		case <-t.C:
			return false
		case <-ctx.Done():
			return false
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// kill ends the VMM with SIGKILL and waits for it.
func (o *Orchestrator) kill(ctx context.Context, id string, pr *proc) {
	if err := syscall.Kill(pr.pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		o.log.Warn("cannot kill firecracker", "vm_id", id, "pid", pr.pid, "err", err)
	}
	o.exitedWithin(ctx, id, pr, 10*time.Second)
	o.cleanupRun(id)
}

// cleanupRun forgets a VMM that ended and removes its sockets and pid file.
func (o *Orchestrator) cleanupRun(id string) {
	o.dropClient(id)
	o.mu.Lock()
	delete(o.procs, id)
	o.mu.Unlock()
	p := o.cfg.paths(id)
	os.Remove(p.host(apiSockName))
	os.Remove(p.host(vsockSockName))
	os.Remove(filepath.Join(p.run, pidFileName))
}

// StopVM implements vmm.VMOrchestrator. Gracefully: fc-agent powers the
// guest off (a reboot, which with reboot=k ends Firecracker); if the VMM is
// still there after StopTimeout, Ctrl-Alt-Del; then SIGKILL. force skips
// to SIGKILL.
func (o *Orchestrator) StopVM(ctx context.Context, id string, force bool) error {
	if !idRE.MatchString(id) {
		return notFound(id)
	}
	unlock := o.lock(id)
	defer unlock()
	if _, err := o.readRecord(id); err != nil {
		return err
	}
	// Asked for: the exit that follows is no crash.
	if err := os.Remove(filepath.Join(o.cfg.paths(id).run, runningMarker)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("stopping vm %s: %w", id, err)
	}
	pr := o.running(id)
	if pr == nil {
		o.cleanupRun(id)
		return nil
	}
	how := "killed"
	if !force {
		how = o.gracefulStop(ctx, id, pr)
	}
	if how == "killed" {
		o.kill(ctx, id, pr)
	}
	if !o.exitedWithin(ctx, id, pr, 0) {
		return fmt.Errorf("stopping vm %s: firecracker (pid %d) is still running: %w", id, pr.pid, cmp.Or(ctx.Err(), errors.New("it survived SIGKILL")))
	}
	o.cleanupRun(id)
	o.log.Info("stopped vm", "vm_id", id, "force", force, "how", how)
	return nil
}

// gracefulStop runs the polite steps and says which one ended the VMM, or
// "killed" when none did.
func (o *Orchestrator) gracefulStop(ctx context.Context, id string, pr *proc) string {
	p := o.cfg.paths(id)
	if c, err := o.client(id); err == nil {
		sctx, cancel := context.WithTimeout(ctx, min(3*time.Second, o.cfg.StopTimeout))
		// Reboot rather than power off: Firecracker ends on a guest
		// reboot (reboot=k), while a powered-off guest may leave it idle.
		err := c.Shutdown(sctx, true)
		cancel()
		if err != nil {
			o.log.Debug("agent shutdown failed", "vm_id", id, "err", err)
		}
		if o.exitedWithin(ctx, id, pr, o.cfg.StopTimeout) {
			return "agent poweroff"
		}
	}
	o.dropClient(id)
	if err := NewClient(p.host(apiSockName)).Action(ctx, ActionSendCtrlAltDel); err != nil {
		o.log.Debug("SendCtrlAltDel failed", "vm_id", id, "err", err)
	} else if o.exitedWithin(ctx, id, pr, o.cfg.StopTimeout) {
		return "ctrl-alt-del"
	}
	o.log.Warn("vm did not shut down; killing firecracker", "vm_id", id, "pid", pr.pid)
	return "killed"
}

// DeleteVM implements vmm.VMOrchestrator.
func (o *Orchestrator) DeleteVM(ctx context.Context, id string) error {
	if !idRE.MatchString(id) {
		return nil // no VM can have such an id
	}
	unlock := o.lock(id)
	defer unlock()
	if pr := o.running(id); pr != nil {
		o.kill(ctx, id, pr)
	}
	o.cleanupRun(id)
	p := o.cfg.paths(id)
	_, statErr := os.Stat(p.run)
	if rec, err := o.readRecord(id); o.cfg.Network != nil && (err != nil || rec.Attached) {
		// Before the record goes, so a failed detach is retried by the
		// next delete. Without a readable record (a create cut short, a
		// corrupt file) Detach runs too: it is a no-op when nothing is there.
		if err := o.cfg.Network.Detach(ctx, id); err != nil {
			return fmt.Errorf("detaching vm %s from the network: %w; delete it again to retry", id, err)
		}
	}
	// The record goes first, so a half-removed VM no longer counts as one.
	os.Remove(filepath.Join(p.run, stateFileName))
	if p.jailed {
		if err := os.RemoveAll(p.jail); err != nil {
			return fmt.Errorf("removing vm %s's jail: %w", id, err)
		}
		o.removeCgroup(id)
	}
	if err := os.RemoveAll(p.run); err != nil {
		return fmt.Errorf("removing vm %s's run directory: %w", id, err)
	}
	if statErr == nil {
		o.log.Info("deleted vm", "vm_id", id)
	}
	return nil
}

// removeCgroup removes the empty cgroup the jailer made for the VM; the
// jailer leaves it behind (docs/jailer.md). Best effort, cgroup v2 only.
func (o *Orchestrator) removeCgroup(id string) {
	if o.cfg.Jailer.CgroupVersion != 2 {
		return
	}
	parent := cmp.Or(o.cfg.Jailer.ParentCgroup, filepath.Base(o.cfg.Binary))
	dir := filepath.Join("/sys/fs/cgroup", parent, id)
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		o.log.Debug("cannot remove the vm's cgroup", "vm_id", id, "dir", dir, "err", err)
	}
}

// ExecuteCommand implements vmm.VMOrchestrator. The command's environment
// is the VM spec's overlaid with cmd.Env.
func (o *Orchestrator) ExecuteCommand(ctx context.Context, id string, cmd types.Command, stream vmm.ExecIO) (*types.ExecResult, error) {
	if err := cmd.Validate(); err != nil {
		return nil, err
	}
	c, rec, err := o.runningAgent(ctx, id)
	if err != nil {
		return nil, err
	}
	return vmutil.Exec(ctx, c, id, rec.Env, cmd, stream)
}

// runningRecord returns the record of a running VM, or types.ErrNotFound
// or types.ErrConflict.
func (o *Orchestrator) runningRecord(ctx context.Context, id string) (*record, error) {
	if !idRE.MatchString(id) {
		return nil, notFound(id)
	}
	rec, err := o.readRecord(id)
	if err != nil {
		return nil, err
	}
	st, err := o.status(ctx, id)
	if err != nil {
		return nil, err
	}
	if st.State != types.VMRunning {
		what := string(st.State)
		if st.Detail != "" {
			what += " (" + st.Detail + ")"
		}
		return nil, fmt.Errorf("%w: vm %s is %s; start it first", types.ErrConflict, id, what)
	}
	return rec, nil
}

// runningAgent returns the agent client of a running VM and its record.
func (o *Orchestrator) runningAgent(ctx context.Context, id string) (*agent.Client, *record, error) {
	rec, err := o.runningRecord(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	c, err := o.client(id)
	return c, rec, err
}

// DialAgent implements vmm.VMOrchestrator: a new connection to the agent's
// port through Firecracker's hybrid vsock socket.
func (o *Orchestrator) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	return vmutil.DialAgent(ctx, o.dialerOf, id)
}

// dialerOf is the dialer of a running VM's agent as a vmutil.RunningDialer.
func (o *Orchestrator) dialerOf(ctx context.Context, id string) (agent.Dialer, error) {
	if _, err := o.runningRecord(ctx, id); err != nil {
		return nil, err
	}
	return o.dialer(id), nil
}

// dialer reaches VM id's agent; the cached client and DialAgent share it.
func (o *Orchestrator) dialer(id string) agent.Dialer {
	uds := o.cfg.paths(id).host(vsockSockName)
	return func(ctx context.Context) (net.Conn, error) {
		return vsock.Dial(ctx, uds, bootparams.AgentPort)
	}
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
	c, _, err := o.runningAgent(ctx, id)
	return c, err
}

// GetVMStatus implements vmm.VMOrchestrator.
func (o *Orchestrator) GetVMStatus(ctx context.Context, id string) (*vmm.VMStatus, error) {
	if !idRE.MatchString(id) {
		return nil, notFound(id)
	}
	return o.status(ctx, id)
}

// Detail strings of VMs whose VMM runs but whose guest does not.
const (
	detailPaused   = "paused"
	detailStarting = "firecracker runs but its guest has not started"
)

func (o *Orchestrator) status(ctx context.Context, id string) (*vmm.VMStatus, error) {
	rec, err := o.readRecord(id)
	if err != nil {
		return nil, err
	}
	st := &vmm.VMStatus{ID: rec.ID, Name: rec.Name, Labels: rec.Labels, State: types.VMStopped}
	if o.running(id) == nil {
		run := o.cfg.paths(id).run
		if _, err := os.Stat(filepath.Join(run, runningMarker)); err == nil {
			st.State = types.VMFailed
			st.Detail = "firecracker exited without being stopped (killed or crashed); its output is in " + filepath.Join(run, consoleName)
		}
		return st, nil
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	info, err := NewClient(o.cfg.paths(id).host(apiSockName)).Describe(cctx)
	switch {
	case err != nil:
		st.Detail = detailStarting
	case info.State == InstanceRunning:
		st.State = types.VMRunning
	case info.State == InstancePaused:
		st.Detail = detailPaused
	default:
		st.Detail = detailStarting
	}
	return st, nil
}

// ListVMs implements vmm.VMOrchestrator.
func (o *Orchestrator) ListVMs(ctx context.Context) ([]vmm.VMStatus, error) {
	entries, err := os.ReadDir(o.cfg.SocketDir)
	if err != nil {
		return nil, fmt.Errorf("listing vms in %s: %w", o.cfg.SocketDir, err)
	}
	out := []vmm.VMStatus{}
	for _, e := range entries {
		if !e.IsDir() || !idRE.MatchString(e.Name()) {
			continue
		}
		rec, err := o.readRecord(e.Name())
		if err != nil {
			continue // being created or deleted
		}
		if o.cfg.Owner != "" && rec.Owner != o.cfg.Owner {
			continue
		}
		st, err := o.status(ctx, rec.ID)
		if err != nil {
			continue
		}
		out = append(out, *st)
	}
	slices.SortFunc(out, func(a, b vmm.VMStatus) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// client returns the cached agent client of VM id, which reaches fc-agent
// through the VM's hybrid vsock socket.
func (o *Orchestrator) client(id string) (*agent.Client, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if c, ok := o.clients[id]; ok {
		return c, nil
	}
	c, err := agent.NewClient(o.dialer(id))
	if err != nil {
		return nil, fmt.Errorf("connecting to vm %s's agent: %w", id, err)
	}
	o.clients[id] = c
	return c, nil
}

func (o *Orchestrator) dropClient(id string) {
	o.mu.Lock()
	c, ok := o.clients[id]
	delete(o.clients, id)
	o.mu.Unlock()
	if ok {
		c.Close()
	}
}

// PID returns the pid of VM id's running VMM, or 0 when none runs.
func (o *Orchestrator) PID(id string) int {
	if !idRE.MatchString(id) {
		return 0
	}
	if pr := o.running(id); pr != nil {
		return pr.pid
	}
	return 0
}
