package qemu

import (
	"context"
	"fmt"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// vmFile is vm.json.
type vmFile struct {
	Spec      types.VMSpec `json:"spec"`
	Owner     string       `json:"owner,omitempty"`
	CreatedAt time.Time    `json:"created_at"`
	// Running is the desired state: true from StartVM until StopVM.
	Running bool `json:"running"`
	// Failed explains why the VM ended without being asked to.
	Failed string `json:"failed,omitempty"`
	// Boots counts StartVM calls that spawned QEMU.
	Boots int `json:"boots"`
	// Net is a nat VM's network; nil for none.
	Net *netFile `json:"network,omitempty"`
	// Jail is a confined VM's uid and gid; nil for a VM made and never
	// booted with confinement off.
	Jail *jailFile `json:"jail,omitempty"`
	// Paused is set while Pause holds the VM's vCPUs.
	Paused bool `json:"paused,omitempty"`
	// Suspended is set once Suspend saved the VM's state (file "state")
	// and until Resume restored it or StopVM discarded it.
	Suspended bool `json:"suspended,omitempty"`
	// Disk is the root disk's active layer in the run directory; empty:
	// fileOverlay. Each Snapshot freezes the active layer and starts a
	// new one (overlay-N.qcow2, N = Layers).
	Disk   string `json:"disk,omitempty"`
	Layers int    `json:"layers,omitempty"`
	// Clone is set for a VM made from a snapshot.
	Clone *cloneFile `json:"clone,omitempty"`
}

// recover finds the VMs of an earlier worker: those whose QEMU still runs
// are watched again; those that should run but do not are marked failed and
// their leftovers removed.
func (o *Orchestrator) recover(ctx context.Context) error {
	ids, err := o.listIDs()
	if err != nil {
		return err
	}
	for _, id := range ids {
		unlock := o.locks.Lock(id)
		vf, err := o.readVM(id)
		if err != nil {
			unlock()
			o.log.Warn("skipping unreadable vm directory", "vm_id", id, "err", err)
			continue
		}
		dir := o.RunDir(id)
		q := vmutil.Adopt(o.path(id, fileQEMUPid), vmutil.MentionsDir(dir))
		switch {
		case q != nil && vf.Suspended:
			// Saved, and the worker died before it ended QEMU.
			o.stopProcs(id, true)
			o.cleanRuntime(id)
			o.log.Info("ended the QEMU of a suspended vm", "vm_id", id)
		case q != nil:
			p := &vmProcs{qemu: q}
			o.mu.Lock()
			o.vms[id] = p
			o.mu.Unlock()
			go o.watch(id, p)
			o.log.Info("found running vm again", "vm_id", id, "qemu_pid", q.Pid())
		default:
			o.stopProcs(id, true) // a leftover vhost-device-vsock
			o.cleanRuntime(id)
			o.dropCgroup(id)
			if vf.Running {
				vf.Running = false
				vf.Failed = "its VMM was gone when the worker restarted"
				if err := o.writeVM(id, vf); err != nil {
					o.log.Warn("cannot record failed vm", "vm_id", id, "err", err)
				}
				o.log.Warn("vm is gone after a restart; marked failed", "vm_id", id)
			}
		}
		unlock()
	}
	return nil
}

// GetVMStatus implements vmm.VMOrchestrator.
func (o *Orchestrator) GetVMStatus(ctx context.Context, id string) (*vmm.VMStatus, error) {
	if types.ValidateID(id) != nil {
		return nil, notFound(id)
	}
	return o.status(id)
}

func (o *Orchestrator) status(id string) (*vmm.VMStatus, error) {
	vf, err := o.readVM(id)
	if err != nil {
		return nil, err
	}
	st := &vmm.VMStatus{ID: id, Name: vf.Spec.Name, Labels: vf.Spec.Labels, State: types.VMStopped}
	p := o.procs(id)
	st.Jail = o.jailInfo(id, vf, p != nil && p.qemu.Alive())
	switch {
	case p != nil && p.qemu.Alive() && vf.Paused:
		st.State = types.VMPaused
	case p != nil && p.qemu.Alive():
		st.State = types.VMRunning
	case vf.Suspended:
		st.State = types.VMSuspended
	case vf.Failed != "":
		st.State, st.Detail = types.VMFailed, vf.Failed
	case vf.Running && p != nil:
		// Ended, and the watcher has not recorded it yet: the words it
		// will record.
		st.State, st.Detail = types.VMFailed, o.qemuEnded(id, p)
	case vf.Running:
		// Should run, but this worker holds no process for it (the
		// watcher has not caught up yet, or another worker owns it).
		st.State, st.Detail = types.VMFailed, "its QEMU process is not running"
	}
	return st, nil
}

// ListVMs implements vmm.VMOrchestrator.
func (o *Orchestrator) ListVMs(ctx context.Context) ([]vmm.VMStatus, error) {
	ids, err := o.listIDs()
	if err != nil {
		return nil, err
	}
	out := make([]vmm.VMStatus, 0, len(ids))
	for _, id := range ids {
		vf, err := o.readVM(id)
		if err != nil || (o.cfg.Owner != "" && vf.Owner != o.cfg.Owner) {
			continue
		}
		if st, err := o.status(id); err == nil {
			out = append(out, *st)
		}
	}
	return out, nil
}

// listIDs returns the ids of the VM directories in RunDir.
func (o *Orchestrator) listIDs() ([]string, error) { return vmutil.RunDir(o.cfg.RunDir).IDs() }

func (o *Orchestrator) readVM(id string) (*vmFile, error) {
	var vf vmFile
	if err := vmutil.ReadRecord(o.path(id, fileSpec), id, &vf); err != nil {
		return nil, err
	}
	return &vf, nil
}

// writeVM replaces vm.json atomically.
func (o *Orchestrator) writeVM(id string, vf *vmFile) error {
	if err := vmutil.WriteRecord(o.path(id, fileSpec), vf); err != nil {
		return fmt.Errorf("writing vm %s: %w", id, err)
	}
	return nil
}

func (o *Orchestrator) procs(id string) *vmProcs {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.vms[id]
}
