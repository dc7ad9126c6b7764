package docker

import (
	"context"
	"fmt"

	"github.com/docker/docker/api/types/container"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// The snapshot methods are reached through vmm.AsSnapshotter. This
// backend offers pause and resume only (Capabilities).
var _ vmm.Snapshotter = (*Orchestrator)(nil)

// errNoSnapshots is what Suspend, Snapshot and a CreateVM from a snapshot
// answer: a container's memory and process state cannot be saved through
// the Engine API this backend uses (checkpoints need CRIU and the
// experimental daemon).
func errNoSnapshots(op string) error {
	return fmt.Errorf("%w: %s is not supported by the docker backend; use the qemu or firecracker backend for it", types.ErrNotSupported, op)
}

// Pause implements vmm.Snapshotter: ContainerPause freezes every process
// of the VM's container (the cgroup freezer); its memory stays. Its
// status is then types.VMPaused, and the agent cannot answer until
// Resume: ExecuteCommand and the file calls return types.ErrConflict
// ("vm is paused; resume it"), rather than wait on a frozen agent.
// Pausing a paused VM is a no-op; a VM that does not run returns
// types.ErrConflict.
func (o *Orchestrator) Pause(ctx context.Context, id string) error {
	ins, unlock, err := o.enterRunning(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	if ins.State.Paused {
		return nil
	}
	if err := o.api.ContainerPause(ctx, ins.ID); err != nil {
		return fmt.Errorf("pausing vm %s: %w", id, mapErr(err))
	}
	o.log.Info("paused vm", "vm_id", id)
	return nil
}

// Resume implements vmm.Snapshotter: ContainerUnpause thaws the
// container. Its agent connection survives the pause (a unix socket
// into a frozen process), so nothing is redialled. Resuming a running
// VM is a no-op; one that does not run returns types.ErrConflict.
func (o *Orchestrator) Resume(ctx context.Context, id string) error {
	ins, unlock, err := o.enterRunning(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	if !ins.State.Paused {
		return nil
	}
	if err := o.api.ContainerUnpause(ctx, ins.ID); err != nil {
		return fmt.Errorf("resuming vm %s: %w", id, mapErr(err))
	}
	o.log.Info("resumed vm", "vm_id", id)
	return nil
}

// Suspend implements vmm.Snapshotter: types.ErrNotSupported
// (Capabilities().Suspend is false).
func (o *Orchestrator) Suspend(context.Context, string) error {
	return errNoSnapshots("suspend")
}

// Snapshot implements vmm.Snapshotter: types.ErrNotSupported
// (Capabilities().Snapshot is false).
func (o *Orchestrator) Snapshot(context.Context, string, string) (*vmm.Snapshot, error) {
	return nil, errNoSnapshots("snapshot")
}

// enterRunning is the prologue of Pause and Resume: the VM's lock, and
// its container, which must be running (paused or not).
func (o *Orchestrator) enterRunning(ctx context.Context, id string) (container.InspectResponse, func(), error) {
	ins, unlock, err := vmutil.Enter(ctx, &o.locks, id, func(id string) (container.InspectResponse, error) { return o.inspect(ctx, id) })
	if err != nil {
		return ins, nil, err
	}
	if !ins.State.Running {
		unlock()
		return ins, nil, fmt.Errorf("%w: vm %s is %s; start it first", types.ErrConflict, id, o.mapState(ins).State)
	}
	return ins, unlock, nil
}
