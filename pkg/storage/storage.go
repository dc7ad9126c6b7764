// Package storage defines Store, where Aetherium Core keeps its state. The
// PostgreSQL implementation is in storage/postgres and every implementation
// passes the shared suite in storage/storagetest.
package storage

import (
	"context"
	"encoding/json"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// VMFilter narrows ListVMs. The zero value lists every VM that is not deleted.
type VMFilter struct {
	Owner          string          // only VMs owned by this worker
	States         []types.VMState // only these states
	IncludeDeleted bool
	// Tenant, when set, keeps only that tenant's VMs ("" is the tenant of
	// VMs made without one). nil: every tenant.
	Tenant *string
	// Labels keeps only VMs carrying every one of these labels.
	Labels map[string]string
	// ExpiredBy keeps only VMs whose expires_at is at or before it.
	ExpiredBy *time.Time
	// After and Limit page through the list: only VMs after the one with
	// id After (in the list's order), at most Limit of them (0: all).
	After string
	Limit int
}

// Claim is what a worker records about a VM when it takes it on.
type Claim struct {
	// Owner is the worker's id. Required.
	Owner string
	// Provider is the backend the worker runs the VM on (its
	// orchestrator's Capabilities().Provider). Required.
	Provider string
	// Network, when set, is the VM's network mode as the worker decided it
	// for a VM whose creator left it to the worker (types.NetworkNone or
	// types.NetworkNAT). Empty keeps the stored mode.
	Network string
}

// VMCount is how many VMs are in one state for one provider.
type VMCount struct {
	State    types.VMState
	Provider string
	N        int
}

// TaskUpdate changes a task. Nil fields are left as they are.
type TaskUpdate struct {
	State    *types.TaskState
	Attempts *int
	Error    *string
	Result   json.RawMessage
	Queue    *string
	WorkerID *string
}

// OpenTaskFilter narrows ListOpenTasks. Zero fields do not filter.
type OpenTaskFilter struct {
	WorkerID string            // only tasks whose last attempt this worker ran
	VMID     string            // only this VM's tasks
	States   []types.TaskState // only these open states (default: all three)
	// UpdatedBefore keeps only tasks not updated since then.
	UpdatedBefore *time.Time
	Limit         int // at most this many (0: all)
}

// SnapshotUpdate changes a snapshot. Nil fields are left as they are.
type SnapshotUpdate struct {
	State     *types.SnapshotState
	Error     *string
	Dir       *string
	SizeBytes *int64
	Owner     *string
	Provider  *string
	VMID      *string
}

// ExecutionStart records that the guest agent reported a command's start.
type ExecutionStart struct {
	ID        string // the execution's id
	VMID      string
	TaskID    string
	PID       int // in the guest
	StartedAt time.Time
}

// Sandbox is a VM made through the E2B-compatible API (pkg/e2b).
type Sandbox struct {
	// VMID is the VM's id, which is also the sandbox id.
	VMID string
	// Template is the templateID it was made from.
	Template string
	// TokenHashes are the SHA-256 of its access tokens (envdAccessToken),
	// oldest first: create issues one, and every connect adds one.
	TokenHashes [][]byte
	CreatedAt   time.Time
}

// Template is what an E2B templateID names: the size and default
// environment of the VMs made from it.
type Template struct {
	Name     string
	VCPUs    int
	MemoryMB int
	// Env is the default environment of every command in its VMs.
	Env       map[string]string
	CreatedAt time.Time
}

// Store persists VMs, tasks, executions, jobs and workers.
//
// Missing rows return an error wrapping types.ErrNotFound; unique clashes
// return types.ErrConflict; an unreachable database returns
// types.ErrUnavailable. Cancelling ctx aborts the statement.
type Store interface {
	// CreateVM inserts a VM. Its name must be unique among VMs that are not
	// deleted (types.ErrConflict otherwise).
	CreateVM(ctx context.Context, vm *types.VM) error
	// CreateVMWithin is CreateVM that first checks, atomically with the
	// insert, that vm.Tenant's live VMs plus vm stay within lim; otherwise
	// it returns an error wrapping types.ErrLimit that names the limit and
	// the current use, and inserts nothing.
	CreateVMWithin(ctx context.Context, vm *types.VM, lim types.Limits) error
	// CountVMs counts the VMs that are not deleted by state and provider
	// (only pairs that have VMs), without reading the rows.
	CountVMs(ctx context.Context) ([]VMCount, error)
	// TenantUsage returns what a tenant's live (not deleted) VMs hold.
	TenantUsage(ctx context.Context, tenant string) (types.Usage, error)
	// SetVMConfinement records (nil: clears) how the VM's VMM is confined
	// (VM.Confinement). A missing or deleted VM is left alone and is not
	// an error. Idempotent.
	SetVMConfinement(ctx context.Context, id string, c *types.Confinement) error
	// SetVMExpiry sets (nil: clears) when the VM expires. A deleted VM
	// returns types.ErrConflict. Returns the updated VM.
	SetVMExpiry(ctx context.Context, id string, at *time.Time) (*types.VM, error)
	GetVM(ctx context.Context, id string) (*types.VM, error)
	ListVMs(ctx context.Context, f VMFilter) ([]*types.VM, error)
	// UpdateVMState moves a VM to state `to`, checking the transition with
	// types.CheckTransition atomically against the stored state. errMsg
	// replaces the VM's error text. Moving to the current state is a no-op
	// (besides errMsg), so retries are harmless. Returns the updated VM.
	UpdateVMState(ctx context.Context, id string, to types.VMState, errMsg string) (*types.VM, error)
	// UpdateOwnedVMState moves a VM from state `from` to `to` only if it is
	// in `from` and owned by owner, in one atomic step, so that a caller
	// that read the row earlier cannot overwrite a state another writer set
	// meanwhile (a stop or delete that began wins). errMsg replaces the
	// error text. It returns whether the VM was moved: false, with no
	// error, when the VM is missing, in another state or another worker's.
	// A transition types.CheckTransition refuses returns its error and
	// changes nothing. Idempotent in effect: a second call finds the VM in
	// `to` and returns false.
	UpdateOwnedVMState(ctx context.Context, id, owner string, from, to types.VMState, errMsg string) (bool, error)
	// ClaimVM makes c.Owner the VM's owner if it has none, recording in the
	// same step the backend that will run it (c.Provider) and, when
	// c.Network is set, its network mode, and returns the VM as it then
	// is. Claiming a VM one already owns changes nothing and returns it
	// (idempotent); a VM owned by another worker returns types.ErrConflict
	// naming the owner, a missing one types.ErrNotFound, an empty owner or
	// provider types.ErrInvalid.
	ClaimVM(ctx context.Context, id string, c Claim) (*types.VM, error)

	// CreateTask inserts a task; an existing id returns types.ErrConflict.
	CreateTask(ctx context.Context, t *types.Task) error
	GetTask(ctx context.Context, id string) (*types.Task, error)
	UpdateTask(ctx context.Context, id string, u TaskUpdate) (*types.Task, error)
	// ListTasks returns a VM's tasks, newest first.
	ListTasks(ctx context.Context, vmID string) ([]*types.Task, error)
	// ListOpenTasks returns the tasks that are pending, running or
	// retrying and match f, least recently updated first.
	ListOpenTasks(ctx context.Context, f OpenTaskFilter) ([]*types.Task, error)
	// FailOpenTasks fails every open task of vmID but exceptID with msg in
	// one statement and returns the tasks it ended. Idempotent: a second
	// call finds none.
	FailOpenTasks(ctx context.Context, vmID, exceptID, msg string) ([]*types.Task, error)

	// MarkExecutionStarted records a command's start. Recording the same
	// id again keeps the first record (idempotent).
	MarkExecutionStarted(ctx context.Context, s *ExecutionStart) error
	// GetExecutionStart returns a start record, or types.ErrNotFound.
	GetExecutionStart(ctx context.Context, id string) (*ExecutionStart, error)

	// MarkOwnerVMsLost moves every VM owner owns that is pending, creating,
	// running, stopping or stopped to types.VMLost with msg as its error,
	// in one statement, and returns the VMs it moved. Idempotent.
	MarkOwnerVMsLost(ctx context.Context, owner, msg string) ([]*types.VM, error)
	// CreateSnapshot inserts a snapshot or template. Its name must be
	// unique among the live (not deleted) ones of its kind
	// (types.ErrConflict otherwise).
	CreateSnapshot(ctx context.Context, sn *types.Snapshot) error
	// GetSnapshot returns a snapshot by id, or types.ErrNotFound.
	GetSnapshot(ctx context.Context, id string) (*types.Snapshot, error)
	// FindSnapshot returns the live snapshot of kind with name, or
	// types.ErrNotFound.
	FindSnapshot(ctx context.Context, kind types.SnapshotKind, name string) (*types.Snapshot, error)
	// ListSnapshots returns the live snapshots of kind ("" for both) by
	// name; tenant, when set, keeps only that tenant's.
	ListSnapshots(ctx context.Context, kind types.SnapshotKind, tenant *string) ([]*types.Snapshot, error)
	// UpdateSnapshot applies u and returns the snapshot as it then is.
	UpdateSnapshot(ctx context.Context, id string, u SnapshotUpdate) (*types.Snapshot, error)
	// ListSnapshotClones returns the VMs started from snapshot id that are
	// not deleted.
	ListSnapshotClones(ctx context.Context, id string) ([]*types.VM, error)

	// RunExclusive runs fn unless another caller anywhere holds the lock
	// named name, holding it while fn runs, and reports whether fn ran.
	// The lock ends with fn or with the connection that holds it, so a
	// crashed holder never keeps it.
	RunExclusive(ctx context.Context, name string, fn func(context.Context) error) (bool, error)

	// PutExecution inserts or replaces an execution by id (idempotent).
	PutExecution(ctx context.Context, e *types.Execution) error
	GetExecution(ctx context.Context, id string) (*types.Execution, error)
	// ListExecutions returns a VM's executions in the order they started.
	ListExecutions(ctx context.Context, vmID string) ([]*types.Execution, error)

	// CreateJob inserts a job (types.ErrConflict if the id exists).
	CreateJob(ctx context.Context, j *types.Job) error
	// GetJob returns the job with its executions in command order.
	GetJob(ctx context.Context, id string) (*types.Job, error)
	UpdateJobState(ctx context.Context, id string, state types.JobState, errMsg string) error

	// UpsertWorker records a worker's heartbeat.
	UpsertWorker(ctx context.Context, w *types.Worker) error
	ListWorkers(ctx context.Context) ([]*types.Worker, error)
	// GetWorker returns one worker, or types.ErrNotFound.
	GetWorker(ctx context.Context, id string) (*types.Worker, error)

	// CreateAPIKey inserts a key (types.ErrConflict if the id exists).
	CreateAPIKey(ctx context.Context, k *types.APIKey) error
	// GetAPIKey returns a key, revoked or not, or types.ErrNotFound.
	GetAPIKey(ctx context.Context, id string) (*types.APIKey, error)
	// ListAPIKeys returns every key, revoked ones included, oldest first.
	ListAPIKeys(ctx context.Context) ([]*types.APIKey, error)
	// RevokeAPIKey marks a key revoked. Revoking a revoked key is a no-op;
	// an unknown id returns types.ErrNotFound.
	RevokeAPIKey(ctx context.Context, id string) (*types.APIKey, error)

	// CreateSandbox records a sandbox of an existing VM (types.ErrNotFound
	// otherwise; types.ErrConflict if the VM has one already).
	CreateSandbox(ctx context.Context, sb *Sandbox) error
	// GetSandbox returns the sandbox of a VM, or types.ErrNotFound.
	GetSandbox(ctx context.Context, vmID string) (*Sandbox, error)
	// AddSandboxToken adds the hash of one more access token to a sandbox
	// (types.ErrNotFound if there is none). Not idempotent: adding a hash
	// twice stores it twice, which is harmless.
	AddSandboxToken(ctx context.Context, vmID string, hash []byte) error

	// CreateTemplate inserts a template (types.ErrConflict if the name is
	// taken, types.ErrInvalid for a size the schema refuses).
	CreateTemplate(ctx context.Context, tpl *Template) error
	// GetTemplate returns a template, or types.ErrNotFound.
	GetTemplate(ctx context.Context, name string) (*Template, error)
	// ListTemplates returns every template, by name.
	ListTemplates(ctx context.Context) ([]*Template, error)
	// DeleteTemplate removes a template; an unknown name returns
	// types.ErrNotFound. Sandboxes made from it keep running.
	DeleteTemplate(ctx context.Context, name string) error

	// AddVMTools records that VM vmID has the given tool versions (their
	// VMID is ignored; a zero AddedAt is now). A key the VM already has is
	// left as first recorded, so retries are harmless (idempotent). A
	// missing VM returns types.ErrNotFound and an empty key
	// types.ErrInvalid; then nothing is recorded.
	AddVMTools(ctx context.Context, vmID string, tools []types.VMTool) error
	// ListVMTools returns VM vmID's tool versions in the order they were
	// added (then by key). A VM without tools, or a missing one, gives an
	// empty list.
	ListVMTools(ctx context.Context, vmID string) ([]types.VMTool, error)
	// ToolKeysInUse returns the sorted, distinct tool cache keys held by
	// VMs that are not deleted, which the cache must not prune.
	ToolKeysInUse(ctx context.Context) ([]string, error)

	// Ping checks the connection.
	Ping(ctx context.Context) error
	// SchemaVersion returns the applied migration version and whether a
	// migration was left half-applied.
	SchemaVersion(ctx context.Context) (version uint, dirty bool, err error)
	Close()
}
