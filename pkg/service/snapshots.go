package service

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Snapshots is the part of the service that pauses, suspends and
// snapshots VMs and builds templates (docs/architecture.md). *Service
// implements it; VMs start from snapshots and templates through
// CreateVMOptions.FromSnapshot and Template.
//
// Errors are those of TaskService. A request the VM's state makes
// impossible (pause a stopped VM, resume a running one), an unknown
// snapshot and a name already taken return errors wrapping
// types.ErrInvalid, so that the CLI exits 2, with the state or the name
// in the message.
type Snapshots interface {
	// PauseVMTask submits pausing a running VM: its vCPUs freeze, its
	// memory stays.
	PauseVMTask(ctx context.Context, vmID string) (uuid.UUID, error)
	// ResumeVMTask submits resuming a paused or suspended VM.
	ResumeVMTask(ctx context.Context, vmID string) (uuid.UUID, error)
	// SuspendVMTask submits saving a running or paused VM's memory to its
	// worker's disk and ending its VMM; resume restores it.
	SuspendVMTask(ctx context.Context, vmID string) (uuid.UUID, error)
	// SnapshotVMTask submits a snapshot named name of a running or paused
	// VM: memory, devices and disk. The task's result names the snapshot.
	SnapshotVMTask(ctx context.Context, vmID, name string) (uuid.UUID, error)
	// CreateTemplateTask submits building a template: a VM is booted with
	// o's size and tools, o.Setup runs in it, and it is snapshotted with
	// its agent ready, then removed.
	CreateTemplateTask(ctx context.Context, o TemplateOptions) (uuid.UUID, error)
	// ListSnapshots returns the live snapshots of kind ("" for both), by
	// name.
	ListSnapshots(ctx context.Context, kind types.SnapshotKind) ([]*types.Snapshot, error)
	// GetSnapshot returns the live snapshot of kind named nameOrID, or
	// with that id.
	GetSnapshot(ctx context.Context, kind types.SnapshotKind, nameOrID string) (*types.Snapshot, error)
	// DeleteSnapshotTask submits removing a snapshot or template and its
	// files. One that live VMs were started from is refused with
	// types.ErrConflict naming them.
	DeleteSnapshotTask(ctx context.Context, kind types.SnapshotKind, nameOrID string) (uuid.UUID, error)
}

var _ Snapshots = (*Service)(nil)

// TemplateOptions describes a template to build.
type TemplateOptions struct {
	Name     string
	VCPUs    int
	MemoryMB int
	// Network is the network mode of the template and of its clones
	// (empty: the service's or the worker's default, as for a VM).
	Network string
	// Tools are mise tool specs installed in the template's VM.
	Tools []string
	// Setup is a shell command run in the VM (sh -c) before the
	// snapshot; it must exit 0.
	Setup string
	// Env is the default environment of the template's clones.
	Env map[string]string
}

// Retry policy of the snapshot tasks.
const (
	snapshotMaxRetry = 2
	snapshotTimeout  = 10 * time.Minute
	templateTimeout  = 45 * time.Minute
)

func (s *Service) PauseVMTask(ctx context.Context, vmID string) (uuid.UUID, error) {
	return s.vmOpTask(ctx, vmID, types.TaskVMPause)
}

func (s *Service) ResumeVMTask(ctx context.Context, vmID string) (uuid.UUID, error) {
	return s.vmOpTask(ctx, vmID, types.TaskVMResume)
}

func (s *Service) SuspendVMTask(ctx context.Context, vmID string) (uuid.UUID, error) {
	return s.vmOpTask(ctx, vmID, types.TaskVMSuspend)
}

// opFrom lists the states each operation applies to, and says what to do
// instead.
var opFrom = map[types.TaskType]struct {
	from []types.VMState
	verb string
}{
	types.TaskVMPause:   {[]types.VMState{types.VMRunning}, "pause"},
	types.TaskVMResume:  {[]types.VMState{types.VMPaused, types.VMSuspended}, "resume"},
	types.TaskVMSuspend: {[]types.VMState{types.VMRunning, types.VMPaused}, "suspend"},
}

