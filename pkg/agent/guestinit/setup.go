//go:build linux

package guestinit

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/network/guestnet"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Paths of the boot contract: what the initramfs holds.
const (
	// ModulesOrder lists the kernel modules to load, one basename a line,
	// dependencies first.
	ModulesOrder = "/etc/aetherium/modules.order"
	// ModulesDir holds the modules as flat, uncompressed NAME.ko files.
	ModulesDir = "/lib/modules"
	// NewRootDir is where the root file system is mounted before the
	// init switches into it.
	NewRootDir = "/mnt/root"
)

// Environment given to the commands the agent runs.
const (
	envPath = bootparams.DefaultPath
	envHome = "/root"
	envTerm = "linux"
)

// rootWait bounds the wait for the root device: devtmpfs creates the node
// as soon as virtio_blk has probed the disk, well within this.
const rootWait = 5 * time.Second

// mountSpec is one mount of the early file systems.
type mountSpec struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
	// optional: a failure is logged, not the boot's; the guest works
	// without it, with less.
	optional bool
}

// earlyMounts are the kernel file systems every guest needs, parents
// first. /dev, /proc, /sys, /run and /tmp move into the root file system
// at the switch (their submounts move along).
var earlyMounts = []mountSpec{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", false},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", false},
	// The agent gives each command a cgroup there, to kill its whole tree
	// (agent.DefaultExecCgroupRoot).
	{source: "cgroup2", target: "/sys/fs/cgroup", fstype: "cgroup2", flags: unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, optional: true},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755", false},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "gid=5,mode=620,ptmxmode=666", false},
	{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", false},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755", false},
	{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", false},
}

// movedMounts are the mounts carried into the root file system.
var movedMounts = []string{"/dev", "/proc", "/sys", "/run", "/tmp"}

// Setup prepares the guest for the agent: it mounts the kernel file
// systems, loads the kernel modules of ModulesOrder, mounts the root file
// system and switches into it (unless cfg.Root is empty), mounts the tool
// disks under cfg.ToolsRoot, sets the hostname, brings loopback up,
// configures the network from cfg.Net and sets the environment of the
// agent (types.ToolsRootEnv) and its commands. Each
// step is logged with its duration.
//
// Every step checks before it acts, so Setup may run again. It runs only
// as PID 1: anywhere else it would remount the machine's /dev, /proc and
// /tmp. Cancelling ctx stops the wait for the root device.
//
// Modules the boot does not need (Config.moduleUse) are not loaded but
// returned open, for LoadDeferred once the agent serves; modules of
// devices the VM cannot have are not loaded at all. afterModules, if
// not nil, runs once the boot modules are loaded, before the root switch:
// the agent listens there, so the host's connection overlaps the rest of
// the boot (connections wait in the backlog until the agent serves).
func Setup(ctx context.Context, cfg Config, log *slog.Logger, afterModules func() error) (deferred []*os.File, err error) {
	if os.Getpid() != 1 {
		return nil, fmt.Errorf("%w: guest init setup runs only as PID 1 (the guest's init), not as pid %d", types.ErrInvalid, os.Getpid())
	}
	if err := mountEarly(log); err != nil {
		return nil, err
	}
	later, err := loadModules(ModulesOrder, ModulesDir, log, cfg.moduleUse)
	if err != nil {
		return nil, err
	}
	deferred = openLater(ModulesDir, later, log)
	defer func() {
		if err != nil {
			for _, f := range deferred {
				f.Close()
			}
			deferred = nil
		}
	}()
	if afterModules != nil {
		if err := afterModules(); err != nil {
			return nil, err
		}
	}
	if cfg.Root == "" {
		log.Info("no root= on the kernel command line; staying in the initramfs")
	} else {
		if err := mountRoot(ctx, cfg, NewRootDir, log); err != nil {
			return nil, err
		}
		if err := switchRoot(NewRootDir, log); err != nil {
			return nil, err
		}
	}
	if cfg.ToolsRoot != "" {
		// In the final root, so the mounts are where commands look; before
		// the agent serves, so its tool registry sees them.
		mountToolDisks(ctx, cfg.ToolsRoot, log)
	}
	setHostname(cfg.Hostname, log)
	if err := loopbackUp(log); err != nil {
		return nil, err
	}
	// After the switch, so resolv.conf lands in the root disk's /etc, and
	// after the modules, which include virtio_net.
	setupNetwork(cfg.Net, log)
	// The agent learns the tools root as a container's agent does, from
	// types.ToolsRootEnv.
	for k, v := range map[string]string{"PATH": envPath, "HOME": envHome, "TERM": envTerm, types.ToolsRootEnv: cfg.ToolsRoot} {
		if err := os.Setenv(k, v); err != nil {
			return nil, fmt.Errorf("setting %s for commands: %w", k, err)
		}
	}
	return deferred, nil
}

