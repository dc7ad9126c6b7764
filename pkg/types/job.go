package types

import "time"

// JobState is where a job is in its life.
type JobState string

// Job states.
const (
	JobPending   JobState = "pending"
	JobRunning   JobState = "running"
	JobSucceeded JobState = "succeeded" // every command ran and exited 0
	JobFailed    JobState = "failed"    // a command failed or could not run
)

// Job is an ordered list of commands run in one VM.
type Job struct {
	ID            string       `json:"id"`
	VMID          string       `json:"vm_id"`
	TaskID        string       `json:"task_id,omitempty"`
	Commands      []Command    `json:"commands"`
	StopOnFailure bool         `json:"stop_on_failure"`
	State         JobState     `json:"state"`
	Error         string       `json:"error,omitempty"`
	Executions    []*Execution `json:"executions,omitempty"`
	CreatedAt     time.Time    `json:"created_at"`
	UpdatedAt     time.Time    `json:"updated_at"`
}

// Worker is a worker daemon as it last reported itself.
type Worker struct {
	ID       string    `json:"id"`
	Hostname string    `json:"hostname"`
	Provider string    `json:"provider"`
	Healthy  bool      `json:"healthy"`
	Detail   string    `json:"detail,omitempty"`
	LastSeen time.Time `json:"last_seen"`
	// DataAddr is the host:port of the worker's data plane (file transfer
	// straight to the VMs it owns); empty when it serves none.
	DataAddr string `json:"data_addr,omitempty"`
}