// ownedVMIn returns a VM in one of the states from, owned by a worker
// that still reports, or why not.
func (s *Service) ownedVMIn(ctx context.Context, vmID, verb string, from ...types.VMState) (*types.VM, error) {
	vm, err := s.getVM(ctx, vmID)
	if err != nil {
		return nil, err
	}
	if err := s.checkOwner(ctx, vm, verb); err != nil {
		return nil, err
	}
	for _, st := range from {
		if vm.State == st {
			if vm.Owner == "" {
				break
			}
			return vm, nil
		}
	}
	names := make([]string, len(from))
	for i, st := range from {
		names[i] = string(st)
	}
	return nil, fmt.Errorf("%w: cannot %s vm %s: it is %s; only a %s vm can be", types.ErrInvalid, verb, vm.ID, vm.State, strings.Join(names, " or "))
}

func (s *Service) vmOpTask(ctx context.Context, vmID string, typ types.TaskType) (uuid.UUID, error) {
	op := opFrom[typ]
	vm, err := s.ownedVMIn(ctx, vmID, op.verb, op.from...)
	if err != nil {
		return uuid.Nil, err
	}
	id := uuid.New()
	t, err := queue.NewVMOpTask(id.String(), typ, queue.VMOpPayload{VMID: vm.ID})
	if err != nil {
		return uuid.Nil, err
	}
	return id, s.submit(ctx, t, queue.EnqueueOptions{Queue: queue.WorkerQueue(vm.Owner), MaxRetry: snapshotMaxRetry, Timeout: snapshotTimeout})
}

func (s *Service) SnapshotVMTask(ctx context.Context, vmID, name string) (uuid.UUID, error) {
	if err := types.ValidateSnapshotName(types.KindSnapshot, name); err != nil {
		return uuid.Nil, err
	}
	vm, err := s.ownedVMIn(ctx, vmID, "snapshot", types.VMRunning, types.VMPaused)
	if err != nil {
		return uuid.Nil, err
	}
	id := uuid.New()
	sn := &types.Snapshot{ID: id.String(), Name: name, Kind: types.KindSnapshot, VMID: vm.ID, Owner: vm.Owner,
		Provider: vm.Provider, VCPUs: vm.VCPUs, MemoryMB: vm.MemoryMB, Network: vm.Network, Env: vm.Env, Tenant: vm.Tenant}
	if err := s.recordSnapshot(ctx, sn); err != nil {
		return uuid.Nil, err
	}
	t, err := queue.NewVMSnapshotTask(id.String(), queue.VMSnapshotPayload{VMID: vm.ID, SnapshotID: sn.ID})
	if err == nil {
		err = s.submit(ctx, t, queue.EnqueueOptions{Queue: queue.WorkerQueue(vm.Owner), MaxRetry: snapshotMaxRetry, Timeout: snapshotTimeout})
	}
	if err != nil {
		s.retireSnapshot(ctx, sn, err)
		return uuid.Nil, err
	}
	return id, nil
}

// recordSnapshot inserts sn, explaining a name clash.
func (s *Service) recordSnapshot(ctx context.Context, sn *types.Snapshot) error {
	err := s.store.CreateSnapshot(ctx, sn)
	if errors.Is(err, types.ErrConflict) {
		return fmt.Errorf("%w: a %s named %q already exists; pick another name or delete it with `aether-cli %s delete %s`", types.ErrInvalid, sn.Kind, sn.Name, sn.Kind, sn.Name)
	}
	if err != nil {
		return fmt.Errorf("recording %s %s: %w", sn.Kind, sn.Name, err)
	}
	return nil
}

// retireSnapshot marks a snapshot whose task could not be submitted
// failed, so that its name is not held by something that never comes.
func (s *Service) retireSnapshot(ctx context.Context, sn *types.Snapshot, cause error) {
	bg := context.WithoutCancel(ctx)
	msg := cause.Error()
	for _, st := range []types.SnapshotState{types.SnapshotFailed, types.SnapshotDeleted} {
		if _, err := s.store.UpdateSnapshot(bg, sn.ID, snapshotUpdate(st, msg)); err != nil {
			s.opts.logger.Warn("retiring a snapshot whose task was not submitted", "snapshot", sn.Name, "err", err)
			return
		}
	}
}