// LoadDeferred loads the modules Setup deferred and closes them. Failures
// are logged: the agent already serves.
func LoadDeferred(files []*os.File, log *slog.Logger) { loadLater(files, log) }

// mountEarly mounts earlyMounts, skipping those already mounted.
func mountEarly(log *slog.Logger) error {
	for _, m := range earlyMounts {
		if err := mountOnce(m, log); err != nil {
			return err
		}
	}
	return nil
}

// mountOnce mounts m unless its target is a mount point already.
func mountOnce(m mountSpec, log *slog.Logger) error {
	if isMountPoint(m.target) {
		log.Debug("already mounted", "target", m.target)
		return nil
	}
	start := time.Now()
	err := os.MkdirAll(m.target, 0o755)
	if err == nil {
		err = unix.Mount(m.source, m.target, m.fstype, m.flags, m.data)
	} else {
		err = fmt.Errorf("creating mount point %s: %w", m.target, err)
	}
	if err != nil && !errors.Is(err, unix.EBUSY) && m.optional {
		log.Warn("not mounted; the guest goes on without it", "fstype", m.fstype, "target", m.target, "err", err)
		return nil
	}
	if err != nil && !errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("mounting %s on %s: %w; the guest kernel needs %s support", m.fstype, m.target, err, m.fstype)
	}
	log.Info("mounted", "fstype", m.fstype, "target", m.target, "took", time.Since(start))
	return nil
}

// isMountPoint reports whether path is the root of a mount other than the
// one holding its parent directory. It needs no /proc, so it works before
// /proc is mounted; it misses bind mounts within one file system, which the
// init does not make.
func isMountPoint(path string) bool {
	var st, parent unix.Stat_t
	if unix.Lstat(path, &st) != nil || unix.Lstat(filepath.Join(path, ".."), &parent) != nil {
		return false
	}
	return st.Dev != parent.Dev
}

