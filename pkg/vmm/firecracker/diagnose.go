package firecracker

import (
	"bufio"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/jail"
)

// Check is one line of `aether-cli doctor`'s report on this backend; its
// Fix is in the terms of the troubleshooting guide.
type Check = vmm.Check

// The troubleshooting guide's symptoms that the hints refer to.
const (
	symptomNoVMs        = `"Worker can't create VMs"`
	symptomVsockTimeout = `"VSock connection timeout"`
)

// Diagnose checks, without starting anything, what this host needs to run
// Firecracker VMs with cfg: the binaries, the jailer's cgroup version,
// /dev/kvm, hardware virtualization, the guest images and the vsock socket
// directory. It never fails; each
// check says what it found.
func Diagnose(ctx context.Context, cfg Config) []vmm.Check {
	cfg.setDefaults()
	var out []Check
	add := func(name string, err error, ok, hint string) {
		if err != nil {
			out = append(out, Check{Name: name, Detail: err.Error(), Fix: hint})
			return
		}
		out = append(out, Check{Name: name, OK: true, Detail: ok})
	}

	bin, err := exec.LookPath(cfg.Binary)
	add("firecracker binary", err, bin,
		symptomNoVMs+": install Firecracker v1.16 (the release tarball's firecracker-v1.16.x-x86_64 binary) and set vmm.firecracker.binary or put it in PATH")
	if cfg.Jailer.On() {
		jb, err := exec.LookPath(cfg.Jailer.Binary)
		add("jailer binary", err, jb,
			symptomNoVMs+": install the jailer of the same Firecracker release and set vmm.firecracker.jailer.binary, or set vmm.firecracker.jailer.enabled to false")
		// The jailer writes each VM's limits (--cgroup) into the
		// configured version's hierarchy and fails the start when the
		// host does not have it; the check is the jail package's.
		v := strconv.Itoa(cfg.Jailer.CgroupVersion)
		_, err = jail.NewCgroups(jail.DefaultCgroupRoot, v, jail.DefaultCgroupParent)
		add("jailer cgroups", err, "cgroup v"+v+" with the cpu, memory and pids controllers",
			symptomNoVMs+": set vmm.firecracker.jailer.cgroup_version to the host's cgroup version (2 when /sys/fs/cgroup/cgroup.controllers exists, else 1) and make the cpu, memory and pids controllers available")
	}

	kvmErr := openKVM()
	add("/dev/kvm", kvmErr, "opens read-write",
		symptomNoVMs+": load the KVM module (modprobe kvm_intel or kvm_amd) and give the worker read-write access to /dev/kvm (root, or the kvm group)")
	hv, err := hardwareVirt()
	add("hardware virtualization", err, hv,
		symptomNoVMs+": Firecracker needs VT-x or AMD-V (vmx/svm in /proc/cpuinfo); on a cloud VM enable nested virtualization or use a bare-metal instance. Without it use vmm.provider qemu (TCG) or docker, see PLATFORM.md")

	add("kernel", checkKernel(cfg.KernelPath), cfg.KernelPath,
		symptomNoVMs+": set vmm.firecracker.kernel_path to an uncompressed ELF vmlinux (extract it from a bzImage with the kernel's scripts/extract-vmlinux); see docs/firecracker.md")
	if cfg.InitrdPath != "" {
		add("initrd", checkFile(cfg.InitrdPath), cfg.InitrdPath,
			symptomVsockTimeout+": the initramfs runs fc-agent as /init and loads the virtio and vsock modules; rebuild it (see docs/firecracker.md)")
	}
	add("rootfs", checkFile(cfg.RootfsPath), cfg.RootfsPath,
		symptomNoVMs+": set vmm.firecracker.rootfs_path to an ext4 image (mkfs.ext4 -d DIR IMG SIZE)")

	// Firecracker's vsock is hybrid: the host side is a unix socket per VM
	// in the run directory, so the host needs no vhost-vsock module; what
	// can fail is the directory and the length of the socket paths.
	add("vsock", checkSocketDir(cfg), "hybrid vsock sockets fit under "+cfg.runRoot(),
		symptomVsockTimeout+": make the socket dir writable and short (unix socket paths are limited to 107 bytes); if VMs boot but the agent never answers, the guest kernel lacks virtio_vsock/vmw_vsock_virtio_transport or fc-agent does not listen on vsock port 9999")
	return out
}