func (s *Service) CreateTemplateTask(ctx context.Context, o TemplateOptions) (uuid.UUID, error) {
	if err := types.ValidateSnapshotName(types.KindTemplate, o.Name); err != nil {
		return uuid.Nil, err
	}
	if err := checkToolSpecs(o.Tools); err != nil {
		return uuid.Nil, err
	}
	workerNetwork := o.Network == "" && s.opts.defaultNetwork == ""
	network := cmp.Or(o.Network, s.opts.defaultNetwork, types.NetworkNone)
	id, vmID := uuid.New(), uuid.New()
	spec := types.VMSpec{ID: vmID.String(), Name: "template-" + o.Name + "-" + vmID.String()[:8], VCPUs: o.VCPUs, MemoryMB: o.MemoryMB,
		Env: o.Env, Network: network, Labels: map[string]string{"aetherium.template": o.Name}}
	if err := spec.Validate(s.opts.maxVCPUs); err != nil {
		return uuid.Nil, err
	}
	sc := scopeOf(ctx)
	sn := &types.Snapshot{ID: id.String(), Name: o.Name, Kind: types.KindTemplate, VMID: spec.ID, VCPUs: o.VCPUs,
		MemoryMB: o.MemoryMB, Network: network, Tools: o.Tools, Setup: o.Setup, Env: o.Env, Tenant: sc.Tenant}
	if err := s.recordSnapshot(ctx, sn); err != nil {
		return uuid.Nil, err
	}
	now := time.Now().UTC()
	vm := &types.VM{ID: spec.ID, Name: spec.Name, VCPUs: o.VCPUs, MemoryMB: o.MemoryMB, State: types.VMPending,
		Labels: spec.Labels, Env: o.Env, Network: network, Tenant: sc.Tenant, CreatedAt: now, UpdatedAt: now}
	err := s.store.CreateVMWithin(ctx, vm, sc.Limits)
	var t *types.Task
	if err == nil {
		t, err = queue.NewTemplateBuildTask(id.String(), queue.TemplateBuildPayload{SnapshotID: sn.ID, VMID: vm.ID, DefaultNetwork: workerNetwork})
	}
	if err == nil {
		err = s.submit(ctx, t, queue.EnqueueOptions{Queue: queue.SharedQueue, MaxRetry: snapshotMaxRetry, Timeout: templateTimeout})
	}
	if err != nil {
		s.retireSnapshot(ctx, sn, err)
		return uuid.Nil, err
	}
	return id, nil
}

func (s *Service) ListSnapshots(ctx context.Context, kind types.SnapshotKind) ([]*types.Snapshot, error) {
	sc := scopeOf(ctx)
	var tenant *string
	if !sc.Admin {
		tenant = &sc.Tenant
	}
	return s.store.ListSnapshots(ctx, kind, tenant)
}

func (s *Service) GetSnapshot(ctx context.Context, kind types.SnapshotKind, nameOrID string) (*types.Snapshot, error) {
	sn, err := s.store.FindSnapshot(ctx, kind, nameOrID)
	if errors.Is(err, types.ErrNotFound) {
		if _, perr := uuid.Parse(nameOrID); perr == nil {
			sn, err = s.store.GetSnapshot(ctx, nameOrID)
			if err == nil && (sn.Kind != kind || !sn.Live()) {
				err = types.ErrNotFound
			}
		}
	}
	if errors.Is(err, types.ErrNotFound) || (err == nil && !scopeOf(ctx).sees(sn.Tenant)) {
		return nil, fmt.Errorf("%w: no %s named %q; list them with `aether-cli %s list` (%w)", types.ErrInvalid, kind, nameOrID, kind, types.ErrNotFound)
	}
	return sn, err
}

