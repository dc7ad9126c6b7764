package firecracker

import (
	"context"
	"fmt"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// The snapshot methods are reached through vmm.AsSnapshotter.
var _ vmm.Snapshotter = (*Orchestrator)(nil)

// Pause pauses a running VM (PATCH /vm Paused). Pausing a paused VM is a
// no-op. A VM that does not run returns types.ErrConflict.
func (o *Orchestrator) Pause(ctx context.Context, id string) error {
	return o.setPaused(ctx, id, true)
}

// Resume resumes a paused VM (PATCH /vm Resumed). Resuming a running VM is
// a no-op.
func (o *Orchestrator) Resume(ctx context.Context, id string) error {
	return o.setPaused(ctx, id, false)
}

func (o *Orchestrator) setPaused(ctx context.Context, id string, pause bool) error {
	unlock, err := o.enter(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	info, c, err := o.liveInstance(ctx, id)
	if err != nil {
		return err
	}
	want, state, verb := InstanceRunning, "Resumed", "resuming"
	if pause {
		want, state, verb = InstancePaused, "Paused", "pausing"
	}
	if info.State == want {
		return nil
	}
	if err := c.PatchVM(ctx, state); err != nil {
		return fmt.Errorf("%s vm %s: %w", verb, id, err)
	}
	o.log.Info(verb+" vm", "vm_id", id)
	return nil
}

// liveInstance returns the API state of a VM whose VMM runs a started
// guest, or types.ErrConflict.
func (o *Orchestrator) liveInstance(ctx context.Context, id string) (*InstanceInfo, *Client, error) {
	if _, err := o.readRecord(id); err != nil {
		return nil, nil, err
	}
	if o.running(id) == nil {
		return nil, nil, fmt.Errorf("%w: vm %s is stopped; start it first", types.ErrConflict, id)
	}
	c := NewClient(o.cfg.paths(id).host(apiSockName))
	info, err := c.Describe(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("vm %s: %w", id, err)
	}
	if info.State == InstanceNotStarted {
		return nil, nil, fmt.Errorf("%w: vm %s: %s; start it first", types.ErrConflict, id, detailStarting)
	}
	return info, c, nil
}

// Suspend is not built yet for this backend (issue 12, next commits):
// Capabilities().Suspend is false and it returns types.ErrNotSupported.
func (o *Orchestrator) Suspend(ctx context.Context, id string) error {
	return fmt.Errorf("%w: suspend is not supported by the firecracker backend yet", types.ErrNotSupported)
}

// Snapshot is not built yet for this backend (issue 12, next commits):
// Capabilities().Snapshot is false and it returns types.ErrNotSupported.
func (o *Orchestrator) Snapshot(ctx context.Context, id, dir string) (*vmm.Snapshot, error) {
	return nil, fmt.Errorf("%w: snapshots are not supported by the firecracker backend yet", types.ErrNotSupported)
}

// enter is the life-cycle prologue (vmutil.Enter) of the snapshot steps.
func (o *Orchestrator) enter(ctx context.Context, id string) (unlock func(), err error) {
	_, unlock, err = vmutil.Enter(ctx, &o.locks, id, o.readRecord)
	return unlock, err
}