// loadModules loads the modules listed in the file order from dir, in
// order. A missing order file means no modules; a module built into the
// kernel or already loaded is fine.
//
// Modules use puts off (loadDeferred) are not loaded but returned, in order,
// for loadLater: the boot does not wait for what it does not need. Those it
// skips are not loaded at all; nil use loads every module now.
func loadModules(order, dir string, log *slog.Logger, use func(name string) moduleUse) (deferred []string, err error) {
	names, err := readModulesOrder(order)
	if errors.Is(err, os.ErrNotExist) {
		log.Info("no module list; loading no modules", "path", order)
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	for _, name := range names {
		u := loadNow
		if use != nil {
			u = use(name)
		}
		switch u {
		case loadDeferred:
			deferred = append(deferred, name)
			continue
		case skipModule:
			log.Debug("module not loaded: its device is not in this vm", "module", name)
			continue
		}
		if err := loadModule(filepath.Join(dir, name+".ko"), log); err != nil {
			return nil, err
		}
	}
	return deferred, nil
}

// bootModules are what the boot itself needs: the virtio-mmio bus and the
// root disk. The agent's transport and the network driver join them as
// the VM's configuration says (Config.moduleUse).
var bootModules = map[string]bool{"virtio_ring": true, "virtio": true, "virtio_mmio": true, "virtio_blk": true}

var netModules = map[string]bool{"failover": true, "net_failover": true, "virtio_net": true}

// serialModules are the agent's transport when it listens on a
// virtio-serial port (serial://, the qemu backend).
var serialModules = map[string]bool{"virtio_console": true}

// vsockModules are the agent's transport when it listens on vsock (the
// firecracker backend).
var vsockModules = map[string]bool{"vsock": true, "vmw_vsock_virtio_transport_common": true, "vmw_vsock_virtio_transport": true}

// moduleUse is what the boot does with a kernel module.
type moduleUse int

const (
	loadNow      moduleUse = iota // before the agent listens
	loadDeferred                  // once the agent serves (LoadDeferred)
	skipModule                    // never: its device cannot be in this VM
)

// moduleUse says when module name is loaded. The modules of the agent's
// transport and, with aetherium.net, of the network are loaded at boot.
// Those of the other transport are skipped, and so is the network's on a
// serial agent (the qemu backend) without aetherium.net: neither backend
// hot-plugs devices, so the device they drive never appears, and loading
// them (tens of milliseconds under TCG) would compete for the guest's vCPU
// with the host's first requests. A vsock agent (firecracker) without
// aetherium.net may still have a NIC its caller configures itself
// (firecracker.Options.TAPDevice alone), so its network driver loads once
// the agent serves, as do modules this code does not know.
func (c Config) moduleUse(name string) moduleUse {
	serial := strings.HasPrefix(c.Listen, "serial://")
	switch {
	case bootModules[name]:
		return loadNow
	case serialModules[name]:
		return pick(serial, loadNow, skipModule)
	case vsockModules[name]:
		return pick(serial, skipModule, loadNow)
	case netModules[name] && c.Net != "":
		return loadNow
	case netModules[name]:
		return pick(serial, skipModule, loadDeferred)
	}
	return loadDeferred
}

func pick(cond bool, yes, no moduleUse) moduleUse {
	if cond {
		return yes
	}
	return no
}

// openLater opens the deferred modules while the initramfs still holds
// them: the switch to the root disk deletes its files, but an open file
// stays readable until closed.
func openLater(dir string, names []string, log *slog.Logger) []*os.File {
	var files []*os.File
	for _, name := range names {
		f, err := os.Open(filepath.Join(dir, name+".ko"))
		if err != nil {
			log.Warn("cannot open deferred module", "module", name, "err", err)
			continue
		}
		files = append(files, f)
	}
	return files
}

// loadLater loads and closes the modules openLater kept. Failures are
// logged: the agent already serves.
func loadLater(files []*os.File, log *slog.Logger) {
	for _, f := range files {
		start := time.Now()
		err := unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		switch {
		case err == nil, errors.Is(err, unix.EEXIST):
			log.Info("loaded deferred module", "module", f.Name(), "took", time.Since(start))
		default:
			log.Warn("cannot load deferred module", "module", f.Name(), "err", err)
		}
	}
}

// readModulesOrder reads the module basenames of a modules.order file:
// one a line, blank lines and #-comments skipped, a ".ko" suffix allowed.
func readModulesOrder(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading the module list: %w", err)
	}
	defer f.Close()
	var names []string
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name := strings.TrimSuffix(line, ".ko")
		if strings.ContainsAny(name, "/ \t") || name == "." || name == ".." {
			return nil, fmt.Errorf("%s line %d: %q is not a module basename: %w", path, n, line, types.ErrInvalid)
		}
		names = append(names, name)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading the module list %s: %w", path, err)
	}
	return names, nil
}

// loadModule loads one module file with finit_module(2).
func loadModule(path string, log *slog.Logger) error {
	start := time.Now()
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("loading kernel module %s: %w; the initramfs must hold every module in %s", path, err, ModulesOrder)
	}
	defer f.Close()
	err = unix.FinitModule(int(f.Fd()), "", 0)
	switch {
	case errors.Is(err, unix.EEXIST):
		log.Info("module already loaded", "module", path, "took", time.Since(start))
	case err != nil:
		return fmt.Errorf("loading kernel module %s: %w; is it built for this kernel, and are its dependencies listed before it in %s?",
			path, err, ModulesOrder)
	default:
		log.Info("loaded module", "module", path, "took", time.Since(start))
	}
	return nil
}

