package vmm

import "context"

// JailInfo says how a VM's VMM processes are confined.
type JailInfo struct {
	// UID and GID are the unprivileged ids the VMM runs as, the VM's own.
	UID int `json:"uid"`
	GID int `json:"gid"`
	// Cgroup is the VM's cgroup as /proc/PID/cgroup names it, e.g.
	// /aetherium/<vm-id>; empty while the VM does not run.
	Cgroup string `json:"cgroup,omitempty"`
}

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
