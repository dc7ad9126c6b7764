package vmutil

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// ErrNoNetwork refuses a nat VM on a backend without networking.
var ErrNoNetwork = fmt.Errorf("%w: networking is not configured; set network.enabled (and the network section) in the worker's configuration, or create the vm with --network none", types.ErrInvalid)

// Net is the network steps both microVM backends take: attach at create,
// re-attach at start (which repairs a TAP lost since and keeps the lease),
// detach at delete, and reconcile at start-up. A nil VMNetwork is no
// networking.
type Net struct{ N network.VMNetwork }

// NewNet returns Net for n, treating a nil *network.Manager as none.
func NewNet(n network.VMNetwork) Net {
	if m, ok := n.(*network.Manager); ok && m == nil {
		n = nil
	}
	return Net{N: n}
}

// Enabled reports whether VMs can be attached.
func (n Net) Enabled() bool { return n.N != nil }

// Attach gives VM id its TAP, address and rules. It is idempotent, so the
// same call re-attaches a VM at start. Without networking it returns
// ErrNoNetwork.
func (n Net) Attach(ctx context.Context, id string) (*network.Attachment, error) {
	if n.N == nil {
		return nil, ErrNoNetwork
	}
	a, err := n.N.Attach(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("attaching vm %s to the network: %w", id, err)
	}
	return a, nil
}

// Detach removes VM id's network; idempotent, and nil without networking.
func (n Net) Detach(ctx context.Context, id string) error {
	if n.N == nil {
		return nil
	}
	if err := n.N.Detach(ctx, id); err != nil {
		return fmt.Errorf("detaching vm %s from the network: %w; its network is kept, delete the vm again to retry", id, err)
	}
	return nil
}

// Do runs fn where the TAPs are, or in place without networking.
func (n Net) Do(fn func() error) error {
	if n.N == nil {
		return fn()
	}
	return n.N.Do(fn)
}

// Reconcile removes the network of every VM not in live; nil without
// networking.
func (n Net) Reconcile(ctx context.Context, log *slog.Logger, live []string) error {
	if n.N == nil {
		return nil
	}
	cleaned, err := n.N.Reconcile(ctx, live)
	if len(cleaned) > 0 {
		log.Info("reconcile removed the network of gone vms", "cleaned", cleaned)
	}
	if err != nil {
		return fmt.Errorf("reconciling the network: %w", err)
	}
	return nil
}