// mountRoot waits for cfg.Root when it is a device node or names a disk by
// its serial (root=SERIAL=...), then mounts it at dir unless something is
// mounted there already.
func mountRoot(ctx context.Context, cfg Config, dir string, log *slog.Logger) error {
	if isMountPoint(dir) {
		log.Info("root file system already mounted", "target", dir)
		return nil
	}
	source := cfg.Root
	if serial, ok := bootparams.RootSerial(cfg.Root); ok {
		node, err := waitForSerial(ctx, sysfsRoot, devRoot, serial, rootWait, log)
		if err != nil {
			return err
		}
		source = node
	} else if strings.HasPrefix(cfg.Root, "/dev/") {
		if err := waitForDevice(ctx, cfg.Root, rootWait, log); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating root mount point %s: %w", dir, err)
	}
	flags, data := splitMountOptions(cfg.RootFlags)
	if cfg.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	fstype := cmp.Or(cfg.RootFSType, DefaultRootFSType)
	start := time.Now()
	if err := unix.Mount(source, dir, fstype, flags, data); err != nil {
		return fmt.Errorf("mounting the root file system %s (%s, options %q) on %s: %w; check root=, rootfstype= and rootflags= on the kernel command line",
			source, fstype, cfg.RootFlags, dir, err)
	}
	log.Info("mounted root file system", "source", source, "fstype", fstype, "ro", cfg.ReadOnly, "took", time.Since(start))
	return nil
}

// waitForDevice polls for the device node path.
func waitForDevice(ctx context.Context, path string, limit time.Duration, log *slog.Logger) error {
	start := time.Now()
	found, _ := pollFor(ctx, limit, func() (bool, error) {
		_, err := os.Stat(path)
		return err == nil, nil
	})
	if !found {
		return fmt.Errorf("root device %s did not appear within %s: %w; attach the disk as virtio-blk and list virtio_blk in %s",
			path, limit, types.ErrUnavailable, ModulesOrder)
	}
	log.Info("root device appeared", "device", path, "waited", time.Since(start))
	return nil
}

// mountFlagOptions are the generic mount options that are flags to
// mount(2) rather than file system data.
var mountFlagOptions = map[string]uintptr{
	"ro":         unix.MS_RDONLY,
	"nosuid":     unix.MS_NOSUID,
	"nodev":      unix.MS_NODEV,
	"noexec":     unix.MS_NOEXEC,
	"sync":       unix.MS_SYNCHRONOUS,
	"dirsync":    unix.MS_DIRSYNC,
	"noatime":    unix.MS_NOATIME,
	"nodiratime": unix.MS_NODIRATIME,
	"relatime":   unix.MS_RELATIME,
	"lazytime":   unix.MS_LAZYTIME,
}

// splitMountOptions separates comma-separated mount options into mount(2)
// flags and the file-system-specific rest.
func splitMountOptions(opts string) (flags uintptr, data string) {
	var rest []string
	for _, o := range strings.Split(opts, ",") {
		switch f, ok := mountFlagOptions[o]; {
		case o == "" || o == "rw":
		case ok:
			flags |= f
		default:
			rest = append(rest, o)
		}
	}
	return flags, strings.Join(rest, ",")
}

