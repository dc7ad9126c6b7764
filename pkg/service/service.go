// Package service is Aetherium Core's public API: TaskService records what
// users ask for in storage, hands the work to workers through the queue and
// lets callers wait for, stream and inspect the results. It depends only on
// the storage and queue interfaces, never on a VM backend.
package service

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Service is the TaskService that records in a storage.Store and hands the
// work to workers through a queue.Queue. It is safe for concurrent use.
type Service struct {
	queue    queue.Queue
	notifier queue.Notifier
	output   queue.OutputStream
	store    storage.Store
	opts     options
}

var _ TaskService = (*Service)(nil)

type options struct {
	maxVCPUs       int
	defaultNetwork string
	maxTTL         time.Duration
	dataPlane      DataPlane
	logger         *slog.Logger
	deadAfter      time.Duration
}

// Option configures a TaskService.
type Option func(*options)

// WithMaxVCPUs sets the most vCPUs a VM may ask for (default: this host's
// CPU count). Workers check their own host's limit again.
func WithMaxVCPUs(n int) Option { return func(o *options) { o.maxVCPUs = n } }

// WithDefaultNetwork sets the network mode of VMs created without one
// (types.NetworkNone or types.NetworkNAT). Without it, the worker that
// claims such a VM picks the mode from its backend and configuration
// (worker.Config.NetworkByDefault); the VM's row says none until then.
func WithDefaultNetwork(mode string) Option { return func(o *options) { o.defaultNetwork = mode } }

// WithMaxTTL bounds the TTL a VM may be given (default: no bound).
func WithMaxTTL(d time.Duration) Option { return func(o *options) { o.maxTTL = d } }

// WithDataPlane sets how files reach the workers that own the VMs (the
// workers' data plane). Without one, WriteFile and ReadFile return
// types.ErrNotSupported.
func WithDataPlane(dp DataPlane) Option { return func(o *options) { o.dataPlane = dp } }

// WithLogger sets the logger (default: discard).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.logger = l } }

// NewTaskService returns a service that enqueues on q and records in s. When
// q also implements queue.Notifier and queue.OutputStream (the Redis queue
// does), WaitTask is woken by notifications instead of polling and streamed
// output can be read.
func NewTaskService(q queue.Queue, s storage.Store, opts ...Option) *Service {
	o := options{maxVCPUs: runtime.NumCPU(), logger: slog.New(slog.DiscardHandler), deadAfter: DeadAfterDefault}
	for _, f := range opts {
		f(&o)
	}
	svc := &Service{queue: q, store: s, opts: o}
	svc.notifier, _ = q.(queue.Notifier)
	svc.output, _ = q.(queue.OutputStream)
	return svc
}

// Retry and timeout policy per task type.
const (
	createMaxRetry = 2
	createTimeout  = 10 * time.Minute
	execMaxRetry   = 2 // only when the agent could not be reached: see worker
	execTimeout    = time.Hour
	deleteMaxRetry = 5
	deleteTimeout  = 5 * time.Minute
)

// CreateVMOptions describes a VM to create.
type CreateVMOptions struct {
	Name     string
	VCPUs    int
	MemoryMB int
	Labels   map[string]string
	Env      map[string]string // default environment of every command in the VM
	// Network is types.NetworkNone or types.NetworkNAT; empty takes the
	// service's default (WithDefaultNetwork) or, without one, that of the
	// worker that creates the VM.
	Network string
	// TTL, when positive, makes the owning worker delete the VM that long
	// after its creation (VM.ExpiresAt). Zero: the VM lives until deleted.
	TTL time.Duration
	// OnExpiry is what happens when the TTL (this one or a later
	// SetVMTTL's) runs out: types.ExpiryDelete (empty: the same) or
	// types.ExpiryPause (suspend or pause, and clear the expiry).
	OnExpiry string
	// Tools are mise tool specs (node@22, npm:prettier@3,
	// http:NAME[url=URL]@VERSION) that the worker installs on its host and
	// delivers read-only into the VM, on PATH for every command, together
	// with mise itself. Workers add their configured defaults. A bad spec
	// returns types.ErrInvalid naming it; an install that fails fails the
	// VM with mise's reason.
	Tools []string
	// FromSnapshot (a snapshot's name or id) or Template (a template's
	// name) starts the VM by restoring that snapshot instead of booting:
	// it gets the snapshot's memory, disk, size, network mode and tools,
	// with its own identity. VCPUs and MemoryMB may be left zero; given,
	// they must match. Tools must be empty. At most one of the two.
	FromSnapshot string
	Template     string
}

