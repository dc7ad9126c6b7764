package vmm

import (
	"context"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// JailInfo says how a VM's VMM processes are confined: the uid and gid
// they run as and the VM's cgroup (see types.Confinement).
type JailInfo = types.Confinement

// Usage is what a running VM's VMM processes use on the host, read from
// the VM's cgroup.
type Usage struct {
	// CPUNanos is the CPU time used since the VM booted, in nanoseconds.
	CPUNanos uint64 `json:"cpu_ns"`
	// MemoryBytes is the host memory charged to the VM now, guest memory
	// the VMM touched included.
	MemoryBytes uint64 `json:"memory_bytes"`
}

// UsageReporter is the optional interface of backends that run each VM in
// a cgroup of its own (qemu with confinement on).
type UsageReporter interface {
	// Usage reads VM id's usage. An unknown VM returns types.ErrNotFound;
	// a VM that does not run, or runs without a cgroup (confinement off),
	// types.ErrConflict. It only reads, so it is idempotent; it does not
	// block, and ctx is checked once.
	Usage(ctx context.Context, id string) (Usage, error)
}
