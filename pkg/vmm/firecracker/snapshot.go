package firecracker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// The snapshot methods are reached through vmm.AsSnapshotter.
var _ vmm.Snapshotter = (*Orchestrator)(nil)

// Names of the saved state in a VM's root (its jail, with the jailer).
// Firecracker writes a snapshot to a new path (".part") that is renamed
// once complete: a VM restored from a memory file maps it privately, and
// writing a new snapshot over that same inode would change the memory of
// the running guest under it.
const (
	suspendStateName = "suspend.state"
	suspendMemName   = "suspend.mem"
	partSuffix       = ".part"
)

// Pause implements vmm.Snapshotter: PATCH /vm Paused. Pausing a paused VM
// is a no-op; a stopped or suspended VM returns types.ErrConflict.
func (o *Orchestrator) Pause(ctx context.Context, id string) error {
	rec, unlock, err := vmutil.Enter(ctx, &o.locks, id, o.readRecord)
	if err != nil {
		return err
	}
	defer unlock()
	info, c, err := o.liveInstance(ctx, rec)
	if err != nil {
		return err
	}
	if info.State == InstancePaused {
		return nil
	}
	defer o.timed("pause", id)()
	if err := c.PatchVM(ctx, "Paused"); err != nil {
		return fmt.Errorf("pausing vm %s: %w", id, err)
	}
	return nil
}

// Resume implements vmm.Snapshotter. A paused VM is resumed with PATCH
// /vm Resumed. A suspended VM is restored in a fresh Firecracker process
// (PUT /snapshot/load of its saved state, memory file-backed) and, once
// its agent answers on a new connection, its guest clock is stepped; the
// saved files then go. Resuming a running VM is a no-op; a stopped one
// returns types.ErrConflict. If ctx ends during a restore, the new VMM is
// killed and the VM stays suspended, its files intact.
func (o *Orchestrator) Resume(ctx context.Context, id string) error {
	rec, unlock, err := vmutil.Enter(ctx, &o.locks, id, o.readRecord)
	if err != nil {
		return err
	}
	defer unlock()
	if o.running(id) == nil && rec.Suspended {
		defer o.timed("resume (restore)", id)()
		return o.restore(ctx, rec, restoreSuspended)
	}
	info, c, err := o.liveInstance(ctx, rec)
	if err != nil {
		return err
	}
	if info.State == InstancePaused {
		defer o.timed("resume", id)()
		if err := c.PatchVM(ctx, "Resumed"); err != nil {
			return fmt.Errorf("resuming vm %s: %w", id, err)
		}
	}
	if rec.Suspended {
		// A suspend cut short after its files were complete but before
		// its VMM ended: the VMM goes on, the saved state is dropped.
		return o.dropSuspended(rec)
	}
	return nil
}

// Suspend implements vmm.Snapshotter: the VM is paused, a full snapshot
// (PUT /snapshot/create) is written into its own root, its record says
// suspended and its VMM is killed, which frees its memory. Its network
// (TAP, address, rules) stays for the resume. Suspending a suspended VM
// is a no-op; a stopped one returns types.ErrConflict. If the snapshot
// fails, a VM that was running is resumed and the error returned.
func (o *Orchestrator) Suspend(ctx context.Context, id string) error {
	rec, unlock, err := vmutil.Enter(ctx, &o.locks, id, o.readRecord)
	if err != nil {
		return err
	}
	defer unlock()
	if o.running(id) == nil && rec.Suspended {
		return nil
	}
	info, c, err := o.liveInstance(ctx, rec)
	if err != nil {
		return err
	}
	defer o.timed("suspend", id)()
	p := o.cfg.paths(id)
	err = o.snapshotPaused(ctx, id, c, info.State == InstanceRunning, p, suspendStateName, suspendMemName)
	if err != nil {
		return fmt.Errorf("suspending vm %s: %w", id, err)
	}
	rec.Suspended = true
	if err := o.writeRecord(rec); err != nil {
		return fmt.Errorf("suspending vm %s: %w", id, err)
	}
	// Asked for: the exit that follows is no crash. The guest's state is
	// saved, so the VMM is killed rather than shut down (a guest shutdown
	// would be a different machine to resume).
	os.Remove(filepath.Join(p.run, runningMarker))
	if pr := o.running(id); pr != nil {
		o.kill(ctx, id, pr)
	}
	o.cleanupRun(id)
	return nil
}