func (s *Service) CreateVMTask(ctx context.Context, name string, vcpus, memoryMB int) (uuid.UUID, error) {
	return s.CreateVMTaskWithOptions(ctx, CreateVMOptions{Name: name, VCPUs: vcpus, MemoryMB: memoryMB})
}

func (s *Service) CreateVMTaskWithOptions(ctx context.Context, o CreateVMOptions) (uuid.UUID, error) {
	from, err := s.cloneSource(ctx, &o)
	if err != nil {
		return uuid.Nil, err
	}
	id := uuid.New()
	// Left to the worker, the mode is decided when it claims the VM; the
	// row holds none until then.
	workerNetwork := o.Network == "" && s.opts.defaultNetwork == ""
	network := cmp.Or(o.Network, s.opts.defaultNetwork, types.NetworkNone)
	spec := types.VMSpec{ID: id.String(), Name: o.Name, VCPUs: o.VCPUs, MemoryMB: o.MemoryMB, Labels: o.Labels, Env: o.Env, Network: network}
	if err := spec.Validate(s.opts.maxVCPUs); err != nil {
		return uuid.Nil, err
	}
	if err := s.checkTTL(o.TTL); err != nil {
		return uuid.Nil, err
	}
	if err := types.CheckOnExpiry(o.OnExpiry); err != nil {
		return uuid.Nil, err
	}
	if err := checkToolSpecs(o.Tools); err != nil {
		return uuid.Nil, err
	}
	sc := scopeOf(ctx)
	now := time.Now().UTC()
	// Provider stays empty: the worker that claims the VM records the
	// backend it really runs on, which this process cannot know.
	vm := &types.VM{ID: spec.ID, Name: o.Name, VCPUs: o.VCPUs, MemoryMB: o.MemoryMB, State: types.VMPending,
		Labels: o.Labels, Env: o.Env, Network: network, Tenant: sc.Tenant, OnExpiry: o.OnExpiry, CreatedAt: now, UpdatedAt: now}
	createQueue := queue.SharedQueue
	payload := queue.VMCreatePayload{VMID: vm.ID, Tools: o.Tools, DefaultNetwork: workerNetwork}
	if from != nil {
		// Only the worker holding the snapshot's files can restore it.
		vm.FromSnapshot, createQueue = from.ID, queue.WorkerQueue(from.Owner)
		payload.FromSnapshot, payload.DefaultNetwork = from.ID, false
	}
	if o.TTL > 0 {
		exp := now.Add(o.TTL)
		vm.ExpiresAt = &exp
	}
	if err := s.store.CreateVMWithin(ctx, vm, sc.Limits); err != nil {
		if errors.Is(err, types.ErrConflict) {
			return uuid.Nil, fmt.Errorf("%w: a vm named %q already exists; pick another name or delete it first", types.ErrConflict, o.Name)
		}
		return uuid.Nil, fmt.Errorf("recording vm %s: %w", o.Name, err)
	}
	t, err := queue.NewVMCreateTask(id.String(), payload)
	if err == nil {
		err = s.submit(ctx, t, queue.EnqueueOptions{Queue: createQueue, MaxRetry: createMaxRetry, Timeout: createTimeout})
	}
	if err != nil {
		// Nothing exists outside the database yet: retire the row so no
		// half-created VM remains and the name is free again.
		bg := context.WithoutCancel(ctx)
		if _, e := s.store.UpdateVMState(bg, vm.ID, types.VMDeleting, err.Error()); e == nil {
			_, _ = s.store.UpdateVMState(bg, vm.ID, types.VMDeleted, err.Error())
		}
		return uuid.Nil, err
	}
	return id, nil
}

// ExecOptions adds to a command how it is delivered.
type ExecOptions struct {
	// Stream makes the worker publish output live, for StreamOutput.
	Stream bool
}

func (s *Service) ExecuteCommandTask(ctx context.Context, vmID, command string, args []string) (uuid.UUID, error) {
	return s.ExecuteCommandTaskWithOptions(ctx, vmID, types.Command{Cmd: command, Args: args}, ExecOptions{})
}

