package network

import "context"

// VMNetwork is what a VM backend needs of the network: it gives nat VMs a
// TAP on a bridge, an address and the isolation rules. *Manager implements
// it; the qemu and firecracker backends take one.
type VMNetwork interface {
	// Attach gives vmID its TAP, address and rules, claimed for this
	// Manager's owner, and returns what the VMM and the guest need. It is idempotent: called again it returns the
	// same attachment and repairs whatever is missing. Cancelling ctx stops
	// between steps and leaves what was made for Detach or Reconcile.
	Attach(ctx context.Context, vmID string) (*Attachment, error)
	// Detach removes vmID's TAP, rules and address, whichever owner
	// attached it. It is idempotent: a VM with nothing left returns nil.
	Detach(ctx context.Context, vmID string) error
	// Reconcile removes the network of every VM not in live (what a crash
	// left half-made) among those this owner attached or nobody claimed,
	// and returns what it cleaned; VMs another owner (worker) attached on
	// the same bridge are left alone, so live needs only this owner's. It
	// goes on past failures and returns them joined.
	Reconcile(ctx context.Context, live []string) ([]string, error)
	// Do runs fn where the TAPs live (the network namespace); processes fn
	// starts inherit it. It returns fn's error.
	Do(fn func() error) error
}

var _ VMNetwork = (*Manager)(nil)