func (s *Service) DeleteSnapshotTask(ctx context.Context, kind types.SnapshotKind, nameOrID string) (uuid.UUID, error) {
	sn, err := s.GetSnapshot(ctx, kind, nameOrID)
	if err != nil {
		return uuid.Nil, err
	}
	clones, err := s.store.ListSnapshotClones(ctx, sn.ID)
	if err != nil {
		return uuid.Nil, err
	}
	if len(clones) > 0 {
		ids := make([]string, 0, 5)
		for _, c := range clones[:min(len(clones), 5)] {
			ids = append(ids, c.ID)
		}
		return uuid.Nil, fmt.Errorf("%w: %s %s is used by %d vm(s) started from it (%s); delete them first", types.ErrConflict, kind, sn.Name, len(clones), strings.Join(ids, ", "))
	}
	id := uuid.New()
	if sn.Owner == "" {
		// Never built: nothing exists outside the database.
		if sn.State == types.SnapshotCreating {
			return uuid.Nil, fmt.Errorf("%w: %s %s is still being made; wait for it, then delete it", types.ErrConflict, kind, sn.Name)
		}
		for _, st := range []types.SnapshotState{types.SnapshotDeleting, types.SnapshotDeleted} {
			if _, err := s.store.UpdateSnapshot(ctx, sn.ID, snapshotUpdate(st, "")); err != nil {
				return uuid.Nil, err
			}
		}
		// Recorded with its payload, which names the snapshot whose
		// tenant may see the task.
		t, err := queue.NewSnapshotDeleteTask(id.String(), queue.SnapshotDeletePayload{SnapshotID: sn.ID})
		if err != nil {
			return uuid.Nil, err
		}
		now := time.Now().UTC()
		t.State, t.FinishedAt = types.TaskSucceeded, &now
		t.Result = []byte(`{"note":"` + string(kind) + ` had no files"}`)
		if err := s.store.CreateTask(ctx, t); err != nil {
			return uuid.Nil, fmt.Errorf("recording task: %w", err)
		}
		return id, nil
	}
	t, err := queue.NewSnapshotDeleteTask(id.String(), queue.SnapshotDeletePayload{SnapshotID: sn.ID})
	if err != nil {
		return uuid.Nil, err
	}
	return id, s.submit(ctx, t, queue.EnqueueOptions{Queue: queue.WorkerQueue(sn.Owner), MaxRetry: deleteMaxRetry, Timeout: deleteTimeout})
}

// cloneSource resolves o.FromSnapshot or o.Template to a ready snapshot
// and fills o's size and network from it; nil when o boots.
func (s *Service) cloneSource(ctx context.Context, o *CreateVMOptions) (*types.Snapshot, error) {
	kind, name := types.KindSnapshot, o.FromSnapshot
	switch {
	case o.FromSnapshot != "" && o.Template != "":
		return nil, fmt.Errorf("%w: give a snapshot or a template to start from, not both", types.ErrInvalid)
	case o.Template != "":
		kind, name = types.KindTemplate, o.Template
	case o.FromSnapshot == "":
		return nil, nil
	}
	sn, err := s.GetSnapshot(ctx, kind, name)
	if err != nil {
		return nil, err
	}
	switch {
	case sn.State != types.SnapshotReady:
		return nil, fmt.Errorf("%w: %s %s is %s, not ready%s", types.ErrConflict, kind, sn.Name, sn.State, cmp.Or(prefixed("; ", sn.Error), ""))
	case len(o.Tools) > 0:
		return nil, fmt.Errorf("%w: a vm started from %s %s has its tools; build a template with the tools instead", types.ErrInvalid, kind, sn.Name)
	case (o.VCPUs != 0 && o.VCPUs != sn.VCPUs) || (o.MemoryMB != 0 && o.MemoryMB != sn.MemoryMB):
		return nil, fmt.Errorf("%w: %s %s has %d vcpus and %d MiB; a vm started from it has the same size", types.ErrInvalid, kind, sn.Name, sn.VCPUs, sn.MemoryMB)
	case o.Network != "" && o.Network != sn.Network:
		return nil, fmt.Errorf("%w: %s %s has network %s; a vm started from it has the same", types.ErrInvalid, kind, sn.Name, sn.Network)
	}
	if w, err := s.store.GetWorker(ctx, sn.Owner); err == nil && s.silent(w) {
		return nil, fmt.Errorf("%w: %s %s is on worker %s, which %s; wait for it to return", types.ErrUnavailable, kind, sn.Name, sn.Owner,
			strings.TrimPrefix(types.OwnerSilent(w.ID, w.LastSeen), "owner worker "+w.ID+" "))
	}
	o.VCPUs, o.MemoryMB, o.Network = sn.VCPUs, sn.MemoryMB, sn.Network
	if o.Env == nil {
		o.Env = sn.Env
	}
	return sn, nil
}

func prefixed(p, s string) string {
	if s == "" {
		return ""
	}
	return p + s
}

// snapshotUpdate moves a snapshot to st, with msg as its error when set.
func snapshotUpdate(st types.SnapshotState, msg string) storage.SnapshotUpdate {
	u := storage.SnapshotUpdate{State: &st}
	if msg != "" {
		u.Error = &msg
	}
	return u
}