func (s *Service) ExecuteCommandTaskWithOptions(ctx context.Context, vmID string, cmd types.Command, o ExecOptions) (uuid.UUID, error) {
	if err := cmd.Validate(); err != nil {
		return uuid.Nil, err
	}
	vm, err := s.runningVM(ctx, vmID, "run a command in")
	if err != nil {
		return uuid.Nil, err
	}
	if o.Stream && s.output == nil {
		return uuid.Nil, fmt.Errorf("%w: this queue cannot stream output", types.ErrNotSupported)
	}
	id := uuid.New()
	t, err := queue.NewVMExecuteTask(id.String(), queue.VMExecutePayload{VMID: vm.ID, Command: cmd, Stream: o.Stream})
	if err != nil {
		return uuid.Nil, err
	}
	timeout := execTimeout
	if cmd.Timeout > 0 {
		timeout = cmd.Timeout + time.Minute
	}
	return id, s.submit(ctx, t, queue.EnqueueOptions{Queue: queue.WorkerQueue(vm.Owner), MaxRetry: execMaxRetry, Timeout: timeout})
}

func (s *Service) RunJobTask(ctx context.Context, vmID string, cmds []types.Command, stopOnFailure bool) (uuid.UUID, error) {
	if len(cmds) == 0 {
		return uuid.Nil, fmt.Errorf("%w: a job needs at least one command", types.ErrInvalid)
	}
	for i, c := range cmds {
		if err := c.Validate(); err != nil {
			return uuid.Nil, fmt.Errorf("command %d: %w", i+1, err)
		}
	}
	vm, err := s.runningVM(ctx, vmID, "run a job in")
	if err != nil {
		return uuid.Nil, err
	}
	id := uuid.New()
	now := time.Now().UTC()
	job := &types.Job{ID: id.String(), VMID: vm.ID, TaskID: id.String(), Commands: cmds, StopOnFailure: stopOnFailure,
		State: types.JobPending, CreatedAt: now, UpdatedAt: now}
	if err := s.store.CreateJob(ctx, job); err != nil {
		return uuid.Nil, fmt.Errorf("recording job: %w", err)
	}
	t, err := queue.NewJobRunTask(id.String(), queue.JobRunPayload{JobID: job.ID, VMID: vm.ID})
	if err != nil {
		return uuid.Nil, err
	}
	return id, s.submit(ctx, t, queue.EnqueueOptions{Queue: queue.WorkerQueue(vm.Owner), MaxRetry: execMaxRetry, Timeout: execTimeout})
}

func (s *Service) DeleteVMTask(ctx context.Context, vmID string) (uuid.UUID, error) {
	return s.vmTask(ctx, vmID, types.TaskVMDelete)
}

func (s *Service) StopVMTask(ctx context.Context, vmID string) (uuid.UUID, error) {
	return s.vmTask(ctx, vmID, types.TaskVMStop)
}

func (s *Service) StartVMTask(ctx context.Context, vmID string) (uuid.UUID, error) {
	return s.vmTask(ctx, vmID, types.TaskVMStart)
}

func (s *Service) vmTask(ctx context.Context, vmID string, typ types.TaskType) (uuid.UUID, error) {
	id := uuid.New()
	for attempt := 0; ; attempt++ {
		vm, err := s.getVM(ctx, vmID)
		if err != nil {
			return uuid.Nil, err
		}
		if typ == types.TaskVMDelete {
			if done, err := s.deleteLost(ctx, id, vm); done || err != nil {
				if err == nil {
					return id, nil
				}
				if errors.Is(err, errMoved) && attempt < 3 {
					continue // the VM moved meanwhile (its owner took it back): look again
				}
				return uuid.Nil, err
			}
		} else if err := s.checkOwner(ctx, vm, strings.TrimPrefix(string(typ), "vm:")); err != nil {
			return uuid.Nil, err
		}
		switch {
		case typ == types.TaskVMDelete && vm.State == types.VMDeleted:
			return id, s.recordDone(ctx, id, typ, vm.ID, "vm was already deleted")
		case typ == types.TaskVMDelete && vm.Owner == "" && vm.State == types.VMPending:
			// No worker has touched it, so nothing exists outside the
			// database: retire it here. If a worker claims it meanwhile the
			// transition fails and the task goes to that worker instead.
			if _, err := s.store.UpdateVMState(ctx, vm.ID, types.VMDeleting, ""); err == nil {
				if _, err := s.store.UpdateVMState(ctx, vm.ID, types.VMDeleted, ""); err != nil {
					return uuid.Nil, fmt.Errorf("deleting vm %s: %w", vm.ID, err)
				}
				return id, s.recordDone(ctx, id, typ, vm.ID, "vm was deleted before any worker created it")
			} else if !errors.Is(err, types.ErrConflict) || attempt > 3 {
				return uuid.Nil, fmt.Errorf("deleting vm %s: %w", vm.ID, err)
			}
			continue
		case typ == types.TaskVMStop && vm.State != types.VMRunning:
			return uuid.Nil, fmt.Errorf("%w: vm %s is %s; only a running vm can be stopped", types.ErrConflict, vm.ID, vm.State)
		case typ == types.TaskVMStart && vm.State != types.VMStopped:
			return uuid.Nil, fmt.Errorf("%w: vm %s is %s; only a stopped vm can be started", types.ErrConflict, vm.ID, vm.State)
		case vm.Owner == "":
			return uuid.Nil, fmt.Errorf("%w: vm %s is %s and no worker has claimed it yet; wait for its create task with `aether-cli task wait %s`", types.ErrConflict, vm.ID, vm.State, vm.ID)
		}
		var t *types.Task
		switch typ {
		case types.TaskVMDelete:
			t, err = queue.NewVMDeleteTask(id.String(), queue.VMDeletePayload{VMID: vm.ID})
		case types.TaskVMStop:
			t, err = queue.NewVMStopTask(id.String(), queue.VMStopPayload{VMID: vm.ID})
		default:
			t, err = queue.NewVMStartTask(id.String(), queue.VMStartPayload{VMID: vm.ID})
		}
		if err != nil {
			return uuid.Nil, err
		}
		return id, s.submit(ctx, t, queue.EnqueueOptions{Queue: queue.WorkerQueue(vm.Owner), MaxRetry: deleteMaxRetry, Timeout: deleteTimeout})
	}
}

