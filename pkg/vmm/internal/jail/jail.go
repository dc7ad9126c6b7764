// Package jail confines VMM processes the way Firecracker's jailer does:
// each VM gets its own unprivileged uid and gid (leased from a configured
// range), its own cgroup with CPU, memory and pids limits, and its VMM
// processes start through the aether-jailer binary, which in a private
// mount namespace pivots into a tmpfs holding only what the VMM needs,
// drops every capability and privilege, installs a seccomp filter and
// exec()s the VMM (so the VMM keeps the pid the backend spawned).
//
// The package is backend-neutral: the qemu backend uses it today, and the
// firecracker backend can share its uid range and cgroups. The worker side
// (Manager: leases, cgroups, the jailer's command line) and the jailer side
// (Main, run inside aether-jailer) live here together so that the command
// line between them is written and parsed in one place.
package jail

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Defaults for Config's zero values.
const (
	// DefaultBinary is the jailer's file name, looked up next to the
	// running executable first, then on PATH.
	DefaultBinary = "aether-jailer"
	// DefaultUIDBase and DefaultGIDBase start the id range: far above
	// distribution users (Debian's end at 59999) and systemd's dynamic
	// users (61184–65519). Hosts with many /etc/subuid ranges (100000 and
	// up, 65536 each) may overlap it; doctor checks.
	DefaultUIDBase = 900000
	DefaultGIDBase = 900000
	// DefaultCount is how many VMs can be confined at once.
	DefaultCount = 1000
	// DefaultStateDir holds the uid leases.
	DefaultStateDir = "/var/lib/aetherium/jail"
	// DefaultCgroupVersion picks v2 on a pure-v2 host and v1 otherwise.
	DefaultCgroupVersion = CgroupAuto
	// DefaultCgroupParent is the cgroup (relative to each hierarchy's
	// root) under which every VM's cgroup is made.
	DefaultCgroupParent = "aetherium"
	// DefaultMemoryOverheadMB is added to the guest's memory for the VMM's
	// own use. Measured here: QEMU 7.2 under TCG with a 512 MiB guest that
	// booted and ran commands had 60–120 MiB besides the guest's pages,
	// most of it the TCG translation cache, which grows with the code the
	// guest runs (QEMU reserves up to 1 GiB for it and faults it in on
	// demand). 384 MiB leaves room for that growth.
	DefaultMemoryOverheadMB = 384
	// DefaultCPUOverheadMillis is the CPU, in thousandths, a VM's quota
	// gets beyond its vCPUs for the VMM's own threads (device emulation,
	// the main loop). Measured when the qemu backend also ran
	// vhost-device-vsock in the same cgroup: with a quota of exactly one
	// CPU, a 1-vCPU TCG guest was throttled in 14–20 of ~33 periods while
	// it booted, and cold create took ~3.7% longer than unconfined; a
	// quarter CPU covered those threads (BenchmarkJailColdStart measures
	// the current cost).
	DefaultCPUOverheadMillis = 250
	// DefaultPidsMax bounds the tasks (threads included) of one VM's
	// cgroup. QEMU runs one thread per vCPU plus I/O and RCU threads and a
	// worker pool of up to 64.
	DefaultPidsMax = 512
)

// Cgroup versions.
const (
	CgroupAuto = "auto"
	CgroupV1   = "1"
	CgroupV2   = "2"
)

