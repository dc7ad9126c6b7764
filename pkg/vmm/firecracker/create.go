package firecracker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/jail"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// CreateVM implements vmm.VMOrchestrator.
func (o *Orchestrator) CreateVM(ctx context.Context, spec types.VMSpec) (*vmm.VMStatus, error) {
	return o.CreateVMWithOptions(ctx, spec, VMOptions{})
}

// CreateVMWithOptions is CreateVM with the per-VM options of this backend.
// It copies the rootfs (reflink when possible) and, with the jailer, builds
// the jail's root; it does not start Firecracker. With spec.FromSnapshot
// the VM is a clone: its rootfs is its own copy of the snapshot's frozen
// disk, the snapshot's state and memory files are hard-linked into its
// root, and the snapshot fixes its vCPUs, memory, tools and network mode
// (a restored machine keeps its devices); StartVM restores it. A
// directory that holds no firecracker snapshot returns types.ErrInvalid.
func (o *Orchestrator) CreateVMWithOptions(ctx context.Context, spec types.VMSpec, opts VMOptions) (*vmm.VMStatus, error) {
	if err := types.ValidateID(spec.ID); err != nil {
		return nil, err
	}
	rootfs := o.cfg.RootfsPath
	var snap *snapshotMeta
	if spec.FromSnapshot != "" {
		m, err := readSnapshotMeta(spec.FromSnapshot)
		if err != nil {
			return nil, err
		}
		if err := fromSnapshot(&spec, m, o.cfg.Jailer.On()); err != nil {
			return nil, err
		}
		snap, rootfs = m, filepath.Join(spec.FromSnapshot, m.Files.Rootfs)
	}
	if err := spec.Validate(o.cfg.MaxVCPUs); err != nil {
		return nil, err
	}
	if err := vmm.CheckMaxMemory(spec, o.cfg.MaxMemoryMB, "vmm.firecracker.max_memory_mb"); err != nil {
		return nil, err
	}
	if spec.Network == types.NetworkNAT && opts.TAPDevice == "" && !o.net.Enabled() {
		return nil, vmutil.ErrNoNetwork
	}
	p := o.cfg.paths(spec.ID)
	for _, s := range []string{p.host(apiSockName), p.host(vsockSockName)} {
		if len(s) > maxSocketPathLen {
			return nil, fmt.Errorf("%w: socket path %s is %d bytes, over the %d a unix socket allows; choose a shorter socket dir or chroot base dir", types.ErrInvalid, s, len(s), maxSocketPathLen)
		}
	}
	unlock, err := o.locks.LockContext(ctx, spec.ID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if _, err := o.readRecord(spec.ID); err == nil {
		return o.status(ctx, spec.ID)
	} else if !errors.Is(err, types.ErrNotFound) {
		return nil, err
	}
	attached := false
	var ids *jail.IDs
	undo := func() {
		if ids != nil && o.leases != nil {
			if err := o.leases.Release(ids.UID, p.run); err != nil {
				o.log.Warn("cannot release the jail uid of a failed create; the next start reaps it", "vm_id", spec.ID, "err", err)
			}
		}
		os.RemoveAll(p.run)
		if p.jailed {
			os.RemoveAll(p.jail)
		}
		if attached {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), o.cfg.StopTimeout)
			defer cancel()
			if err := o.net.Detach(dctx, spec.ID); err != nil {
				o.log.Warn("cannot detach a vm whose create failed; reconcile will", "vm_id", spec.ID, "err", err)
			}
		}
	}
	if p.jailed {
		got, err := o.jailIDs(p)
		if err != nil {
			undo()
			return nil, fmt.Errorf("creating vm %s: %w", spec.ID, err)
		}
		ids = &got
	}
	if err := o.prepare(p, spec.ID, rootfs, spec.Tools, ids); err != nil {
		undo()
		return nil, fmt.Errorf("creating vm %s: %w", spec.ID, err)
	}
	if snap != nil {
		if err := prepareClone(p, snap, spec.FromSnapshot); err != nil {
			undo()
			return nil, fmt.Errorf("creating vm %s: %w", spec.ID, err)
		}
	}
	if spec.Network == types.NetworkNAT && opts.TAPDevice == "" {
		a, err := o.net.Attach(ctx, spec.ID)
		if err != nil {
			attached = true // Attach may have leased or written rules: undo detaches
			undo()
			return nil, err
		}
		attached = true
		opts.TAPDevice, opts.GuestMAC, opts.KernelArg = a.TAP, a.MAC.String(), a.KernelArg
	}
	rec := record{ID: spec.ID, Name: spec.Name, VCPUs: spec.VCPUs, MemoryMB: spec.MemoryMB,
		Labels: spec.Labels, Env: spec.Env, Owner: o.cfg.Owner, Options: opts, Created: time.Now().UTC(), Attached: attached,
		Tools: spec.Tools, Jail: ids}
	if snap != nil {
		rec.Clone = &cloneInfo{Snapshot: spec.FromSnapshot, Drives: snap.Drives, IfaceID: snap.IfaceID}
	}
	// state.json is written last: its presence means the VM exists.
	if err := o.writeRecord(&rec); err != nil {
		undo()
		return nil, fmt.Errorf("creating vm %s: %w", spec.ID, err)
	}
	o.log.Info("created vm", "vm_id", spec.ID, "vcpus", spec.VCPUs, "memory_mb", spec.MemoryMB, "jailed", p.jailed)
	return o.status(ctx, spec.ID)
}