// recordDone stores a task that needed no worker.
func (s *Service) recordDone(ctx context.Context, id uuid.UUID, typ types.TaskType, vmID, note string) error {
	now := time.Now().UTC()
	res, _ := json.Marshal(map[string]string{"vm_id": vmID, "note": note})
	t := &types.Task{ID: id.String(), Type: typ, VMID: vmID, State: types.TaskSucceeded, Result: res,
		CreatedAt: now, UpdatedAt: now, FinishedAt: &now}
	if err := s.store.CreateTask(ctx, t); err != nil {
		return fmt.Errorf("recording task: %w", err)
	}
	return nil
}

// submit records the task, then enqueues it. If the queue refuses, the task
// is marked failed so that it never silently vanishes.
func (s *Service) submit(ctx context.Context, t *types.Task, o queue.EnqueueOptions) error {
	t.Queue = o.Queue // so that recovery and CancelTask find it there
	if err := s.store.CreateTask(ctx, t); err != nil {
		return fmt.Errorf("recording %s task: %w", t.Type, err)
	}
	if err := s.queue.Enqueue(ctx, t, o); err != nil {
		st, msg := types.TaskFailed, err.Error()
		_, _ = s.store.UpdateTask(context.WithoutCancel(ctx), t.ID, storage.TaskUpdate{State: &st, Error: &msg})
		return err
	}
	s.opts.logger.Debug("task submitted", "task_id", t.ID, "type", t.Type, "vm_id", t.VMID, "queue", o.Queue)
	return nil
}

func parseID(kind, id string) (uuid.UUID, error) {
	u, err := uuid.Parse(id)
	if err != nil {
		return uuid.Nil, fmt.Errorf("%w: %s id %q is not a UUID; list them with `aether-cli %s list`", types.ErrInvalid, kind, id, kind)
	}
	return u, nil
}

func (s *Service) getVM(ctx context.Context, vmID string) (*types.VM, error) {
	u, err := parseID("vm", vmID)
	if err != nil {
		return nil, err
	}
	return s.GetVM(ctx, u)
}

func (s *Service) runningVM(ctx context.Context, vmID, what string) (*types.VM, error) {
	vm, err := s.getVM(ctx, vmID)
	if err != nil {
		return nil, err
	}
	if err := s.checkOwner(ctx, vm, what); err != nil {
		return nil, err
	}
	switch vm.State {
	case types.VMRunning:
		return vm, nil
	case types.VMStopped:
		return nil, fmt.Errorf("%w: cannot %s vm %s: it is stopped; start it with `aether-cli vm start %s`", types.ErrConflict, what, vm.ID, vm.ID)
	case types.VMPaused, types.VMSuspended:
		return nil, fmt.Errorf("%w: cannot %s vm %s: it is %s; resume it with `aether-cli vm resume %s`", types.ErrConflict, what, vm.ID, vm.State, vm.ID)
	case types.VMDeleted, types.VMDeleting:
		return nil, fmt.Errorf("%w: cannot %s vm %s: it is %s; create a new one with `aether-cli vm create`", types.ErrConflict, what, vm.ID, vm.State)
	case types.VMFailed:
		return nil, fmt.Errorf("%w: cannot %s vm %s: it failed (%s); delete it and create a new one", types.ErrConflict, what, vm.ID, vm.Error)
	default:
		return nil, fmt.Errorf("%w: cannot %s vm %s: it is still %s; wait with `aether-cli task wait %s`", types.ErrConflict, what, vm.ID, vm.State, vm.ID)
	}
}

