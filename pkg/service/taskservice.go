package service

import (
	"context"
	"io"
	"time"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// TaskService is Aetherium Core's public API: what a gateway (the HTTP API
// in pkg/api) or a command line wraps. Service implements it on PostgreSQL
// and Redis; pkg/client implements it over HTTP.
//
// Every method takes ctx first; cancelling it abandons the call, never the
// work already submitted (a submitted task runs on). Errors wrap one of the
// kinds in pkg/types, so callers map them to exit codes or HTTP statuses
// with errors.Is: types.ErrNotFound for a missing VM, task, execution or
// job (and for one of another tenant: see WithScope), types.ErrInvalid for
// input that can never succeed, types.ErrConflict for a request that
// clashes with the current state, types.ErrLimit for a tenant's quota and
// types.ErrUnavailable when PostgreSQL, Redis or a worker cannot be reached.
//
// Ids: the id a *Task method returns names the task and also what it
// creates (the VM of CreateVMTask, the execution of ExecuteCommandTask, the
// job of RunJobTask).
type TaskService interface {
	// CreateVMTask submits the creation of a VM with default options.
	CreateVMTask(ctx context.Context, name string, vcpus, memoryMB int) (uuid.UUID, error)
	// CreateVMTaskWithOptions records a pending VM and submits its
	// creation. Invalid specs return types.ErrInvalid and a name already
	// taken by a live VM of the same tenant types.ErrConflict; in both
	// cases nothing is recorded. Going over the scope's limits returns
	// types.ErrLimit. Not idempotent: each call makes a new VM.
	CreateVMTaskWithOptions(ctx context.Context, o CreateVMOptions) (uuid.UUID, error)

	// ExecuteCommandTask submits a command to a running VM.
	ExecuteCommandTask(ctx context.Context, vmID, command string, args []string) (uuid.UUID, error)
	// ExecuteCommandTaskWithOptions submits cmd to a running VM. The
	// execution is recorded once the command ends, whatever its exit code.
	// A VM that is not running returns types.ErrConflict saying why.
	ExecuteCommandTaskWithOptions(ctx context.Context, vmID string, cmd types.Command, o ExecOptions) (uuid.UUID, error)
	// RunJobTask submits an ordered list of commands to run in one VM.
	// With stopOnFailure the first failing command ends the job.
	RunJobTask(ctx context.Context, vmID string, cmds []types.Command, stopOnFailure bool) (uuid.UUID, error)

	// DeleteVMTask submits the removal of a VM and everything it holds.
	// Deleting a deleted VM succeeds at once (idempotent).
	DeleteVMTask(ctx context.Context, vmID string) (uuid.UUID, error)
	// StopVMTask submits stopping a running VM (types.ErrConflict if it
	// is not running).
	StopVMTask(ctx context.Context, vmID string) (uuid.UUID, error)
	// StartVMTask submits starting a stopped VM (types.ErrConflict if it
	// is not stopped).
	StartVMTask(ctx context.Context, vmID string) (uuid.UUID, error)

	// GetVM returns a VM, deleted or not.
	GetVM(ctx context.Context, vmID uuid.UUID) (*types.VM, error)
	// GetVMStatus returns a VM's state.
	GetVMStatus(ctx context.Context, vmID uuid.UUID) (types.VMState, error)
	// ListVMs returns the caller's VMs that are not deleted, oldest first.
	ListVMs(ctx context.Context) ([]*types.VM, error)
	// ListVMsWithOptions is ListVMs filtered by labels and paged.
	ListVMsWithOptions(ctx context.Context, o ListVMsOptions) ([]*types.VM, error)
	// SetVMTTL makes the VM expire ttl from now, replacing any earlier
	// expiry. ttl must be positive; a deleted VM returns
	// types.ErrConflict. Returns the updated VM.
	SetVMTTL(ctx context.Context, vmID uuid.UUID, ttl time.Duration) (*types.VM, error)

	// GetExecutions returns a VM's executions in the order they started.
	GetExecutions(ctx context.Context, vmID uuid.UUID) ([]*types.Execution, error)
	// GetExecution returns one execution (its id is its exec task's id).
	GetExecution(ctx context.Context, id uuid.UUID) (*types.Execution, error)
	// GetTask returns a task.
	GetTask(ctx context.Context, id uuid.UUID) (*types.Task, error)
	// WaitTask blocks until the task succeeds or fails, or ctx ends, and
	// returns the task as it then is. A failed task is returned without
	// error: its Error field says why.
	WaitTask(ctx context.Context, id uuid.UUID) (*types.Task, error)
	// CancelTask cancels a task: removed from its queue if it has not
	// started, its command killed if it runs. The task ends failed with
	// "cancelled". Cancelling an ended task does nothing.
	CancelTask(ctx context.Context, id uuid.UUID) error
	// GetJob returns a job with its executions.
	GetJob(ctx context.Context, id uuid.UUID) (*types.Job, error)
	// ListWorkers returns the workers that have reported themselves
	// (admin scope only; others get types.ErrNotFound).
	ListWorkers(ctx context.Context) ([]*types.Worker, error)

	// StreamOutput copies the live output of a task submitted with
	// ExecOptions.Stream to stdout and stderr, from its start, until the
	// command ends, and returns how it ended.
	StreamOutput(ctx context.Context, taskID uuid.UUID, stdout, stderr io.Writer) (*queue.ExitInfo, error)
	// Exec runs a command interactively: it submits a streamed exec task,
	// copies the output to stdout and stderr as it is produced and returns
	// when the command ends. Cancelling ctx cancels the task, which kills
	// the command in the guest (the one exception to "a submitted task runs
	// on": an interactive command has no one left to read it); Exec then
	// reads on briefly for the killed command's end and returns what it
	// has together with ctx's error (context.Canceled or
	// context.DeadlineExceeded), never a nil error. The execution is
	// recorded like any other.
	Exec(ctx context.Context, vmID string, cmd types.Command, stdout, stderr io.Writer) (*ExecResult, error)

	// InstallToolsTask submits installing mise tool specs into a running
	// VM: its worker installs them into the host's tool cache (a version
	// already cached is not fetched again) and streams them into the guest,
	// where they are on PATH for every later command. mise itself is not
	// added this way (VMs get it with the tools they are created with). A
	// bad spec returns
	// types.ErrInvalid naming it, and a VM that is not running
	// types.ErrConflict; then nothing is submitted. An unknown tool or
	// version fails the task with mise's reason. Idempotent: tools the VM
	// has are delivered again harmlessly.
	InstallToolsTask(ctx context.Context, vmID string, specs []string) (uuid.UUID, error)
	// ListVMTools returns the tool versions a VM was given, at create time
	// or by InstallToolsTask, oldest first; mise itself is listed with an
	// empty Spec. A VM without tools gives an empty list.
	ListVMTools(ctx context.Context, vmID uuid.UUID) ([]types.VMTool, error)

	// WriteFile streams r into path in a running VM's guest and returns
	// how many bytes were written. The path must be absolute; a missing
	// parent directory is an error unless o.MakeParents is set. If ctx
	// ends or r fails, the file may be left partly written; writing again
	// recovers.
	WriteFile(ctx context.Context, vmID, path string, r io.Reader, o types.FileOptions) (int64, error)
	// ReadFile streams the file at path in a running VM's guest to w and
	// returns how many bytes were copied. Nothing is written to w when the
	// file cannot be opened (types.ErrNotFound when it is missing).
	ReadFile(ctx context.Context, vmID, path string, w io.Writer) (int64, error)
}

// ListVMsOptions narrows ListVMsWithOptions.
type ListVMsOptions struct {
	// Labels keeps only VMs that carry every one of these labels.
	Labels map[string]string
	// After is the id of the last VM of the previous page; Limit is the
	// page size (0: no limit).
	After string
	Limit int
}
