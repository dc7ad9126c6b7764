package qemu

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// CreateVM implements vmm.VMOrchestrator: it writes the VM's directory and
// its overlay disk, attaches a nat VM to the network, and boots nothing.
//
// With spec.FromSnapshot, the VM is a clone of that snapshot: its vCPUs,
// memory and tool disks are the snapshot's, and its disk is a layer of
// its own over the snapshot's frozen disk. StartVM then restores it.
func (o *Orchestrator) CreateVM(ctx context.Context, spec types.VMSpec) (_ *vmm.VMStatus, err error) {
	var clone *cloneFile
	var snap *snapshotFile
	if spec.FromSnapshot != "" {
		if clone, snap, err = prepareClone(&spec); err != nil {
			return nil, err
		}
	}
	if err := spec.Validate(o.cfg.MaxVCPUs); err != nil {
		return nil, err
	}
	if err := vmm.CheckMaxMemory(spec, o.cfg.MaxMemoryMB, "vmm.qemu.max_memory_mb"); err != nil {
		return nil, err
	}
	if err := types.ValidateID(spec.ID); err != nil {
		return nil, err
	}
	nat := spec.Network == types.NetworkNAT
	if nat && !o.net.Enabled() {
		return nil, vmutil.ErrNoNetwork
	}
	unlock, err := o.locks.LockContext(ctx, spec.ID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if _, err := o.readVM(spec.ID); err == nil {
		return o.status(spec.ID)
	} else if !errors.Is(err, types.ErrNotFound) {
		return nil, err
	}

	// Build in a temporary directory and rename it into place, so a crash
	// never leaves a half-made VM that looks whole.
	tmp, err := os.MkdirTemp(o.cfg.RunDir, createPrefix+spec.ID+"-")
	if err != nil {
		return nil, fmt.Errorf("creating vm %s: %w", spec.ID, err)
	}
	o.mu.Lock()
	o.creating[spec.ID] = tmp
	o.mu.Unlock()
	defer func() {
		os.RemoveAll(tmp)
		o.mu.Lock()
		delete(o.creating, spec.ID)
		o.mu.Unlock()
	}()
	overlay := filepath.Join(tmp, fileOverlay)
	args := []string{"create", "-q", "-f", "qcow2", "-F", "raw", "-b", o.cfg.RootfsPath, overlay}
	if snap != nil {
		// Not opened (-u): the source VM may hold it.
		args = []string{"create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", filepath.Join(clone.Dir, snap.Top), "-u", overlay, strconv.FormatInt(snap.VirtualSize, 10)}
	}
	out, err := exec.CommandContext(ctx, o.cfg.ImgBinary, args...).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("creating vm %s's overlay disk: %v: %s", spec.ID, err, strings.TrimSpace(string(out)))
	}
	vf := &vmFile{Spec: spec, Owner: o.cfg.Owner, CreatedAt: time.Now().UTC(), Clone: clone}
	placed := false // the VM's directory is in place
	if o.jail != nil {
		// The lease names the VM's final directory; a crash before the
		// rename leaves a lease with no directory, which Reconcile frees.
		if vf.Jail, err = o.leaseUID(o.RunDir(spec.ID)); err != nil {
			return nil, err
		}
		defer func() {
			if err != nil && !placed {
				_ = o.releaseUID(spec.ID, vf.Jail)
			}
		}()
		if err := ownPrivately(overlay, vf.Jail.UID, vf.Jail.GID); err != nil {
			return nil, fmt.Errorf("creating vm %s: giving its overlay to its uid: %w", spec.ID, err)
		}
	}
	if nat {
		// A crash from here until the rename leaves a network with no
		// vm.json, which Reconcile removes.
		if vf.Net, err = o.attach(ctx, spec.ID); err != nil {
			// Attach may have leased an address or written rules before it
			// failed; Detach is idempotent and removes whatever is there.
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), o.cfg.StopTimeout)
			if derr := o.detach(dctx, spec.ID); derr != nil {
				o.log.Warn("cannot undo a failed attach; reconcile will", "vm_id", spec.ID, "err", derr)
			}
			cancel()
			return nil, err
		}
		defer func() {
			if err != nil && !placed {
				// A fresh context: the caller's may be what failed.
				dctx, cancel := context.WithTimeout(context.Background(), o.cfg.StopTimeout)
				defer cancel()
				if derr := o.detach(dctx, spec.ID); derr != nil {
					o.log.Warn("cannot undo a failed create's network; Reconcile will", "vm_id", spec.ID, "err", derr)
				}
			}
		}()
	}
	if err := vmutil.WriteRecord(filepath.Join(tmp, fileSpec), vf); err != nil {
		return nil, fmt.Errorf("creating vm %s: %w", spec.ID, err)
	}
	if err := os.Rename(tmp, o.RunDir(spec.ID)); err != nil {
		return nil, fmt.Errorf("creating vm %s: %w", spec.ID, err)
	}
	placed = true
	o.log.Info("created vm", "vm_id", spec.ID, "vcpus", spec.VCPUs, "memory_mb", spec.MemoryMB, "network", cmp.Or(spec.Network, types.NetworkNone))
	return o.status(spec.ID)
}

// DeleteVM implements vmm.VMOrchestrator.
func (o *Orchestrator) DeleteVM(ctx context.Context, id string) error {
	unlock, ok, err := vmutil.Lock(ctx, &o.locks, id)
	if !ok {
		return err // nil for an id no VM can have
	}
	defer unlock()
	dir := o.RunDir(id)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		// A create that failed half-way may have left a lease or rules;
		// Detach removes whatever is there and is a no-op otherwise.
		return o.detach(ctx, id)
	}
	o.stopProcs(id, true)
	vf, _ := o.readVM(id)
	// The network goes before the directory: a failed Detach leaves vm.json
	// in place, so the retried delete (or Reconcile) still knows the VM.
	// A VM whose vm.json cannot be read is detached too, to be safe.
	if vf == nil || vf.Spec.Network == types.NetworkNAT || vf.Net != nil {
		if err := o.detach(ctx, id); err != nil {
			return err
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("removing vm %s's directory: %w", id, err)
	}
	// The uid goes last, with nothing of the VM's left that it owns. A
	// VM whose vm.json was unreadable has its lease freed by Reconcile.
	if vf != nil {
		if err := o.releaseUID(id, vf.Jail); err != nil {
			return err
		}
	}
	o.log.Info("deleted vm", "vm_id", id)
	return nil
}
