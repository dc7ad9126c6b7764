package vmm

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// HostMemoryReserveMB is what the default per-VM memory maximum leaves to
// the host (the worker, the VMM processes, the page cache): one VM may
// ask for at most the host's RAM minus this.
const HostMemoryReserveMB = 1024

// DefaultMaxMemoryMB is the default of each backend's max_memory_mb: the
// host's total RAM minus HostMemoryReserveMB, and never below
// types.MinMemoryMB so a small host can still run the smallest VM. A
// larger VM could never be backed by this host's RAM; an operator who
// overcommits on purpose raises the key.
func DefaultMaxMemoryMB() int {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		// Linux always answers sysinfo; keep a working limit anyway.
		return 4096
	}
	total := int(uint64(si.Totalram) * uint64(si.Unit) >> 20)
	return max(total-HostMemoryReserveMB, types.MinMemoryMB)
}

// CheckMaxMemory refuses a spec asking for more memory than maxMB, the
// backend's max_memory_mb; key names that setting (e.g.
// "vmm.qemu.max_memory_mb") so the message says how to change it. maxMB
// 0 means no limit.
func CheckMaxMemory(spec types.VMSpec, maxMB int, key string) error {
	if maxMB > 0 && spec.MemoryMB > maxMB {
		return fmt.Errorf("%w: memory is %d MiB but this worker allows at most %d MiB per VM; ask for %d or less, or raise %s", types.ErrInvalid, spec.MemoryMB, maxMB, maxMB, key)
	}
	return nil
}