// prepare makes the run directory (and jail root) with the VM's own copy
// of rootfs (the configured image, or a snapshot's frozen disk), log and
// metrics files. It is safe to run again after a crash.
func (o *Orchestrator) prepare(p paths, id, rootfs string, tools *types.ToolSet, ids *jail.IDs) error {
	if err := os.MkdirAll(p.run, 0o700); err != nil {
		return err
	}
	if p.jailed {
		if err := os.MkdirAll(p.root, 0o700); err != nil {
			return err
		}
	}
	if _, err := os.Stat(p.host(rootfsName)); err != nil {
		method, err := cloneFile(rootfs, p.host(rootfsName), 0o600)
		if err != nil {
			return fmt.Errorf("copying the rootfs %s: %w", rootfs, err)
		}
		o.log.Info("copied rootfs", "vm_id", id, "method", method)
	}
	// Firecracker opens the log and metrics paths but does not create them.
	for _, name := range []string{logName, metricsName} {
		f, err := os.OpenFile(p.host(name), os.O_CREATE|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		f.Close()
	}
	if !p.jailed {
		return nil
	}
	// Tool images are shared read-only by every VM that uses them: a hard
	// link into the jail costs no space (a copy only across file systems).
	for i, v := range toolVolumes(tools) {
		if _, err := os.Stat(p.host(toolDriveName(i))); err == nil {
			continue
		}
		if _, err := linkOrCopy(v.Image, p.host(toolDriveName(i))); err != nil {
			return fmt.Errorf("putting tool image %s into the jail: %w", v.Image, err)
		}
	}
	// The jailed VMM sees only its root: link the kernel and initrd in.
	// They stay owned by their owner (a hard link shares the inode); the
	// VMM only reads them.
	if _, err := linkOrCopy(o.cfg.KernelPath, p.host(kernelName)); err != nil {
		return fmt.Errorf("putting the kernel into the jail: %w", err)
	}
	if o.cfg.InitrdPath != "" {
		if _, err := linkOrCopy(o.cfg.InitrdPath, p.host(initrdName)); err != nil {
			return fmt.Errorf("putting the initrd into the jail: %w", err)
		}
	}
	for _, f := range []string{p.root, p.host(rootfsName), p.host(logName), p.host(metricsName)} {
		if err := os.Chown(f, ids.UID, ids.GID); err != nil {
			return fmt.Errorf("giving %s to the jailer's uid %d: %w", f, ids.UID, err)
		}
	}
	return nil
}

// DeleteVM implements vmm.VMOrchestrator.
func (o *Orchestrator) DeleteVM(ctx context.Context, id string) error {
	unlock, ok, err := vmutil.Lock(ctx, &o.locks, id)
	if !ok {
		return err // nil for an id no VM can have
	}
	defer unlock()
	if pr := o.running(id); pr != nil {
		o.kill(ctx, id, pr)
	}
	o.cleanupRun(id)
	p := o.cfg.paths(id)
	_, statErr := os.Stat(p.run)
	rec, recErr := o.readRecord(id)
	if o.net.Enabled() && (recErr != nil || rec.Attached) {
		// Before the record goes, so a failed detach is retried by the
		// next delete. Without a readable record (a create cut short, a
		// corrupt file) Detach runs too: it is a no-op when nothing is there.
		if err := o.net.Detach(ctx, id); err != nil {
			return err
		}
	}
	// The record goes first, so a half-removed VM no longer counts as one.
	os.Remove(filepath.Join(p.run, stateFileName))
	if p.jailed {
		if err := os.RemoveAll(p.jail); err != nil {
			return fmt.Errorf("removing vm %s's jail: %w", id, err)
		}
		o.removeCgroup(id)
	}
	if o.leases != nil {
		// After the jail: nothing owned by the uid is left when another VM
		// gets it.
		if err := o.leases.Release(jailUID(rec), p.run); err != nil {
			return fmt.Errorf("deleting vm %s: %w", id, err)
		}
	}
	if err := os.RemoveAll(p.run); err != nil {
		return fmt.Errorf("removing vm %s's run directory: %w", id, err)
	}
	if statErr == nil {
		o.log.Info("deleted vm", "vm_id", id)
	}
	return nil
}

// removeCgroup removes the empty cgroup the jailer made for the VM; the
// jailer leaves it behind (docs/jailer.md). On cgroup v1 that is one
// directory in each hierarchy a --cgroup named (cpu, memory, pids). Best
// effort: a host without the configured version has none to remove.
func (o *Orchestrator) removeCgroup(id string) {
	parent := cmp.Or(o.cfg.Jailer.ParentCgroup, filepath.Base(o.cfg.Binary))
	cg, err := jail.NewCgroups(jail.DefaultCgroupRoot, strconv.Itoa(o.cfg.Jailer.CgroupVersion), parent)
	if err != nil {
		o.log.Debug("cannot remove the vm's cgroup", "vm_id", id, "err", err)
		return
	}
	for _, dir := range cg.Dirs(id) {
		if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			o.log.Debug("cannot remove the vm's cgroup", "vm_id", id, "dir", dir, "err", err)
		}
	}
}

// jailIDs returns the uid/gid a new jailed VM runs as: its own lease from
// the shared range, or the fixed pair the configuration names.
func (o *Orchestrator) jailIDs(p paths) (jail.IDs, error) {
	if o.leases == nil {
		return jail.IDs{UID: o.cfg.Jailer.UID, GID: o.cfg.Jailer.GID}, nil
	}
	ids, err := o.leases.Acquire(p.run)
	if err != nil {
		return ids, fmt.Errorf("%w (for firecracker: vmm.firecracker.jailer.count)", err)
	}
	return ids, nil
}

// jailUID is the leased uid a record names, or -1 (no lease to release).
func jailUID(rec *record) int {
	if rec == nil || rec.Jail == nil {
		return -1
	}
	return rec.Jail.UID
}
