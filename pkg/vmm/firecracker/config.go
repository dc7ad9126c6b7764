package firecracker

import (
	"cmp"
	"log/slog"
	"path/filepath"
	"runtime"
	"time"

	"github.com/aetherium/aetherium-core/pkg/vmm/internal/jail"

	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// Provider is the backend's name in configuration.
const Provider = "firecracker"

// Defaults for Config's zero values.
const (
	DefaultBinary        = "firecracker"
	DefaultJailerBinary  = "jailer"
	DefaultSocketDir     = "/var/lib/aetherium/firecracker"
	DefaultChrootBaseDir = "/srv/jailer"
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
	Binary string `yaml:"binary"`
	// Jailer runs each VMM through Firecracker's jailer, each VM under its
	// own leased uid. Default on.
	Jailer JailerConfig `yaml:"jailer"`
	// KernelPath is the guest kernel, an uncompressed ELF vmlinux. Required.
	KernelPath string `yaml:"kernel_path"`
	// InitrdPath is the initramfs whose /init is fc-agent (it loads the
	// virtio and vsock modules, then mounts /dev/vda). Empty: none.
	InitrdPath string `yaml:"initrd_path"`
	// RootfsPath is the ext4 root file system image; each VM gets a
	// copy-on-write copy of it as /dev/vda. Required.
	RootfsPath string `yaml:"rootfs_path"`
	// SocketDir holds one run directory per VM. Keep it short: unix socket
	// paths are limited to 107 bytes. Default /var/lib/aetherium/firecracker.
	SocketDir string `yaml:"socket_dir"`
	// BootArgs are appended to the kernel command line the backend builds.
	BootArgs string `yaml:"boot_args"`
	// Network gives nat VMs their TAP, address and isolation rules (the
	// same manager the qemu backend uses); its namespace is where the VMM
	// runs unless the jailer joins one of its own. nil: no networking.
	Network network.VMNetwork `yaml:"-"`
	// LogLevel is Firecracker's log level: Error, Warning, Info, Debug,
	// Trace or Off. Default Warning.
	LogLevel string `yaml:"log_level"`
	// MaxVCPUs is the most vCPUs one VM may ask for. Default: the host's CPU
	// count, at most 32 (Firecracker's limit).
	MaxVCPUs int `yaml:"-"`
	// MaxMemoryMB is the most memory one VM may ask for, in MiB; a
	// larger spec is refused before anything is made. Default: the host's
	// RAM minus vmm.HostMemoryReserveMB (vmm.DefaultMaxMemoryMB).
	MaxMemoryMB int `yaml:"max_memory_mb"`
	// ReadyTimeout bounds how long StartVM waits for the API socket and then
	// for the guest agent. Default 30s.
	ReadyTimeout time.Duration `yaml:"ready_timeout"`
	// StopTimeout is how long each step of a graceful StopVM (agent
	// poweroff, then Ctrl-Alt-Del) waits for the VMM to exit before the
	// next. Default 10s.
	StopTimeout time.Duration `yaml:"stop_timeout"`
	// Owner is the id of the worker that owns the VMs; ListVMs returns only
	// that owner's VMs when it is set.
	Owner string `yaml:"-"`
	// Logger receives the backend's logs. Default slog.Default().
	Logger *slog.Logger `yaml:"-"`
}

// JailerConfig configures Firecracker's jailer (docs/jailer.md).
type JailerConfig struct {
	// Enabled starts every VMM through the jailer. Default (nil) true;
	// false only to debug, never on a host running untrusted code.
	Enabled *bool `yaml:"enabled"`
	// Binary is the jailer executable, a path or a name in PATH. Default
	// "jailer".
	Binary string `yaml:"binary"`
	// UID and GID, when set, are what the jailer drops to for every VM.
	// Not recommended: VMs sharing a uid can open each other's files.
	// Zero (the default): each VM leases its own uid/gid pair from
	// UIDBase/GIDBase/Count, the range the qemu backend's jail uses too.
	UID int `yaml:"uid"`
	GID int `yaml:"gid"`
	// UIDBase, GIDBase and Count are the leased uid/gid range. Defaults
	// are the qemu jail's (900000, 900000, 1000), so both backends on one
	// host share one range and never hand out a uid twice.
	UIDBase int `yaml:"uid_base"`
	GIDBase int `yaml:"gid_base"`
	Count   int `yaml:"count"`
	// StateDir holds the uid leases (StateDir/uids/<uid>). Default
	// /var/lib/aetherium/jail, shared with the qemu jail.
	StateDir string `yaml:"state_dir"`
	// ChrootBaseDir is where jails are built. Default /srv/jailer.
	ChrootBaseDir string `yaml:"chroot_base_dir"`
	// CgroupVersion is 1 or 2: the hierarchy in which the jailer makes
	// each VM's cgroup and writes its CPU, memory and pids limits. It must
	// be the host's (doctor checks). Default (0): the host's, as
	// HostCgroupVersion finds it.
	CgroupVersion int `yaml:"cgroup_version"`
	// ParentCgroup places each VM's cgroup under this relative path.
	// Empty: the jailer's default (the firecracker binary's name).
	ParentCgroup string `yaml:"parent_cgroup"`
	// NetNS is the path of a network namespace handle the VMM joins, e.g.
	// /var/run/netns/aetherium. Empty: the host's namespace.
	NetNS string `yaml:"netns"`
}

// On reports whether the jailer is used (the default).
func (j JailerConfig) On() bool { return j.Enabled == nil || *j.Enabled }

// leased reports whether each VM leases its own uid.
func (j JailerConfig) leased() bool { return j.On() && j.UID == 0 && j.GID == 0 }

func (c *Config) setDefaults() {
	c.Jailer.UIDBase = cmp.Or(c.Jailer.UIDBase, jail.DefaultUIDBase)
	c.Jailer.GIDBase = cmp.Or(c.Jailer.GIDBase, jail.DefaultGIDBase)
	c.Jailer.Count = cmp.Or(c.Jailer.Count, jail.DefaultCount)
	c.Jailer.StateDir = cmp.Or(c.Jailer.StateDir, jail.DefaultStateDir)
	c.Binary = cmp.Or(c.Binary, DefaultBinary)
	c.Jailer.Binary = cmp.Or(c.Jailer.Binary, DefaultJailerBinary)
	c.Jailer.ChrootBaseDir = cmp.Or(c.Jailer.ChrootBaseDir, DefaultChrootBaseDir)
	c.Jailer.CgroupVersion = cmp.Or(c.Jailer.CgroupVersion, HostCgroupVersion())
	c.SocketDir = cmp.Or(c.SocketDir, DefaultSocketDir)
	c.LogLevel = cmp.Or(c.LogLevel, DefaultLogLevel)
	c.MaxVCPUs = cmp.Or(c.MaxVCPUs, min(runtime.NumCPU(), MaxFirecrackerVCPUs))
	if c.MaxMemoryMB == 0 {
		c.MaxMemoryMB = vmm.DefaultMaxMemoryMB()
	}
	c.ReadyTimeout = cmp.Or(c.ReadyTimeout, DefaultReadyTimeout)
	c.StopTimeout = cmp.Or(c.StopTimeout, DefaultStopTimeout)
	c.Logger = cmp.Or(c.Logger, slog.Default())
}

// runRoot is the directory under which the VMM-visible files of every VM
// live.
func (c *Config) runRoot() string {
	if c.Jailer.On() {
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
	if !c.Jailer.On() {
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

// HostCgroupVersion is the default jailer cgroup version: 2 on a host
// whose /sys/fs/cgroup is a cgroup v2 mount, else 1 (a v1 or hybrid host,
// where the jailer's v2 would find no controllers).
func HostCgroupVersion() int {
	if jail.HostCgroupVersion(jail.DefaultCgroupRoot) == jail.CgroupV2 {
		return 2
	}
	return 1
}