func (s *Service) GetVM(ctx context.Context, vmID uuid.UUID) (*types.VM, error) {
	vm, err := s.store.GetVM(ctx, vmID.String())
	if errors.Is(err, types.ErrNotFound) || (err == nil && !scopeOf(ctx).sees(vm.Tenant)) {
		return nil, vmNotFound(vmID.String())
	}
	return vm, err
}

// vmNotFound is the one answer for a VM that is missing or another
// tenant's, so that the two cannot be told apart.
func vmNotFound(id string) error {
	return fmt.Errorf("%w: vm %s does not exist; list VMs with `aether-cli vm list`", types.ErrNotFound, id)
}

func (s *Service) GetVMStatus(ctx context.Context, vmID uuid.UUID) (types.VMState, error) {
	vm, err := s.GetVM(ctx, vmID)
	if err != nil {
		return "", err
	}
	return vm.State, nil
}

func (s *Service) ListVMs(ctx context.Context) ([]*types.VM, error) {
	return s.ListVMsWithOptions(ctx, ListVMsOptions{})
}

func (s *Service) ListVMsWithOptions(ctx context.Context, o ListVMsOptions) ([]*types.VM, error) {
	if o.Limit < 0 {
		return nil, fmt.Errorf("%w: limit %d is negative", types.ErrInvalid, o.Limit)
	}
	f := storage.VMFilter{Labels: o.Labels, Limit: o.Limit}
	if o.After != "" {
		after, err := parseID("vm", o.After)
		if err != nil {
			return nil, err
		}
		f.After = after.String()
	}
	if sc := scopeOf(ctx); !sc.Admin {
		f.Tenant = &sc.Tenant
	}
	return s.store.ListVMs(ctx, f)
}

func (s *Service) SetVMTTL(ctx context.Context, vmID uuid.UUID, ttl time.Duration) (*types.VM, error) {
	if ttl <= 0 {
		return nil, fmt.Errorf("%w: ttl %s must be positive, e.g. 10m", types.ErrInvalid, ttl)
	}
	if err := s.checkTTL(ttl); err != nil {
		return nil, err
	}
	if _, err := s.GetVM(ctx, vmID); err != nil {
		return nil, err
	}
	at := time.Now().UTC().Add(ttl)
	return s.store.SetVMExpiry(ctx, vmID.String(), &at)
}

func (s *Service) checkTTL(ttl time.Duration) error {
	switch {
	case ttl < 0:
		return fmt.Errorf("%w: ttl %s is negative", types.ErrInvalid, ttl)
	case s.opts.maxTTL > 0 && ttl > s.opts.maxTTL:
		return fmt.Errorf("%w: ttl %s is longer than the %s this deployment allows", types.ErrInvalid, ttl, s.opts.maxTTL)
	}
	return nil
}

func (s *Service) GetExecutions(ctx context.Context, vmID uuid.UUID) ([]*types.Execution, error) {
	if _, err := s.GetVM(ctx, vmID); err != nil {
		return nil, err
	}
	return s.store.ListExecutions(ctx, vmID.String())
}

func (s *Service) GetExecution(ctx context.Context, id uuid.UUID) (*types.Execution, error) {
	e, err := s.store.GetExecution(ctx, id.String())
	if errors.Is(err, types.ErrNotFound) || (err == nil && !s.seesVM(ctx, e.VMID)) {
		return nil, fmt.Errorf("%w: execution %s does not exist", types.ErrNotFound, id)
	}
	return e, err
}

// seesVM reports whether the caller's scope may see the VM with id.
func (s *Service) seesVM(ctx context.Context, vmID string) bool {
	sc := scopeOf(ctx)
	if sc.Admin {
		return true
	}
	vm, err := s.store.GetVM(ctx, vmID)
	return err == nil && sc.sees(vm.Tenant)
}

func (s *Service) GetTask(ctx context.Context, id uuid.UUID) (*types.Task, error) {
	t, err := s.store.GetTask(ctx, id.String())
	if errors.Is(err, types.ErrNotFound) || (err == nil && !scopeOf(ctx).Admin && !s.seesTask(ctx, t)) {
		return nil, fmt.Errorf("%w: task %s does not exist", types.ErrNotFound, id)
	}
	return t, err
}