// Snapshot implements vmm.Snapshotter. dir must be an absolute path to
// an empty directory (types.ErrInvalid otherwise). The VM is paused (if it
// runs), snapshotted (PUT /snapshot/create) into its own root, and the
// state and memory files are moved into dir (a rename, a copy only across
// file systems); its rootfs is copied while the guest is paused (a reflink
// where the file system shares blocks copy-on-write, otherwise a sparse
// copy whose cost is the disk's allocated size: a hard link would not do,
// as the VM goes on writing the same inode). Then a VM that ran is
// resumed. dir ends with snapshot.json (the source spec and the files).
// The files belong to the orchestrator's user, read-only: a jailed
// clone reads them through a hard link in its own chroot, and no other
// jail can reach them.
//
// Firecracker resets the vsock device when it takes a snapshot (open
// connections are closed, guest listeners stay): the VM's cached agent
// connection is dropped and the next call dials anew.
func (o *Orchestrator) Snapshot(ctx context.Context, id, dir string) (*vmm.Snapshot, error) {
	if err := checkSnapshotDir(dir); err != nil {
		return nil, err
	}
	rec, unlock, err := vmutil.Enter(ctx, &o.locks, id, o.readRecord)
	if err != nil {
		return nil, err
	}
	defer unlock()
	info, c, err := o.liveInstance(ctx, rec)
	if err != nil {
		return nil, err
	}
	defer o.timed("snapshot", id)()
	p := o.cfg.paths(id)
	wasRunning := info.State == InstanceRunning
	if err := o.snapshotPaused(ctx, id, c, wasRunning, p, snapStateName, snapMemName); err != nil {
		return nil, fmt.Errorf("snapshotting vm %s: %w", id, err)
	}
	snap, err := o.collectSnapshot(rec, p, dir)
	if wasRunning {
		// Whatever collectSnapshot did, the VM is left as it was.
		if rerr := c.PatchVM(context.WithoutCancel(ctx), "Resumed"); rerr != nil {
			err = errors.Join(err, fmt.Errorf("resuming vm %s after its snapshot: %w", id, rerr))
		}
	}
	if err != nil {
		clearDir(dir)
		return nil, fmt.Errorf("snapshotting vm %s: %w", id, err)
	}
	o.log.Info("snapshot taken", "vm_id", id, "dir", dir, "size_bytes", snap.SizeBytes)
	return snap, nil
}

// snapshotPaused pauses the VM when it runs and writes a full snapshot
// into its root under stateName and memName (through ".part" names). It
// is left paused on success; on failure a VM that was running is resumed. The cached agent client is dropped:
// Firecracker reset the vsock device.
func (o *Orchestrator) snapshotPaused(ctx context.Context, id string, c *Client, running bool, p paths, stateName, memName string) (err error) {
	if running {
		if err := c.PatchVM(ctx, "Paused"); err != nil {
			return err
		}
		defer func() {
			if err != nil {
				if rerr := c.PatchVM(context.WithoutCancel(ctx), "Resumed"); rerr != nil {
					err = errors.Join(err, fmt.Errorf("resuming it again: %w", rerr))
				}
			}
		}()
	}
	for _, n := range []string{stateName, memName} {
		os.Remove(p.host(n + partSuffix))
	}
	if err := c.CreateSnapshot(ctx, SnapshotCreateParams{
		MemFilePath:  p.vmm(memName + partSuffix),
		SnapshotPath: p.vmm(stateName + partSuffix),
		SnapshotType: "Full",
	}); err != nil {
		return err
	}
	o.clients.Drop(id)
	for _, n := range []string{stateName, memName} {
		if err := os.Rename(p.host(n+partSuffix), p.host(n)); err != nil {
			return err
		}
	}
	return nil
}

// restoreKind says what a restore starts from.
type restoreKind int

const (
	// restoreSuspended restores a VM's own saved state (Suspend).
	restoreSuspended restoreKind = iota
	// restoreClone restores a new VM from a snapshot.
	restoreClone
)

