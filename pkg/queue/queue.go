// Package queue carries Aetherium Core's tasks from the service to the
// workers: the task types and their typed payloads, the Queue interface the
// service depends on, and its Asynq-on-Redis implementation. The same Redis
// also carries task-completion notifications and the live output of
// streamed commands, so that waiting on a task never polls PostgreSQL.
package queue

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// SharedQueue receives tasks any worker may take (VM creation).
const SharedQueue = "aetherium"

// WorkerQueue is the queue of one worker: the tasks of the VMs it owns.
func WorkerQueue(workerID string) string { return "aetherium-worker-" + workerID }

// EnqueueOptions says where and how a task runs.
type EnqueueOptions struct {
	Queue    string        // SharedQueue or a WorkerQueue
	MaxRetry int           // attempts after the first
	Timeout  time.Duration // per attempt; zero: the queue's default
}

// Queue hands tasks to workers.
type Queue interface {
	// Enqueue submits t. Its ID is the queue's task id: enqueueing an id that
	// is already queued is a no-op, so a caller may retry safely.
	Enqueue(ctx context.Context, t *types.Task, opts EnqueueOptions) error
	// Cancel removes a task that has not started from queueName, and asks the
	// worker running it (if any) to cancel it. Unknown ids are not an error.
	Cancel(ctx context.Context, taskID, queueName string) error
}

// Notifier tells waiters that a task changed.
type Notifier interface {
	// NotifyTask wakes every watcher of taskID.
	NotifyTask(ctx context.Context, taskID string) error
	// WatchTask subscribes to taskID's notifications. The subscription is
	// live when WatchTask returns, so a notification sent afterwards is never
	// missed. stop releases it.
	WatchTask(ctx context.Context, taskID string) (events <-chan struct{}, stop func(), err error)
}

// OutputKind says what an output chunk carries.
type OutputKind string

// Output chunk kinds.
const (
	OutputStdout OutputKind = "o"
	OutputStderr OutputKind = "e"
	OutputExit   OutputKind = "x" // the last chunk of a stream
)

// OutputChunk is one piece of a streamed command's output.
type OutputChunk struct {
	Kind OutputKind
	Data []byte
	Exit *ExitInfo // set on OutputExit
}

// ExitInfo ends a streamed command's output.
type ExitInfo struct {
	ExitCode int    `json:"exit_code"`
	TimedOut bool   `json:"timed_out,omitempty"`
	Error    string `json:"error,omitempty"` // the command could not run
}

// OutputStream carries the live output of streamed commands, keyed by task
// id, from the worker to whoever runs the command interactively.
type OutputStream interface {
	// AppendOutput adds a chunk to taskID's stream.
	AppendOutput(ctx context.Context, taskID string, c OutputChunk) error
	// ReadOutput calls fn for every chunk of taskID's stream from the start,
	// blocking for new ones, until the exit chunk (returned) or ctx ends.
	ReadOutput(ctx context.Context, taskID string, fn func(OutputChunk) error) (*ExitInfo, error)
}

// Payloads of each task type. Every payload names the VM it concerns.

// VMCreatePayload asks a worker to create and boot a stored VM.
type VMCreatePayload struct {
	VMID string `json:"vm_id"`
	// Tools are the mise tool specs to install and deliver (validated by
	// the service).
	Tools []string `json:"tools,omitempty"`
	// FromSnapshot is the id of the snapshot or template the VM starts
	// from (restored, not booted); the task is in its owner's queue.
	FromSnapshot string `json:"from_snapshot,omitempty"`
	// DefaultNetwork says that the creator left the VM's network mode to
	// the worker, which records its own default when it claims the VM (it
	// depends on the worker's backend and configuration, which the service
	// does not know). false: the stored mode stands.
	DefaultNetwork bool `json:"default_network,omitempty"`
}

// VMExecutePayload asks the VM's owner to run a command.
type VMExecutePayload struct {
	VMID    string        `json:"vm_id"`
	Command types.Command `json:"command"`
	// Stream sends the output live through OutputStream as well.
	Stream bool `json:"stream,omitempty"`
}