// Config configures confinement. The zero value confines with every
// default.
type Config struct {
	// Enabled turns confinement on. Default (nil) true; set it to false
	// only to debug a VMM, never on a host running untrusted code (doctor
	// warns when it is off).
	Enabled *bool `yaml:"enabled"`
	// Binary is the aether-jailer executable. Default: the file
	// aether-jailer next to the running executable, else on PATH.
	Binary string `yaml:"binary"`
	// UIDBase is the first uid given to a VM. Default 900000. The range
	// UIDBase..UIDBase+Count-1 must not contain 0 nor any host user.
	UIDBase int `yaml:"uid_base"`
	// GIDBase is the first gid; VM i gets GIDBase+i with UIDBase+i.
	// Default 900000.
	GIDBase int `yaml:"gid_base"`
	// Count is the size of the uid/gid range: how many VMs can be
	// confined at once on this host. Default 1000.
	Count int `yaml:"count"`
	// StateDir holds one lease file per uid in use (uids/<uid>), shared
	// by every worker on the host. Default /var/lib/aetherium/jail.
	StateDir string `yaml:"state_dir"`
	// CgroupVersion is "auto" (v2 when the cgroup root is a pure v2
	// mount, v1 otherwise), "1" or "2". Default auto.
	CgroupVersion string `yaml:"cgroup_version"`
	// CgroupRoot is where cgroup file systems are mounted. Default
	// /sys/fs/cgroup; tests point it at a fake tree.
	CgroupRoot string `yaml:"cgroup_root"`
	// CgroupParent is the cgroup, relative to each hierarchy's root,
	// under which every VM gets <parent>/<vm-id>. Default aetherium.
	CgroupParent string `yaml:"cgroup_parent"`
	// MemoryOverheadMB is added to the guest's memory to make the VM's
	// cgroup memory limit. Default 384.
	MemoryOverheadMB int `yaml:"memory_overhead_mb"`
	// CPUOverheadMillis is added, in thousandths of a CPU, to the VM's
	// vCPUs to make its cgroup's CPU quota: the VMM's threads besides the
	// vCPUs need some. Default 250; -1 for none (the quota is exactly the
	// vCPUs).
	CPUOverheadMillis int `yaml:"cpu_overhead_millis"`
	// PidsMax is the VM cgroup's pids limit. Default 512.
	PidsMax int `yaml:"pids_max"`
	// IOWeight is the VM cgroup's I/O weight (1–10000 on v2, 10–1000 on
	// v1). Default 0: unset, the kernel's default applies.
	IOWeight int `yaml:"io_weight"`
}

// On reports whether confinement is enabled (the default).
func (c Config) On() bool { return c.Enabled == nil || *c.Enabled }

// withDefaults fills the zero values.
func (c Config) withDefaults() Config {
	c.UIDBase = cmp.Or(c.UIDBase, DefaultUIDBase)
	c.GIDBase = cmp.Or(c.GIDBase, DefaultGIDBase)
	c.Count = cmp.Or(c.Count, DefaultCount)
	c.StateDir = cmp.Or(c.StateDir, DefaultStateDir)
	c.CgroupVersion = cmp.Or(c.CgroupVersion, DefaultCgroupVersion)
	c.CgroupRoot = cmp.Or(c.CgroupRoot, DefaultCgroupRoot)
	c.CgroupParent = cmp.Or(c.CgroupParent, DefaultCgroupParent)
	c.MemoryOverheadMB = cmp.Or(c.MemoryOverheadMB, DefaultMemoryOverheadMB)
	c.CPUOverheadMillis = cmp.Or(c.CPUOverheadMillis, DefaultCPUOverheadMillis)
	c.PidsMax = cmp.Or(c.PidsMax, DefaultPidsMax)
	return c
}

// maxID is the largest uid or gid (2^32-2; -1 means "unchanged" to the
// kernel).
const maxID = 1<<32 - 2

// Validate checks the configuration with its defaults applied. Every
// problem is types.ErrInvalid with the key to change.
func (c Config) Validate() error {
	c = c.withDefaults()
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: jail: "+format, append([]any{types.ErrInvalid}, args...)...)
	}
	switch {
	case c.Count < 1:
		return bad("count %d must be at least 1", c.Count)
	case c.UIDBase < 1 || c.GIDBase < 1:
		return bad("uid_base %d and gid_base %d must be above 0: a VMM must never run as root", c.UIDBase, c.GIDBase)
	case c.UIDBase+c.Count-1 > maxID || c.GIDBase+c.Count-1 > maxID:
		return bad("uid/gid range %d+%d or %d+%d ends above %d", c.UIDBase, c.Count, c.GIDBase, c.Count, maxID)
	case c.MemoryOverheadMB < 0 || c.PidsMax < 0:
		return bad("memory_overhead_mb and pids_max must not be negative")
	case c.CPUOverheadMillis < -1:
		return bad("cpu_overhead_millis %d must be -1 (none) or more", c.CPUOverheadMillis)
	case c.IOWeight < 0 || c.IOWeight > 10000:
		return bad("io_weight %d must be 0 (unset) or 1–10000", c.IOWeight)
	case !filepath.IsAbs(c.StateDir):
		return bad("state_dir %q must be an absolute path", c.StateDir)
	case !filepath.IsAbs(c.CgroupRoot):
		return bad("cgroup_root %q must be an absolute path", c.CgroupRoot)
	}
	switch c.CgroupVersion {
	case CgroupAuto, CgroupV1, CgroupV2:
	default:
		return bad("cgroup_version %q: use auto, 1 or 2", c.CgroupVersion)
	}
	if p := c.CgroupParent; filepath.IsAbs(p) || filepath.Clean(p) != p || p == "." || strings.HasPrefix(p, "..") {
		return bad("cgroup_parent %q must be a clean relative path such as aetherium", p)
	}
	return nil
}