// switchRoot makes newRoot the root file system, as busybox's switch_root
// does: it moves the kernel file systems under newRoot, frees the
// initramfs, moves newRoot onto / and chroots into it. The process keeps
// running from memory.
func switchRoot(newRoot string, log *slog.Logger) error {
	start := time.Now()
	for _, m := range movedMounts {
		if !isMountPoint(m) {
			continue
		}
		target := newRoot + m
		if err := os.MkdirAll(target, 0o755); err != nil {
			return fmt.Errorf("creating %s in the root file system: %w; create it in the image or boot with rw", m, err)
		}
		if err := unix.Mount(m, target, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("moving %s to %s: %w", m, target, err)
		}
	}
	freed := freeInitramfs(newRoot, log)
	if err := unix.Chdir(newRoot); err != nil {
		return fmt.Errorf("entering the root file system %s: %w", newRoot, err)
	}
	if err := unix.Mount(newRoot, "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("moving the root file system %s onto /: %w", newRoot, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("changing root into %s: %w", newRoot, err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("entering / of the new root: %w", err)
	}
	log.Info("switched to the root file system", "freed_initramfs_files", freed, "took", time.Since(start))
	return nil
}

// freeInitramfs deletes the initramfs's files, which would otherwise hold
// memory for as long as the guest runs. Like switch_root it only deletes
// when / is the initramfs (ramfs or tmpfs) and stays on its device, so the
// root file system mounted at newRoot is never touched. It returns how
// many entries it deleted.
func freeInitramfs(newRoot string, log *slog.Logger) int {
	var fs unix.Statfs_t
	if err := unix.Statfs("/", &fs); err != nil || (fs.Type != unix.RAMFS_MAGIC && fs.Type != unix.TMPFS_MAGIC) {
		return 0
	}
	var root, nr unix.Stat_t
	if unix.Lstat("/", &root) != nil || unix.Lstat(newRoot, &nr) != nil || root.Dev == nr.Dev {
		log.Warn("not freeing the initramfs: cannot tell it from the root file system", "root", newRoot)
		return 0
	}
	return deleteContents("/", root.Dev)
}

// deleteContents deletes what is in dir on device dev, best effort, and
// returns how many entries it deleted.
func deleteContents(dir string, dev uint64) int {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		var st unix.Stat_t
		if unix.Lstat(p, &st) != nil || st.Dev != dev {
			continue // a mount point: another file system
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			n += deleteContents(p, dev)
			if unix.Rmdir(p) == nil {
				n++
			}
			continue
		}
		if unix.Unlink(p) == nil {
			n++
		}
	}
	return n
}

// setHostname sets the hostname, falling back to DefaultHostname when name
// is not a valid one.
func setHostname(name string, log *slog.Logger) {
	name = cmp.Or(name, DefaultHostname)
	if err := ValidHostname(name); err != nil {
		log.Warn("invalid hostname; using the default", "hostname", name, "default", DefaultHostname, "err", err)
		name = DefaultHostname
	}
	if err := unix.Sethostname([]byte(name)); err != nil {
		log.Warn("cannot set the hostname", "hostname", name, "err", err)
		return
	}
	log.Info("set hostname", "hostname", name)
}

// loopbackUp brings lo up; the kernel then gives it 127.0.0.1 and ::1.
// It uses the SIOCGIFFLAGS/SIOCSIFFLAGS ioctls rather than the netlink
// library: under software emulation the library's link dump and parsing
// cost about 30 ms of every boot, the two ioctls well under one.
func loopbackUp(log *slog.Logger) error {
	start := time.Now()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("bringing loopback up: socket: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return fmt.Errorf("bringing loopback up: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("finding the loopback interface: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("bringing loopback up: %w", err)
	}
	log.Info("loopback up", "took", time.Since(start))
	return nil
}

// setupNetwork configures the interface the host described in
// aetherium.net. A failure is logged loudly but does not stop the boot: the
// agent still starts, so the host can look into the guest over vsock.
func setupNetwork(value string, log *slog.Logger) {
	if value == "" {
		log.Info("no aetherium.net on the kernel command line; no network beyond loopback")
		return
	}
	start := time.Now()
	c, err := guestnet.Parse(value)
	if err == nil {
		err = guestnet.Apply(c)
	}
	if err != nil {
		log.Error("NETWORK SETUP FAILED; the guest has no network (the agent starts anyway)", "aetherium.net", value, "err", err)
		return
	}
	log.Info("network configured", "config", c.String(), "took", time.Since(start))
}
