package qemu

import (
	"log/slog"
	"time"

	"github.com/aetherium/aetherium-core/pkg/vmm/internal/jail"
)

// Provider is the backend's name in configuration.
const Provider = "qemu"

// Defaults for Config's zero values.
const (
	DefaultBinary = "qemu-system-x86_64"
	// DefaultVsockBinary is vhost-device-vsock, which the backend no
	// longer runs (its agent channel is virtio-serial); kept so that
	// configurations naming it still load.
	DefaultVsockBinary  = "vhost-device-vsock"
	DefaultImgBinary    = "qemu-img"
	DefaultRunDir       = "/var/lib/aetherium/qemu"
	DefaultReadyTimeout = 90 * time.Second
	DefaultStopTimeout  = 10 * time.Second
)

// Config configures the qemu backend. The zero value of every field selects
// its default, except the three image paths, which are required.
type Config struct {
	// Binary is the QEMU system emulator. Default qemu-system-x86_64 on PATH.
	Binary string `yaml:"binary"`
	// VsockBinary is ignored: the agent's channel is a virtio-serial
	// port, which needs no helper process (vhost-user-vsock, which did,
	// blocks migration and so suspend and snapshots).
	VsockBinary string `yaml:"vsock_binary"`
	// ImgBinary is qemu-img, used to make each VM's overlay. Default: on PATH.
	ImgBinary string `yaml:"img_binary"`
	// KernelPath is the guest kernel (a bzImage). Required.
	KernelPath string `yaml:"kernel_path"`
	// InitrdPath is the initramfs whose /init is fc-agent. Required.
	InitrdPath string `yaml:"initrd_path"`
	// RootfsPath is the base ext4 root file system. VMs never write to it:
	// each gets a qcow2 overlay backed by it. Required.
	RootfsPath string `yaml:"rootfs_path"`
	// RunDir holds one directory per VM. Keep it short: Unix socket paths
	// are limited to 107 bytes. Default /var/lib/aetherium/qemu.
	RunDir string `yaml:"run_dir"`
	// Accel is "auto" (KVM when the host can run stock kernels under it,
	// TCG otherwise), "kvm" or "tcg". Default auto.
	Accel string `yaml:"accel"`
	// KernelArgs are appended to the kernel command line.
	KernelArgs string `yaml:"kernel_args"`
	// MaxVCPUs is the most vCPUs one VM may ask for. Default: the host's
	// CPU count.
	MaxVCPUs int `yaml:"-"`
	// MaxMemoryMB is the most memory one VM may ask for, in MiB; a
	// larger spec is refused before anything is made. Default: the host's
	// RAM minus vmm.HostMemoryReserveMB (vmm.DefaultMaxMemoryMB).
	MaxMemoryMB int `yaml:"max_memory_mb"`
	// ReadyTimeout bounds how long StartVM waits for the agent to answer.
	// Default 90s (software emulation on a loaded host is slow).
	ReadyTimeout time.Duration `yaml:"ready_timeout"`
	// StopTimeout bounds each step of a graceful stop (agent power-off,
	// then QMP quit) before the next. Default 10s.
	StopTimeout time.Duration `yaml:"stop_timeout"`
	// Jail confines each VM's QEMU: own uid, jail,
	// seccomp, cgroup (see docs/security.md). On by default; set
	// jail.enabled to false only to debug a VMM.
	Jail jail.Config `yaml:"jail"`
	// Owner is the id of the worker that owns the VMs; ListVMs returns only
	// that owner's VMs when it is set.
	Owner string `yaml:"-"`
	// Network attaches VMs created with network nat (a *network.Manager).
	// Nil: no networking; such VMs are refused with types.ErrInvalid.
	Network Network `yaml:"-"`
	// Logger receives the backend's logs. Default slog.Default().
	Logger *slog.Logger `yaml:"-"`
}
