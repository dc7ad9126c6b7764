package types

import (
	"fmt"
	"time"
)

// DefaultMaxOutputBytes is how much of each output stream is kept per
// command unless configured otherwise.
const DefaultMaxOutputBytes = 1 << 20

// Command is one command to run in a VM.
type Command struct {
	Cmd     string            `json:"cmd"`
	Args    []string          `json:"args,omitempty"`
	Env     map[string]string `json:"env,omitempty"`
	Cwd     string            `json:"cwd,omitempty"`
	User    string            `json:"user,omitempty"`
	Stdin   []byte            `json:"stdin,omitempty"`
	Timeout time.Duration     `json:"timeout,omitempty"` // zero: no timeout
	// MaxOutputBytes caps what is kept of stdout and of stderr; zero means
	// DefaultMaxOutputBytes.
	MaxOutputBytes int `json:"max_output_bytes,omitempty"`
}

// MaxStdinBytes bounds stdin carried inside a task payload.
const MaxStdinBytes = 4 << 20

// Validate checks a command before it is queued.
func (c Command) Validate() error {
	if c.Cmd == "" {
		return fmt.Errorf("%w: command is empty; give the program to run, e.g. -- sh -c 'echo hi'", ErrInvalid)
	}
	if c.Timeout < 0 {
		return fmt.Errorf("%w: timeout %s is negative", ErrInvalid, c.Timeout)
	}
	if c.MaxOutputBytes < 0 {
		return fmt.Errorf("%w: max output bytes %d is negative", ErrInvalid, c.MaxOutputBytes)
	}
	if len(c.Stdin) > MaxStdinBytes {
		return fmt.Errorf("%w: stdin is %d bytes; at most %d can be sent with a command", ErrInvalid, len(c.Stdin), MaxStdinBytes)
	}
	return ValidateEnv(c.Env)
}

// ExecResult is what running a command produced.
type ExecResult struct {
	ExitCode        int       `json:"exit_code"`
	Stdout          []byte    `json:"stdout"`
	Stderr          []byte    `json:"stderr"`
	StdoutTruncated bool      `json:"stdout_truncated"`
	StderrTruncated bool      `json:"stderr_truncated"`
	TimedOut        bool      `json:"timed_out"`
	Signal          string    `json:"signal,omitempty"` // set when a signal ended the command
	StartedAt       time.Time `json:"started_at"`
	FinishedAt      time.Time `json:"finished_at"`
}

// Execution is the stored record of one command run in a VM.
type Execution struct {
	ID              string            `json:"id"`
	VMID            string            `json:"vm_id"`
	JobID           string            `json:"job_id,omitempty"`
	TaskID          string            `json:"task_id,omitempty"`
	Command         string            `json:"command"`
	Args            []string          `json:"args"`
	Env             map[string]string `json:"env,omitempty"`
	Cwd             string            `json:"cwd,omitempty"`
	ExitCode        int               `json:"exit_code"`
	Stdout          string            `json:"stdout"`
	Stderr          string            `json:"stderr"`
	StdoutTruncated bool              `json:"stdout_truncated"`
	StderrTruncated bool              `json:"stderr_truncated"`
	TimedOut        bool              `json:"timed_out"`
	Error           string            `json:"error,omitempty"` // set when the command could not run at all
	StartedAt       time.Time         `json:"started_at"`
	FinishedAt      time.Time         `json:"finished_at"`
	Duration        time.Duration     `json:"duration"`
}

// NewExecution records the outcome of cmd on vmID.
func NewExecution(id, vmID string, cmd Command, res *ExecResult) *Execution {
	e := &Execution{ID: id, VMID: vmID, Command: cmd.Cmd, Args: cmd.Args, Env: cmd.Env, Cwd: cmd.Cwd}
	if e.Args == nil {
		e.Args = []string{}
	}
	if res != nil {
		e.ExitCode = res.ExitCode
		e.Stdout, e.Stderr = string(res.Stdout), string(res.Stderr)
		e.StdoutTruncated, e.StderrTruncated = res.StdoutTruncated, res.StderrTruncated
		e.TimedOut = res.TimedOut
		e.StartedAt, e.FinishedAt = res.StartedAt, res.FinishedAt
		e.Duration = res.FinishedAt.Sub(res.StartedAt)
	}
	return e
}