// FindBinary returns the jailer executable: name itself when it holds a
// slash, else the file next to the running executable, else PATH's.
func FindBinary(name string) (string, error) {
	name = cmp.Or(name, DefaultBinary)
	if strings.Contains(name, "/") {
		p, err := filepath.Abs(name)
		if err == nil {
			_, err = exec.LookPath(p)
		}
		if err != nil {
			return "", fmt.Errorf("%w: jailer %s: %v; build it with `./scripts/build.sh` or set vmm.<backend>.jail.binary", types.ErrUnavailable, name, err)
		}
		return p, nil
	}
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), name)
		if _, err := exec.LookPath(p); err == nil {
			return p, nil
		}
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("%w: jailer %s is neither next to this program nor on PATH; build and install it with `./scripts/build.sh` and `./scripts/setup.sh`, or set vmm.<backend>.jail.binary", types.ErrUnavailable, name)
	}
	return filepath.Abs(p)
}

// Manager is the worker's side of confinement: uid leases, cgroups and
// the jailer's command line. It is safe for concurrent use and across
// processes sharing StateDir.
type Manager struct {
	cfg    Config
	binary string
	leases *Leases
	cg     *Cgroups
}

// New validates cfg, finds the jailer and the cgroup version, and makes
// the state directory. It must only be called when cfg.On().
func New(cfg Config) (*Manager, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	bin, err := FindBinary(cfg.Binary)
	if err != nil {
		return nil, err
	}
	leases, err := NewLeases(filepath.Join(cfg.StateDir, "uids"), cfg.UIDBase, cfg.GIDBase, cfg.Count)
	if err != nil {
		return nil, err
	}
	cg, err := NewCgroups(cfg.CgroupRoot, cfg.CgroupVersion, cfg.CgroupParent)
	if err != nil {
		return nil, err
	}
	return &Manager{cfg: cfg, binary: bin, leases: leases, cg: cg}, nil
}

// Binary returns the jailer's path.
func (m *Manager) Binary() string { return m.binary }

// Leases returns the uid leases.
func (m *Manager) Leases() *Leases { return m.leases }

// Cgroups returns the VM cgroups.
func (m *Manager) Cgroups() *Cgroups { return m.cg }

// Limits returns the cgroup limits of a VM with vcpus and memoryMB of
// guest memory, from the configuration.
func (m *Manager) Limits(vcpus, memoryMB int) Limits { return VMLimits(m.cfg, vcpus, memoryMB) }

// VMLimits returns the cgroup limits of a VM with vcpus and memoryMB of
// guest memory under cfg, whose zero values take the defaults: a CPU
// quota of the vCPUs plus CPUOverheadMillis, the guest memory plus
// MemoryOverheadMB, PidsMax and IOWeight. A backend that does not run
// its VMMs through a Manager (Firecracker's own jailer sets the cgroup)
// uses it to give its VMs the same limits.
func VMLimits(cfg Config, vcpus, memoryMB int) Limits {
	cfg = cfg.withDefaults()
	return Limits{CPUMillis: vcpus*1000 + max(cfg.CPUOverheadMillis, 0), MemoryBytes: int64(memoryMB+cfg.MemoryOverheadMB) << 20, PidsMax: cfg.PidsMax, IOWeight: cfg.IOWeight}
}

// Command returns the command that runs spec's VMM through the jailer: as
// root in a new mount namespace (Go unshares it and makes / private in
// the single-threaded child, which the multi-threaded jailer could not),
// from where the jailer confines itself and exec()s the VMM. The caller
// sets its output and starts it.
func (m *Manager) Command(spec Spec) (*exec.Cmd, error) {
	args, err := spec.Args()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(m.binary, args...)
	// A VMM needs no environment of the worker's; the few variables kept
	// make its logs readable.
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LANG=C.UTF-8"}
	flags := uintptr(syscall.CLONE_NEWNS)
	if spec.NoNetwork {
		flags |= syscall.CLONE_NEWNET
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: flags}
	return cmd, nil
}

