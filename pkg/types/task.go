package types

import (
	"encoding/json"
	"time"
)

// TaskType names a kind of asynchronous work.
type TaskType string

// Task types carried by the queue.
const (
	TaskVMCreate  TaskType = "vm:create"
	TaskVMExecute TaskType = "vm:execute"
	TaskVMDelete  TaskType = "vm:delete"
	TaskVMStop    TaskType = "vm:stop"
	TaskVMStart   TaskType = "vm:start"
	TaskJobRun    TaskType = "job:run"

	TaskVMPause        TaskType = "vm:pause"
	TaskVMResume       TaskType = "vm:resume"
	TaskVMSuspend      TaskType = "vm:suspend"
	TaskVMSnapshot     TaskType = "vm:snapshot"
	TaskSnapshotDelete TaskType = "snapshot:delete"
	TaskTemplateBuild  TaskType = "template:build"
)

// TaskState is where a task is in its life.
type TaskState string

// Task states. Succeeded and failed are terminal.
const (
	TaskPending   TaskState = "pending"   // enqueued, not yet picked up
	TaskRunning   TaskState = "running"   // a worker is processing it
	TaskRetrying  TaskState = "retrying"  // an attempt failed; it will run again
	TaskSucceeded TaskState = "succeeded" // done; Result holds the outcome
	TaskFailed    TaskState = "failed"    // gave up; Error says why
)

// Terminal reports whether the task will not change any more.
func (s TaskState) Terminal() bool { return s == TaskSucceeded || s == TaskFailed }

// Task is a unit of asynchronous work. Its ID is also the queue's task id,
// so enqueueing the same task twice is harmless.
type Task struct {
	ID       string          `json:"id"`
	Type     TaskType        `json:"type"`
	VMID     string          `json:"vm_id,omitempty"`
	Payload  json.RawMessage `json:"payload,omitempty"`
	State    TaskState       `json:"state"`
	Attempts int             `json:"attempts"`
	Error    string          `json:"error,omitempty"`
	Result   json.RawMessage `json:"result,omitempty"`
	// Queue is the Asynq queue the task was enqueued in (empty for a task
	// that needed no worker); recovery enqueues a task Asynq lost again
	// there, under the same id.
	Queue string `json:"queue,omitempty"`
	// WorkerID is the worker running (or that last ran) an attempt.
	WorkerID string `json:"worker_id,omitempty"`

	CreatedAt  time.Time  `json:"created_at"`
	UpdatedAt  time.Time  `json:"updated_at"`
	FinishedAt *time.Time `json:"finished_at,omitempty"`
}

// TaskToolsInstall installs tools into a running VM (pkg/tools).
const TaskToolsInstall TaskType = "tools:install"
