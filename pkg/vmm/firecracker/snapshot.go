package firecracker

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// Snapshot is a full snapshot of a VM: the microVM state and the guest
// memory, as host paths.
type Snapshot = vmm.Snapshot

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

// CreateSnapshot writes a full snapshot of a paused VM into its run
// directory (its jail, with the jailer), replacing an earlier one, and
// returns where. A running VM returns types.ErrConflict: pause it first, so
// that the snapshot is consistent and the caller decides when the guest
// stops.
func (o *Orchestrator) CreateSnapshot(ctx context.Context, id string) (*Snapshot, error) {
	unlock, err := o.enter(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	info, c, err := o.liveInstance(ctx, id)
	if err != nil {
		return nil, err
	}
	if info.State != InstancePaused {
		return nil, fmt.Errorf("%w: vm %s is running; pause it before taking a snapshot", types.ErrConflict, id)
	}
	p := o.cfg.paths(id)
	if err := c.CreateSnapshot(ctx, SnapshotCreateParams{
		MemFilePath:  p.vmm(snapMemName),
		SnapshotPath: p.vmm(snapStateName),
		SnapshotType: "Full",
	}); err != nil {
		return nil, fmt.Errorf("snapshotting vm %s: %w", id, err)
	}
	o.log.Info("created snapshot", "vm_id", id)
	return &Snapshot{StatePath: p.host(snapStateName), MemPath: p.host(snapMemName)}, nil
}

// LoadSnapshot restores a stopped VM from snap in a fresh Firecracker
// process, pointing its vsock at this VM's socket, and resumes it when
// resume is set (then it returns once the agent answers). The snapshot
// refers to the rootfs by the path it had when taken, so restore a VM's
// own snapshots. A running VM returns types.ErrConflict.
func (o *Orchestrator) LoadSnapshot(ctx context.Context, id string, snap Snapshot, resume bool) error {
	unlock, err := o.enter(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	if o.running(id) != nil {
		return fmt.Errorf("%w: vm %s runs; stop it before loading a snapshot", types.ErrConflict, id)
	}
	rec, err := o.readRecord(id)
	if err != nil {
		return err
	}
	p := o.cfg.paths(id)
	statePath, memPath := snap.StatePath, snap.MemPath
	if p.jailed {
		// The jailed VMM sees only its root.
		for _, f := range []struct{ src, name string }{{snap.StatePath, snapStateName}, {snap.MemPath, snapMemName}} {
			if filepath.Clean(f.src) != p.host(f.name) {
				if _, err := linkOrCopy(f.src, p.host(f.name)); err != nil {
					return fmt.Errorf("loading a snapshot into vm %s: %w", id, err)
				}
			}
		}
		statePath, memPath = p.vmm(snapStateName), p.vmm(snapMemName)
	}
	pr, c, err := o.spawn(ctx, id, p, rec)
	if err != nil {
		return err
	}
	load := func() error {
		if err := c.PutLogger(ctx, Logger{LogPath: p.vmm(logName), Level: o.cfg.LogLevel, ShowLevel: true}); err != nil {
			return err
		}
		if err := c.PutMetrics(ctx, Metrics{MetricsPath: p.vmm(metricsName)}); err != nil {
			return err
		}
		return c.LoadSnapshot(ctx, SnapshotLoadParams{
			SnapshotPath:  statePath,
			MemBackend:    &MemoryBackend{BackendType: "File", BackendPath: memPath},
			ResumeVM:      resume,
			VsockOverride: &VsockOverride{UDSPath: p.vmm(vsockSockName)},
		})
	}
	if err := load(); err != nil {
		o.kill(context.WithoutCancel(ctx), id, pr)
		return fmt.Errorf("loading a snapshot into vm %s: %w", id, err)
	}
	o.log.Info("loaded snapshot", "vm_id", id, "resumed", resume)
	if resume {
		if err := o.waitAgent(ctx, id, p, pr); err != nil {
			o.kill(context.WithoutCancel(ctx), id, pr)
			return err
		}
	}
	return o.markRunning(id)
}

// enter is the life-cycle prologue (vmutil.Enter) of the snapshot steps.
func (o *Orchestrator) enter(ctx context.Context, id string) (unlock func(), err error) {
	_, unlock, err = vmutil.Enter(ctx, &o.locks, id, o.readRecord)
	return unlock, err
}
