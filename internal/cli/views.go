package cli

import (
	"cmp"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// The --json views. Their fields are a stable contract for scripts: add
// fields if needed, never rename or remove one.

type vmView struct {
	ID       string        `json:"id"`
	Name     string        `json:"name"`
	State    types.VMState `json:"state"`
	VCPUs    int           `json:"vcpus"`
	MemoryMB int           `json:"memory_mb"`
	Provider string        `json:"provider"`
	Error    string        `json:"error"`
	Owner    string        `json:"owner"`
	Network  string        `json:"network"`
	// Tenant is empty for VMs made without an API key (the local CLI).
	Tenant string `json:"tenant"`
	// ExpiresAt is null for a VM that lives until deleted.
	ExpiresAt *time.Time `json:"expires_at"`
	// OnExpiry is what happens at ExpiresAt: delete or pause.
	OnExpiry string `json:"on_expiry"`
}

func newVMView(v *types.VM) vmView {
	return vmView{ID: v.ID, Name: v.Name, State: v.State, VCPUs: v.VCPUs, MemoryMB: v.MemoryMB, Provider: v.Provider, Error: v.Error, Owner: v.Owner, Network: v.Network,
		Tenant: v.Tenant, ExpiresAt: v.ExpiresAt, OnExpiry: cmp.Or(v.OnExpiry, types.ExpiryDelete)}
}

type taskView struct {
	ID    string          `json:"id"`
	Type  types.TaskType  `json:"type"`
	State types.TaskState `json:"state"`
	Error string          `json:"error"`
	VMID  string          `json:"vm_id,omitempty"`
}

func newTaskView(t *types.Task) taskView {
	return taskView{ID: t.ID, Type: t.Type, State: t.State, Error: t.Error, VMID: t.VMID}
}

type executionView struct {
	ID              string    `json:"id"`
	VMID            string    `json:"vm_id"`
	Command         string    `json:"command"`
	Args            []string  `json:"args"`
	ExitCode        int       `json:"exit_code"`
	Stdout          string    `json:"stdout"`
	Stderr          string    `json:"stderr"`
	StdoutTruncated bool      `json:"stdout_truncated"`
	StderrTruncated bool      `json:"stderr_truncated"`
	TimedOut        bool      `json:"timed_out"`
	StartedAt       time.Time `json:"started_at"`
	FinishedAt      time.Time `json:"finished_at"`
}

func newExecutionView(e *types.Execution) executionView {
	args := e.Args
	if args == nil {
		args = []string{}
	}
	return executionView{ID: e.ID, VMID: e.VMID, Command: e.Command, Args: args, ExitCode: e.ExitCode,
		Stdout: e.Stdout, Stderr: e.Stderr, StdoutTruncated: e.StdoutTruncated, StderrTruncated: e.StderrTruncated,
		TimedOut: e.TimedOut, StartedAt: e.StartedAt, FinishedAt: e.FinishedAt}
}