// Spec is what the jailer does for one VMM process. The worker builds it
// from validated values; it travels as the jailer's command line, never
// through a file the VM's uid could rewrite.
type Spec struct {
	// UID and GID are the VM's ids; never 0.
	UID, GID int
	// Root is an existing empty directory, owned by root and not writable
	// by the VM's uid, on which the jail's tmpfs root is mounted (in the
	// jailer's private mount namespace only).
	Root string
	// ReadOnly are files or directories bind-mounted read-only at the same
	// absolute path in the jail. A symbolic link is copied as a link.
	ReadOnly []string
	// ReadWrite are bind-mounted read-write at the same path.
	ReadWrite []string
	// Devices are device nodes bind-mounted at the same path.
	Devices []string
	// Cgroups are the cgroup directories (one per v1 hierarchy, or one v2
	// directory) the jailer joins before it confines itself.
	Cgroups []string
	// Argv is the VMM's command line; Argv[0] is its absolute path, which
	// must be visible in the jail (under ReadOnly).
	Argv []string
	// NoNetwork starts the VMM in a network namespace of its own, holding
	// only a loopback that is down, so a taken-over VMM cannot reach the
	// host's services (PostgreSQL, Redis, the API, metadata endpoints) or
	// abstract unix sockets. Path-based unix sockets (QMP, the agent's
	// serial chardev, hybrid vsock) work across namespaces. Set it for every VMM that does
	// not open a TAP. It is how the jailer is started, not one of its
	// arguments.
	NoNetwork bool `json:"-"`
}

// Args encodes spec as the jailer's command line.
func (s Spec) Args() ([]string, error) {
	if err := s.validate(); err != nil {
		return nil, err
	}
	a := []string{"--uid", strconv.Itoa(s.UID), "--gid", strconv.Itoa(s.GID), "--root", s.Root}
	for _, l := range []struct {
		flag  string
		paths []string
	}{{"--ro", s.ReadOnly}, {"--rw", s.ReadWrite}, {"--dev", s.Devices}, {"--cgroup", s.Cgroups}} {
		for _, p := range l.paths {
			a = append(a, l.flag, p)
		}
	}
	return append(append(a, "--"), s.Argv...), nil
}

func (s Spec) validate() error {
	if s.UID <= 0 || s.GID <= 0 || s.UID > maxID || s.GID > maxID {
		return fmt.Errorf("%w: jail: uid %d and gid %d must be in 1..%d", types.ErrInvalid, s.UID, s.GID, maxID)
	}
	if len(s.Argv) == 0 || !filepath.IsAbs(s.Argv[0]) {
		return fmt.Errorf("%w: jail: the VMM must be named by an absolute path, not %q", types.ErrInvalid, s.Argv)
	}
	for _, p := range append(append(append(append([]string{s.Root}, s.ReadOnly...), s.ReadWrite...), s.Devices...), s.Cgroups...) {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" {
			return fmt.Errorf("%w: jail: path %q must be clean, absolute and not /", types.ErrInvalid, p)
		}
	}
	return nil
}

// ParseArgs decodes the jailer's command line (without the program name).
func ParseArgs(args []string) (Spec, error) {
	var s Spec
	for len(args) > 0 {
		flag := args[0]
		if flag == "--" {
			s.Argv = args[1:]
			return s, s.validate()
		}
		if len(args) < 2 {
			return s, fmt.Errorf("%w: jailer: %s needs a value", types.ErrInvalid, flag)
		}
		v := args[1]
		args = args[2:]
		var err error
		switch flag {
		case "--uid":
			s.UID, err = strconv.Atoi(v)
		case "--gid":
			s.GID, err = strconv.Atoi(v)
		case "--root":
			s.Root = v
		case "--ro":
			s.ReadOnly = append(s.ReadOnly, v)
		case "--rw":
			s.ReadWrite = append(s.ReadWrite, v)
		case "--dev":
			s.Devices = append(s.Devices, v)
		case "--cgroup":
			s.Cgroups = append(s.Cgroups, v)
		default:
			err = errors.New("unknown flag")
		}
		if err != nil {
			return s, fmt.Errorf("%w: jailer: %s %q: %v", types.ErrInvalid, flag, v, err)
		}
	}
	return s, fmt.Errorf("%w: jailer: no VMM command after --; usage: aether-jailer --uid N --gid N --root DIR [--ro P] [--rw P] [--dev P] [--cgroup DIR] -- /abs/vmm args", types.ErrInvalid)
}