// health is what runs at every heartbeat: the cheap subset of Diagnose.
// The binaries are looked up, /dev/kvm opened and the guest image files
// stat'ed; the CPU flags, read once by New (hwErr), do not change while the
// host runs, and the kernel's ELF header is left to Diagnose (doctor).
func health(cfg Config, hwErr error) error {
	var msgs []string
	add := func(name string, err error, hint string) {
		if err != nil {
			msgs = append(msgs, fmt.Sprintf("%s: %v; fix: %s", name, err, hint))
		}
	}
	_, err := exec.LookPath(cfg.Binary)
	add("firecracker binary", err, symptomNoVMs+": install Firecracker v1.16 and set vmm.firecracker.binary or put it in PATH (see `aether-cli doctor`)")
	if cfg.Jailer.On() {
		_, err := exec.LookPath(cfg.Jailer.Binary)
		add("jailer binary", err, symptomNoVMs+": install the jailer of the same Firecracker release, or set vmm.firecracker.jailer.enabled to false")
	}
	add("/dev/kvm", openKVM(), symptomNoVMs+": load the KVM module and give the worker read-write access to /dev/kvm")
	add("hardware virtualization", hwErr, symptomNoVMs+": Firecracker needs VT-x or AMD-V; use vmm.provider qemu or docker on this host")
	add("kernel", checkFile(cfg.KernelPath), symptomNoVMs+": set vmm.firecracker.kernel_path")
	if cfg.InitrdPath != "" {
		add("initrd", checkFile(cfg.InitrdPath), symptomVsockTimeout+": rebuild the initramfs (see docs/firecracker.md)")
	}
	add("rootfs", checkFile(cfg.RootfsPath), symptomNoVMs+": set vmm.firecracker.rootfs_path")
	if len(msgs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: the firecracker backend cannot create VMs on this host:\n  %s", types.ErrUnavailable, strings.Join(msgs, "\n  "))
}

// KVMUsable reports whether this host can run Firecracker guests: /dev/kvm
// opens read-write and the CPU offers hardware virtualization (a KVM that
// lacks it, such as a PVM host's, cannot boot a stock guest). The reason
// says what is missing.
func KVMUsable() (bool, string) {
	if err := openKVM(); err != nil {
		return false, err.Error()
	}
	if _, err := hardwareVirt(); err != nil {
		return false, err.Error()
	}
	return true, ""
}

func openKVM() error {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("cannot open /dev/kvm read-write: %w", err)
	}
	return f.Close()
}

func hardwareVirt() (string, error) {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "", fmt.Errorf("cannot read /proc/cpuinfo: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(key) != "flags" {
			continue
		}
		for _, fl := range strings.Fields(val) {
			if fl == "vmx" {
				return "vmx (Intel VT-x)", nil
			}
			if fl == "svm" {
				return "svm (AMD-V)", nil
			}
		}
		return "", errors.New("the CPU flags in /proc/cpuinfo have neither vmx nor svm: KVM cannot run hardware-virtualized guests here")
	}
	return "", errors.New("/proc/cpuinfo lists no CPU flags")
}

func checkFile(path string) error {
	if path == "" {
		return errors.New("not configured")
	}
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	return nil
}

// checkKernel requires an ELF image: Firecracker on x86_64 loads an
// uncompressed vmlinux (PVH entry when it has one), not a bzImage.
func checkKernel(path string) error {
	if err := checkFile(path); err != nil {
		return err
	}
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("%s is not an ELF vmlinux (%v); a bzImage does not boot on Firecracker x86_64", path, err)
	}
	return f.Close()
}

func checkSocketDir(cfg Config) error {
	// The longest id is 64 bytes.
	longest := cfg.paths(strings.Repeat("x", 64)).host(vsockSockName)
	if len(longest) > maxSocketPathLen {
		return fmt.Errorf("socket paths such as %s reach %d bytes, over the %d a unix socket allows", longest, len(longest), maxSocketPathLen)
	}
	// The doctor creates nothing: the nearest existing directory must be
	// writable, so that the backend can create the rest.
	dir := cfg.runRoot()
	for {
		if _, err := os.Stat(dir); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			break
		}
		dir = parent
	}
	if err := unix.Access(dir, unix.W_OK|unix.X_OK); err != nil {
		return fmt.Errorf("%s is not writable: %w", dir, err)
	}
	return nil
}