// seesTask reports whether the caller's tenant may see t: a task on one
// of its VMs, or one on one of its snapshots (snapshot:delete names no
// VM; template:build names its builder VM).
func (s *Service) seesTask(ctx context.Context, t *types.Task) bool {
	if t.VMID != "" {
		return s.seesVM(ctx, t.VMID)
	}
	if t.Type == types.TaskSnapshotDelete {
		p, err := queue.Decode[queue.SnapshotDeletePayload](t.Payload)
		if err != nil {
			return false
		}
		sn, err := s.store.GetSnapshot(ctx, p.SnapshotID)
		return err == nil && scopeOf(ctx).sees(sn.Tenant)
	}
	return false
}

func (s *Service) GetJob(ctx context.Context, id uuid.UUID) (*types.Job, error) {
	j, err := s.store.GetJob(ctx, id.String())
	if errors.Is(err, types.ErrNotFound) || (err == nil && !s.seesVM(ctx, j.VMID)) {
		return nil, fmt.Errorf("%w: job %s does not exist", types.ErrNotFound, id)
	}
	return j, err
}

func (s *Service) ListWorkers(ctx context.Context) ([]*types.Worker, error) {
	if !scopeOf(ctx).Admin {
		return nil, fmt.Errorf("%w: workers are visible to admin keys only", types.ErrNotFound)
	}
	ws, err := s.store.ListWorkers(ctx)
	if err != nil {
		return nil, err
	}
	// A dead worker cannot say it is unhealthy: its last heartbeat would
	// claim it is.
	for _, w := range ws {
		if s.silent(w) {
			w.Healthy, w.Detail = false, "has not reported since "+w.LastSeen.UTC().Format(time.RFC3339)
		}
	}
	return ws, nil
}

// waitFallback bounds how long WaitTask trusts notifications alone (they
// can be lost if Redis restarts); waitPoll is its polling period when it
// has no notifications at all (no notifier, or Redis down).
const (
	waitFallback = 2 * time.Second
	waitPoll     = 500 * time.Millisecond
)

// Reads of a waited task that fail because PostgreSQL cannot be reached
// are retried with a backoff from readRetryMin to readRetryMax, for as
// long as the outage lasts up to readOutageMax (a restart of the server
// takes seconds; a longer outage is reported).
const (
	readRetryMin  = 100 * time.Millisecond
	readRetryMax  = 5 * time.Second
	readOutageMax = 90 * time.Second
)

func (s *Service) WaitTask(ctx context.Context, id uuid.UUID) (*types.Task, error) {
	var events <-chan struct{}
	period := waitPoll
	if s.notifier != nil {
		ev, stop, err := s.notifier.WatchTask(ctx, id.String())
		switch {
		case err == nil:
			defer stop()
			events, period = ev, waitFallback
		case ctx.Err() != nil:
			return nil, fmt.Errorf("waiting for task %s: %w", id, ctx.Err())
		default:
			// PostgreSQL holds the truth; notifications only make waiting
			// quicker. Poll it instead.
			s.opts.logger.Warn("task notifications unavailable; polling storage", "task_id", id, "err", err)
		}
	}
	tick := time.NewTicker(period)
	defer tick.Stop()
	for {
		t, err := s.getTaskRetrying(ctx, id)
		if err != nil {
			return t, err
		}
		if t.State.Terminal() {
			return t, nil
		}
		select {
		case <-ctx.Done():
			return t, fmt.Errorf("waiting for task %s (still %s): %w", id, t.State, ctx.Err())
		case _, ok := <-events:
			if !ok { // the subscription ended: poll from now on
				events = nil
				tick.Reset(waitPoll)
			}
		case <-tick.C:
		}
	}
}

// getTaskRetrying is GetTask riding out a PostgreSQL outage.
func (s *Service) getTaskRetrying(ctx context.Context, id uuid.UUID) (*types.Task, error) {
	return retryUnavailable(ctx, s.opts.logger, "task "+id.String(), func() (*types.Task, error) { return s.GetTask(ctx, id) })
}

