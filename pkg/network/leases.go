package network

import (
	"context"
	"net/netip"
	"time"
)

// Lease is one VM's address in a pool.
type Lease struct {
	// Pool is the address pool (one bridge on one host), Config.Pool.
	Pool string `json:"pool"`
	// VMID holds the address.
	VMID string `json:"vm_id"`
	// Subnet the address was taken from.
	Subnet netip.Prefix `json:"subnet"`
	// Addr is the VM's address.
	Addr netip.Addr `json:"addr"`
	// CreatedAt is when the lease was made.
	CreatedAt time.Time `json:"created_at"`
}

// LeaseRequest asks for an address for VMID in Pool.
type LeaseRequest struct {
	Pool   string
	VMID   string
	Subnet netip.Prefix
	// First and Last bound the addresses that may be handed out
	// (inclusive), both inside Subnet.
	First, Last netip.Addr
}

// LeaseStore keeps address leases where every worker sharing a pool sees
// them (pkg/storage/postgres implements it).
type LeaseStore interface {
	// AllocateLease returns the lease VMID holds in the pool, or makes one
	// on the lowest address in [First, Last] no lease of the pool holds.
	// It is idempotent, and concurrent callers, in this process or
	// others, never get the same address. A full range is
	// types.ErrUnavailable; a VM holding a lease in another pool is
	// types.ErrConflict. Cancelling ctx abandons the allocation; no lease
	// is made then.
	AllocateLease(ctx context.Context, req LeaseRequest) (Lease, error)
	// ReleaseLease returns vmID's address to its pool. Releasing a VM that
	// holds none returns nil (idempotent).
	ReleaseLease(ctx context.Context, vmID string) error
	// ListLeases returns the leases of pool, by address. An unknown pool
	// has none.
	ListLeases(ctx context.Context, pool string) ([]Lease, error)
}