// VMDeletePayload asks the VM's owner to remove it.
type VMDeletePayload struct {
	VMID  string `json:"vm_id"`
	Force bool   `json:"force,omitempty"`
}

// VMStopPayload asks the VM's owner to stop it.
type VMStopPayload struct {
	VMID  string `json:"vm_id"`
	Force bool   `json:"force,omitempty"`
}

// VMStartPayload asks the VM's owner to start a stopped VM.
type VMStartPayload struct {
	VMID string `json:"vm_id"`
}

// JobRunPayload asks the VM's owner to run a stored job.
type JobRunPayload struct {
	JobID string `json:"job_id"`
	VMID  string `json:"vm_id"`
}

// ToolsInstallPayload asks the VM's owner to install tools into it.
type ToolsInstallPayload struct {
	VMID string `json:"vm_id"`
	// Specs are mise tool specs (validated by the service).
	Specs []string `json:"specs"`
}

// VMOpPayload asks the VM's owner to pause, resume or suspend it.
type VMOpPayload struct {
	VMID string `json:"vm_id"`
}

// VMSnapshotPayload asks the VM's owner to snapshot it into the recorded
// snapshot SnapshotID.
type VMSnapshotPayload struct {
	VMID       string `json:"vm_id"`
	SnapshotID string `json:"snapshot_id"`
}

// SnapshotDeletePayload asks the owner of a snapshot or template to remove
// its files.
type SnapshotDeletePayload struct {
	SnapshotID string `json:"snapshot_id"`
}

// TemplateBuildPayload asks a worker to build template SnapshotID: create
// its builder VM VMID, run its setup, snapshot it, remove the VM.
type TemplateBuildPayload struct {
	SnapshotID string `json:"snapshot_id"`
	VMID       string `json:"vm_id"`
	// DefaultNetwork: as VMCreatePayload's.
	DefaultNetwork bool `json:"default_network,omitempty"`
}

func (p VMOpPayload) vmID() string           { return p.VMID }
func (p VMSnapshotPayload) vmID() string     { return p.VMID }
func (p SnapshotDeletePayload) vmID() string { return "" }
func (p TemplateBuildPayload) vmID() string  { return p.VMID }
func (p VMOpPayload) validate() error        { return nil }
func (p VMSnapshotPayload) validate() error  { return needSnapshot(p.SnapshotID) }
func (p TemplateBuildPayload) validate() error {
	return needSnapshot(p.SnapshotID)
}
func (p SnapshotDeletePayload) validate() error { return needSnapshot(p.SnapshotID) }

// vmless marks payloads of tasks that concern no VM.
func (p SnapshotDeletePayload) vmless() {}

func needSnapshot(id string) error {
	if id == "" {
		return fmt.Errorf("%w: snapshot_id is empty", types.ErrInvalid)
	}
	return nil
}

// NewVMOpTask builds a vm:pause, vm:resume or vm:suspend task.
func NewVMOpTask(id string, typ types.TaskType, p VMOpPayload) (*types.Task, error) {
	switch typ {
	case types.TaskVMPause, types.TaskVMResume, types.TaskVMSuspend:
		return newTask(id, typ, p)
	}
	return nil, fmt.Errorf("%w: %s is not a vm pause, resume or suspend task", types.ErrInvalid, typ)
}

// NewVMSnapshotTask builds a vm:snapshot task.
func NewVMSnapshotTask(id string, p VMSnapshotPayload) (*types.Task, error) {
	return newTask(id, types.TaskVMSnapshot, p)
}

// NewSnapshotDeleteTask builds a snapshot:delete task.
func NewSnapshotDeleteTask(id string, p SnapshotDeletePayload) (*types.Task, error) {
	return newTask(id, types.TaskSnapshotDelete, p)
}

// NewTemplateBuildTask builds a template:build task.
func NewTemplateBuildTask(id string, p TemplateBuildPayload) (*types.Task, error) {
	return newTask(id, types.TaskTemplateBuild, p)
}

// Payload is implemented by every payload type.
//
// Encoding and decoding check only the payload's shape: that it is JSON and
// carries the ids and fields its task cannot be routed or run without. What
// a person typed is validated once, by pkg/service before it enqueues, and
// the guest agent checks a command again at the trust boundary; the queue
// in between trusts both.
type Payload interface {
	vmID() string
	validate() error
}