// retryUnavailable calls f again, with a bounded backoff, while it fails
// with types.ErrUnavailable (PostgreSQL restarting), for up to
// readOutageMax and while ctx lives. Other errors return at once.
func retryUnavailable[T any](ctx context.Context, log *slog.Logger, what string, f func() (T, error)) (T, error) {
	var outage time.Time
	delay := readRetryMin
	for {
		v, err := f()
		if err == nil || !errors.Is(err, types.ErrUnavailable) || ctx.Err() != nil {
			return v, err
		}
		if outage.IsZero() {
			outage = time.Now()
			log.Warn("storage unavailable; retrying", "reading", what, "err", err)
		} else if time.Since(outage) > readOutageMax {
			return v, fmt.Errorf("reading %s: storage unreachable for %s: %w", what, readOutageMax, err)
		}
		select {
		case <-ctx.Done():
			return v, fmt.Errorf("reading %s: %w (storage: %v)", what, ctx.Err(), err)
		case <-time.After(delay):
		}
		delay = min(2*delay, readRetryMax)
	}
}

func (s *Service) CancelTask(ctx context.Context, id uuid.UUID) error {
	t, err := s.GetTask(ctx, id)
	if err != nil || t.State.Terminal() {
		return err
	}
	st, msg := types.TaskFailed, "cancelled"
	if _, err := s.store.UpdateTask(ctx, t.ID, storage.TaskUpdate{State: &st, Error: &msg}); err != nil {
		return fmt.Errorf("cancelling task %s: %w", id, err)
	}
	// A create task starts in the shared queue and, once its VM is
	// claimed, its retries may have been handed on to the owner's queue.
	// Rows from before tasks recorded their queue fall back to guessing it.
	queues := []string{queue.SharedQueue}
	if t.Queue != "" {
		queues = []string{t.Queue}
		if t.Type == types.TaskVMCreate && t.VMID != "" {
			if vm, err := s.store.GetVM(ctx, t.VMID); err == nil && vm.Owner != "" && queue.WorkerQueue(vm.Owner) != t.Queue {
				queues = append(queues, queue.WorkerQueue(vm.Owner))
			}
		}
	} else if t.VMID != "" {
		if vm, err := s.store.GetVM(ctx, t.VMID); err == nil && vm.Owner != "" {
			if t.Type == types.TaskVMCreate {
				queues = append(queues, queue.WorkerQueue(vm.Owner))
			} else {
				queues = []string{queue.WorkerQueue(vm.Owner)}
			}
		}
	}
	for _, q := range queues {
		if err := s.queue.Cancel(ctx, t.ID, q); err != nil {
			return err
		}
	}
	if s.notifier != nil {
		_ = s.notifier.NotifyTask(ctx, t.ID)
	}
	return nil
}

func (s *Service) StreamOutput(ctx context.Context, taskID uuid.UUID, stdout, stderr io.Writer) (*queue.ExitInfo, error) {
	if _, err := s.GetTask(ctx, taskID); err != nil {
		return nil, err
	}
	return s.streamOutput(ctx, taskID, stdout, stderr)
}

func (s *Service) streamOutput(ctx context.Context, taskID uuid.UUID, stdout, stderr io.Writer) (*queue.ExitInfo, error) {
	if s.output == nil {
		return nil, fmt.Errorf("%w: this queue cannot stream output", types.ErrNotSupported)
	}
	return s.output.ReadOutput(ctx, taskID.String(), func(c queue.OutputChunk) error {
		w := stdout
		if c.Kind == queue.OutputStderr {
			w = stderr
		}
		_, err := w.Write(c.Data)
		return err
	})
}

// ExecResult is how an interactive command ended.
type ExecResult struct {
	TaskID   uuid.UUID
	ExitCode int
	TimedOut bool
	// Err is set when the command could not run at all (the task failed),
	// or when its outcome is unknown (see OutcomeUnknown).
	Err string
	// OutcomeUnknown: the command started, then the worker running it was
	// lost and its result could not be had from the guest. It was not run
	// again (at most once), so whether it did its work is unknown; Err
	// says so (types.ErrOutcomeUnknown's text). ExitCode means nothing then.
	OutcomeUnknown bool
}

// drainGrace is how long Exec keeps reading output after its task ended
// without an exit chunk (a worker crash), before trusting the stored state.
const drainGrace = 2 * time.Second

// countingWriter counts what reached w and keeps w's first error, so that
// Exec can tell a caller's broken writer from a broken stream and write
// only the part of the stored output the stream did not deliver.
type countingWriter struct {
	w   io.Writer
	n   int64
	err error
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	if err != nil && c.err == nil {
		c.err = err
	}
	return n, err
}

// writeRest writes what of the stored output s the caller has not had.
func (c *countingWriter) writeRest(s string) error {
	if c.err != nil || int64(len(s)) <= c.n {
		return c.err
	}
	_, err := io.WriteString(c, s[c.n:])
	return err
}