// restore starts a VM from saved state in a fresh Firecracker process:
// PUT /snapshot/load with a file memory backend (the VM's own vsock
// socket and TAP as overrides), the drives moved to the VM's own files
// if the state names others (PATCH /drives, then PATCH /vm Resumed),
// then it waits for the agent on a fresh connection (the vsock device
// was reset) and gives the guest its clock (vmutil.SyncClock) or, a
// clone, its own identity (vmutil.Reidentify). Any failure kills
// the new VMM and leaves the saved state as it was. The lock is held.
func (o *Orchestrator) restore(ctx context.Context, rec *record, kind restoreKind) error {
	id := rec.ID
	p := o.cfg.paths(id)
	stateName, memName := suspendStateName, suspendMemName
	var patches []PartialDrive
	if kind == restoreClone {
		stateName, memName = cloneStateName, cloneMemName
		for driveID, was := range rec.Clone.Drives {
			if own := o.drivePath(p, rec, driveID); own != "" && own != was {
				patches = append(patches, PartialDrive{DriveID: driveID, PathOnHost: own})
			}
		}
	}
	for _, n := range []string{stateName, memName} {
		if _, err := os.Stat(p.host(n)); err != nil {
			return fmt.Errorf("restoring vm %s: its saved state is missing (%v); delete the vm", id, err)
		}
	}
	if kind == restoreClone && !p.jailed {
		// Firecracker re-opens each drive at its snapshotted path before
		// PATCH /drives moves it; without a jail that path is the source
		// VM's own file. It is opened, never written: the guest is paused
		// until the drive is moved.
		for driveID, was := range rec.Clone.Drives {
			if _, err := os.Stat(was); err != nil {
				return fmt.Errorf("%w: restoring vm %s: Firecracker re-opens drive %s of the snapshot's source at %s on load, and it is gone (%v); without the jailer a snapshot's clones need its source vm to exist: enable vmm.firecracker.jailer, or keep the source vm",
					types.ErrConflict, id, driveID, was, err)
			}
		}
	}
	att, err := o.repairNet(ctx, rec)
	if err != nil {
		return err
	}
	pr, c, err := o.spawn(ctx, id, p, rec)
	if err != nil {
		return err
	}
	load := SnapshotLoadParams{
		SnapshotPath:  p.vmm(stateName),
		MemBackend:    &MemoryBackend{BackendType: "File", BackendPath: p.vmm(memName)},
		ResumeVM:      len(patches) == 0,
		VsockOverride: &VsockOverride{UDSPath: p.vmm(vsockSockName)},
	}
	if rec.Options.TAPDevice != "" {
		load.NetworkOverrides = []NetworkOverride{{IfaceID: ifaceID, HostDevName: rec.Options.TAPDevice}}
	}
	steps := []struct {
		what string
		do   func() error
	}{
		{"configuring the logger", func() error {
			return c.PutLogger(ctx, Logger{LogPath: p.vmm(logName), Level: o.cfg.LogLevel, ShowLevel: true})
		}},
		{"configuring metrics", func() error { return c.PutMetrics(ctx, Metrics{MetricsPath: p.vmm(metricsName)}) }},
		{"loading the snapshot", func() error { return c.LoadSnapshot(ctx, load) }},
		{"moving the drives to the vm's own files", func() error {
			for _, d := range patches {
				if err := c.PatchDrive(ctx, d); err != nil {
					return err
				}
			}
			if len(patches) > 0 {
				return c.PatchVM(ctx, "Resumed")
			}
			return nil
		}},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			o.kill(context.WithoutCancel(ctx), id, pr)
			return fmt.Errorf("restoring vm %s: %s: %w", id, s.what, err)
		}
	}
	// Connections of before the snapshot are gone; listeners in the guest
	// survive, so a new dial reaches the agent.
	o.clients.Drop(id)
	if err := o.waitAgent(ctx, id, p, pr); err != nil {
		o.kill(context.WithoutCancel(ctx), id, pr)
		return err
	}
	ac, err := o.client(id)
	if err == nil {
		if kind == restoreClone {
			err = o.reidentify(ctx, rec, ac, att)
		} else {
			// The clock stood still while the VM was suspended.
			err = vmutil.SyncClock(ctx, ac)
		}
	}
	if err != nil {
		o.kill(context.WithoutCancel(ctx), id, pr)
		return fmt.Errorf("restoring vm %s: %w", id, err)
	}
	if err := o.markRunning(id); err != nil {
		return err
	}
	o.log.Info("restored vm", "vm_id", id, "pid", pr.Pid(), "from", map[restoreKind]string{restoreSuspended: "suspend", restoreClone: "snapshot"}[kind])
	if kind == restoreClone {
		rec.Clone.Restored = true
		return o.writeRecord(rec)
	}
	return o.dropSuspended(rec)
}

// dropSuspended clears the record's suspended mark and removes the saved
// files. A VMM restored from them maps the memory file privately, so
// unlinking it is safe: the inode lives until that VMM ends.
func (o *Orchestrator) dropSuspended(rec *record) error {
	rec.Suspended = false
	if err := o.writeRecord(rec); err != nil {
		return fmt.Errorf("vm %s: %w", rec.ID, err)
	}
	p := o.cfg.paths(rec.ID)
	for _, n := range []string{suspendStateName, suspendMemName} {
		os.Remove(p.host(n))
	}
	return nil
}

// liveInstance returns the API state of a VM whose VMM runs a started
// guest, or types.ErrConflict saying what to do first.
func (o *Orchestrator) liveInstance(ctx context.Context, rec *record) (*InstanceInfo, *Client, error) {
	id := rec.ID
	if o.running(id) == nil {
		if rec.Suspended {
			return nil, nil, fmt.Errorf("%w: vm %s is suspended; resume it first", types.ErrConflict, id)
		}
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

// timed logs how long a snapshot operation took, for the figures the
// issue asks of the fake (see TestSnapshotOpsFigures).
func (o *Orchestrator) timed(op, id string) func() {
	start := time.Now()
	return func() {
		o.log.Debug("snapshot operation done", "op", op, "vm_id", id, "took", time.Since(start))
	}
}