func (p VMCreatePayload) vmID() string  { return p.VMID }
func (p VMExecutePayload) vmID() string { return p.VMID }
func (p VMDeletePayload) vmID() string  { return p.VMID }
func (p VMStopPayload) vmID() string    { return p.VMID }
func (p VMStartPayload) vmID() string   { return p.VMID }
func (p JobRunPayload) vmID() string    { return p.VMID }
func (p ToolsInstallPayload) vmID() string {
	return p.VMID
}

func (p ToolsInstallPayload) validate() error {
	if len(p.Specs) == 0 {
		return fmt.Errorf("%w: specs is empty", types.ErrInvalid)
	}
	return nil
}

func (p VMCreatePayload) validate() error { return nil }
func (p VMDeletePayload) validate() error { return nil }
func (p VMStopPayload) validate() error   { return nil }
func (p VMStartPayload) validate() error  { return nil }

// validate asks only for a program: the rest of the command (env names,
// limits, stdin size) is the service's to validate and the agent's to
// enforce.
func (p VMExecutePayload) validate() error {
	if p.Command.Cmd == "" {
		return fmt.Errorf("%w: command.cmd is empty", types.ErrInvalid)
	}
	return nil
}

func (p JobRunPayload) validate() error {
	if p.JobID == "" {
		return fmt.Errorf("%w: job_id is empty", types.ErrInvalid)
	}
	return nil
}

func newTask(id string, typ types.TaskType, p Payload) (*types.Task, error) {
	if err := checkPayload(p); err != nil {
		return nil, err
	}
	b, err := json.Marshal(p)
	if err != nil {
		return nil, fmt.Errorf("encoding %s payload: %w", typ, err)
	}
	now := time.Now().UTC()
	return &types.Task{ID: id, Type: typ, VMID: p.vmID(), Payload: b, State: types.TaskPending, CreatedAt: now, UpdatedAt: now}, nil
}

func checkPayload(p Payload) error {
	if _, ok := p.(interface{ vmless() }); ok {
		return p.validate()
	}
	if p.vmID() == "" {
		return fmt.Errorf("%w: vm_id is empty", types.ErrInvalid)
	}
	return p.validate()
}

// NewVMCreateTask builds a vm:create task with the given id.
func NewVMCreateTask(id string, p VMCreatePayload) (*types.Task, error) {
	return newTask(id, types.TaskVMCreate, p)
}

// NewVMExecuteTask builds a vm:execute task.
func NewVMExecuteTask(id string, p VMExecutePayload) (*types.Task, error) {
	return newTask(id, types.TaskVMExecute, p)
}

// NewVMDeleteTask builds a vm:delete task.
func NewVMDeleteTask(id string, p VMDeletePayload) (*types.Task, error) {
	return newTask(id, types.TaskVMDelete, p)
}

// NewVMStopTask builds a vm:stop task.
func NewVMStopTask(id string, p VMStopPayload) (*types.Task, error) {
	return newTask(id, types.TaskVMStop, p)
}

// NewVMStartTask builds a vm:start task.
func NewVMStartTask(id string, p VMStartPayload) (*types.Task, error) {
	return newTask(id, types.TaskVMStart, p)
}

// NewJobRunTask builds a job:run task.
func NewJobRunTask(id string, p JobRunPayload) (*types.Task, error) {
	return newTask(id, types.TaskJobRun, p)
}

// NewToolsInstallTask builds a tools:install task.
func NewToolsInstallTask(id string, p ToolsInstallPayload) (*types.Task, error) {
	return newTask(id, types.TaskToolsInstall, p)
}

// Decode parses a payload and checks its shape (see Payload). Errors wrap
// types.ErrInvalid: such a task can never succeed and must not be retried.
func Decode[P Payload](raw []byte) (P, error) {
	var p P
	if err := json.Unmarshal(raw, &p); err != nil {
		return p, fmt.Errorf("%w: malformed payload: %v", types.ErrInvalid, err)
	}
	if err := checkPayload(p); err != nil {
		return p, fmt.Errorf("malformed payload: %w", err)
	}
	return p, nil
}