func (s *Service) Exec(ctx context.Context, vmID string, cmd types.Command, stdout, stderr io.Writer) (*ExecResult, error) {
	id, err := s.ExecuteCommandTaskWithOptions(ctx, vmID, cmd, ExecOptions{Stream: true})
	if err != nil {
		return nil, err
	}
	res := &ExecResult{TaskID: id}
	out, errOut := &countingWriter{w: stdout}, &countingWriter{w: stderr}
	// The reads outlive the caller's ctx: once it ends, the task is
	// cancelled and the output read on until the exit chunk (or drainGrace),
	// so that the result of the killed command is returned and recorded.
	bg := context.WithoutCancel(ctx)
	readCtx, stopRead := context.WithCancel(bg)
	defer stopRead()
	type readOut struct {
		exit *queue.ExitInfo
		err  error
	}
	done := make(chan readOut, 1)
	go func() {
		ei, err := s.streamOutput(readCtx, id, out, errOut)
		done <- readOut{ei, err}
	}()
	taskDone := make(chan *types.Task, 1)
	waitErr := make(chan error, 1)
	go func() {
		t, err := s.WaitTask(readCtx, id)
		if err == nil {
			taskDone <- t
		} else if readCtx.Err() == nil {
			waitErr <- err
		}
	}()
	// callerErr is the caller's cancellation, kept once seen: every return
	// after it carries it, whatever the remote command did.
	var callerErr error
	callerDone := ctx.Done()
	var grace <-chan time.Time
	var ended *types.Task
	streamDead := false
	for {
		select {
		case r := <-done:
			if r.err == nil {
				res.ExitCode, res.TimedOut, res.Err = r.exit.ExitCode, r.exit.TimedOut, r.exit.Error
				res.OutcomeUnknown = types.OutcomeUnknown(res.Err)
				if callerErr == nil {
					callerErr = ctx.Err()
				}
				return res, callerErr
			}
			if werr := errors.Join(out.err, errOut.err); werr != nil {
				return res, errors.Join(werr, callerErr) // the caller's writer broke
			}
			// The stream broke (Redis down or restarted), not the command:
			// PostgreSQL still records how it ends.
			s.opts.logger.Warn("output stream lost; waiting for the task in storage", "task_id", id, "err", r.err)
			streamDead = true
			if ended != nil {
				return res, errors.Join(s.finishExec(bg, ended, res, out, errOut), callerErr)
			}
		case <-callerDone:
			// Kill the remote command, then keep reading until its exit chunk.
			callerErr, callerDone = ctx.Err(), nil
			if err := s.CancelTask(bg, id); err != nil {
				s.opts.logger.Warn("cancelling an abandoned exec", "task_id", id, "err", err)
			}
			if !streamDead {
				grace = time.After(drainGrace)
			}
		case t := <-taskDone:
			ended = t
			if streamDead {
				return res, errors.Join(s.finishExec(bg, t, res, out, errOut), callerErr)
			}
			if grace == nil {
				grace = time.After(drainGrace)
			}
		case err := <-waitErr:
			return res, errors.Join(err, callerErr)
		case <-grace:
			stopRead()
			if ended == nil {
				// Only the caller's cancellation started the grace: the
				// task row is read as it now is.
				t, err := s.getTaskRetrying(bg, id)
				if err != nil {
					return res, errors.Join(err, callerErr)
				}
				ended = t
			}
			return res, errors.Join(s.finishExec(bg, ended, res, out, errOut), callerErr)
		}
	}
}

// finishExec completes res from storage once the task t ended without the
// stream's exit chunk: the stored execution's exit code, and the output the
// stream did not deliver; a failed task's error (an outcome-unknown one
// flagged as such).
func (s *Service) finishExec(ctx context.Context, t *types.Task, res *ExecResult, out, errOut *countingWriter) error {
	if t.State == types.TaskFailed && res.Err == "" {
		res.Err = t.Error
	}
	e, err := retryUnavailable(ctx, s.opts.logger, "execution "+t.ID, func() (*types.Execution, error) { return s.store.GetExecution(ctx, t.ID) })
	switch {
	case err == nil:
		res.ExitCode, res.TimedOut = e.ExitCode, e.TimedOut
		if e.Error != "" && res.Err == "" {
			res.Err = e.Error
		}
		if err := errors.Join(out.writeRest(e.Stdout), errOut.writeRest(e.Stderr)); err != nil {
			return err
		}
	case errors.Is(err, types.ErrNotFound):
		if res.Err == "" {
			res.Err = "the command's task ended without a result"
		}
	default:
		return err
	}
	res.OutcomeUnknown = types.OutcomeUnknown(res.Err)
	return nil
}
