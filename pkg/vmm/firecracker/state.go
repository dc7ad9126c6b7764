package firecracker

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/aetherium/aetherium-core/pkg/vmm/internal/jail"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// record is a VM's state.json: what the backend must remember across
// restarts of the worker.
type record struct {
	ID       string            `json:"id"`
	Name     string            `json:"name"`
	VCPUs    int               `json:"vcpus"`
	MemoryMB int               `json:"memory_mb"`
	Labels   map[string]string `json:"labels,omitempty"`
	Env      map[string]string `json:"env,omitempty"`
	Owner    string            `json:"owner,omitempty"`
	Options  VMOptions         `json:"options"`
	Created  time.Time         `json:"created_at"`
	// Attached is set when the backend's network manager attached the VM,
	// so delete knows to detach it.
	Attached bool `json:"attached,omitempty"`
	// Tools are the tool volumes attached as read-only drives (see
	// types.ToolSet); nil: none.
	Tools *types.ToolSet `json:"tools,omitempty"`
	// Jail is the uid/gid the jailer runs this VM's VMM as; nil when not
	// jailed.
	Jail *jail.IDs `json:"jail,omitempty"`
	// Suspended is set once Suspend saved the VM's memory and device
	// state in its directory (suspendMemName, suspendStateName) and ends
	// its VMM; cleared when Resume restored it. Without a live VMM the
	// VM is then reported types.VMSuspended.
	Suspended bool `json:"suspended,omitempty"`
	// Clone is set for a VM created from a snapshot (types.VMSpec.FromSnapshot).
	Clone *cloneInfo `json:"clone,omitempty"`
}

// cloneInfo is what a VM created from a snapshot remembers of it.
type cloneInfo struct {
	// Snapshot is the snapshot's directory.
	Snapshot string `json:"snapshot"`
	// Drives maps each drive id to the path the snapshotted VMM had it
	// at, which Firecracker re-opens on load.
	Drives map[string]string `json:"drives"`
	// IfaceID is the snapshotted VM's network interface, or "".
	IfaceID string `json:"iface_id,omitempty"`
	// Restored is set once the clone was restored: a later StartVM (after
	// a stop) boots its own disk like any VM's.
	Restored bool `json:"restored,omitempty"`
}

func (o *Orchestrator) readRecord(id string) (*record, error) {
	var r record
	if err := vmutil.ReadRecord(filepath.Join(o.cfg.paths(id).run, stateFileName), id, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// writeRecord replaces state.json atomically.
func (o *Orchestrator) writeRecord(rec *record) error {
	return vmutil.WriteRecord(filepath.Join(o.cfg.paths(rec.ID).run, stateFileName), rec)
}

// GetVMStatus implements vmm.VMOrchestrator.
func (o *Orchestrator) GetVMStatus(ctx context.Context, id string) (*vmm.VMStatus, error) {
	if types.ValidateID(id) != nil {
		return nil, notFound(id)
	}
	return o.status(ctx, id)
}

// detailStarting explains a VM whose VMM runs but whose guest does not.
const detailStarting = "firecracker runs but its guest has not started"

func (o *Orchestrator) status(ctx context.Context, id string) (*vmm.VMStatus, error) {
	rec, err := o.readRecord(id)
	if err != nil {
		return nil, err
	}
	st := &vmm.VMStatus{ID: rec.ID, Name: rec.Name, Labels: rec.Labels, State: types.VMStopped}
	if rec.Jail != nil {
		st.Jail = &vmm.JailInfo{UID: rec.Jail.UID, GID: rec.Jail.GID}
	}
	if o.running(id) == nil {
		if rec.Suspended {
			st.State = types.VMSuspended
			return st, nil
		}
		run := o.cfg.paths(id).run
		if _, err := os.Stat(filepath.Join(run, runningMarker)); err == nil {
			st.State = types.VMFailed
			st.Detail = "firecracker exited without being stopped (killed or crashed); its output is in " + filepath.Join(run, consoleName)
		}
		return st, nil
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	info, err := NewClient(o.cfg.paths(id).host(apiSockName)).Describe(cctx)
	switch {
	case err != nil:
		st.Detail = detailStarting
	case info.State == InstanceRunning:
		st.State = types.VMRunning
		if st.Jail != nil {
			// The jailer's cgroup: <parent_cgroup>/<id>, the parent
			// defaulting to the exec file's name (docs/jailer.md).
			st.Jail.Cgroup = "/" + cmp.Or(o.cfg.Jailer.ParentCgroup, filepath.Base(o.cfg.Binary)) + "/" + id
		}
	case info.State == InstancePaused:
		st.State = types.VMPaused
	default:
		st.Detail = detailStarting
	}
	return st, nil
}

// ListVMs implements vmm.VMOrchestrator.
func (o *Orchestrator) ListVMs(ctx context.Context) ([]vmm.VMStatus, error) {
	entries, err := os.ReadDir(o.cfg.SocketDir)
	if err != nil {
		return nil, fmt.Errorf("listing vms in %s: %w", o.cfg.SocketDir, err)
	}
	out := []vmm.VMStatus{}
	for _, e := range entries {
		if !e.IsDir() || types.ValidateID(e.Name()) != nil {
			continue
		}
		rec, err := o.readRecord(e.Name())
		if err != nil {
			continue // being created or deleted
		}
		if o.cfg.Owner != "" && rec.Owner != o.cfg.Owner {
			continue
		}
		st, err := o.status(ctx, rec.ID)
		if err != nil {
			continue
		}
		out = append(out, *st)
	}
	slices.SortFunc(out, func(a, b vmm.VMStatus) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}
