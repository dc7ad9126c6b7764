// Package wire holds the JSON shapes and error codes of the HTTP API
// (pkg/api/openapi.yaml), shared by the server (pkg/api) and the Go client
// (pkg/client) so the two cannot drift apart. It imports nothing of the
// server's, so a client program does not pull the server in.
package wire

import (
	"encoding/base64"
	"fmt"
	"math"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// NDJSON is the media type of output streams: one JSON event per line.
const NDJSON = "application/x-ndjson"

// Error codes of the JSON error body {"error":{"code":..,"message":..}}.
// The first ones follow the kinds in pkg/types; the *_failed ones report a
// task that ended failed.
const (
	CodeInvalidRequest  = "invalid_request" // 400: the request itself is malformed
	CodeUnauthenticated = "unauthenticated" // 401
	CodeNotFound        = "not_found"       // 404
	CodeConflict        = "conflict"        // 409
	CodeTooLarge        = "too_large"       // 413
	CodeInvalid         = "invalid"         // 422: well-formed but can never succeed
	CodeLimitExceeded   = "limit_exceeded"  // 429: a tenant limit
	CodeInternal        = "internal"        // 500
	CodeCreateFailed    = "create_failed"   // 500: the create task failed
	CodeDeleteFailed    = "delete_failed"   // 500: the delete task failed
	CodeExecFailed      = "exec_failed"     // 500: the command could not run
	CodeNotSupported    = "not_supported"   // 501
	CodeUnavailable     = "unavailable"     // 503
)

// CreateVMRequest is the body of POST /v1/vms.
type CreateVMRequest struct {
	Name       string            `json:"name"`
	VCPUs      int               `json:"vcpus,omitempty"`
	MemoryMB   int               `json:"memory_mb,omitempty"`
	Network    string            `json:"network,omitempty"`
	Labels     map[string]string `json:"labels,omitempty"`
	Env        map[string]string `json:"env,omitempty"`
	TTLSeconds int64             `json:"ttl_seconds,omitempty"`
	// OnExpiry is what happens when the TTL runs out: "delete" (the
	// default) or "pause" (suspend, or pause, and clear the expiry).
	OnExpiry string `json:"on_expiry,omitempty"`
	// Tools are mise tool specs to install and deliver into the VM.
	Tools []string `json:"tools,omitempty"`
	// FromSnapshot (a snapshot's name or id) or Template (a template's
	// name) starts the VM by restoring it instead of booting; vcpus and
	// memory_mb then default to the snapshot's.
	FromSnapshot string `json:"from_snapshot,omitempty"`
	Template     string `json:"template,omitempty"`
}

// SnapshotRequest is the body of POST /v1/vms/{id}/snapshots.
type SnapshotRequest struct {
	Name string `json:"name"`
}

// TemplateRequest is the body of POST /v1/templates.
type TemplateRequest struct {
	Name     string `json:"name"`
	VCPUs    int    `json:"vcpus,omitempty"`
	MemoryMB int    `json:"memory_mb,omitempty"`
	Network  string `json:"network,omitempty"`
	// Tools are mise tool specs installed in the template's VM.
	Tools []string `json:"tools,omitempty"`
	// Setup is a shell command (sh -c) run in the VM before the snapshot.
	Setup string            `json:"setup,omitempty"`
	Env   map[string]string `json:"env,omitempty"`
}

// SnapshotList is the answer of GET /v1/snapshots.
type SnapshotList struct {
	Snapshots []*types.Snapshot `json:"snapshots"`
}

// ToolsInstallRequest is the body of POST /v1/vms/{id}/tools.
type ToolsInstallRequest struct {
	Specs []string `json:"specs"`
}

// VMToolList is the answer of GET /v1/vms/{id}/tools.
type VMToolList struct {
	Tools []types.VMTool `json:"tools"`
}

// VMList is the answer of GET /v1/vms. Next, set when the page is full,
// is the After of the next page.
type VMList struct {
	VMs  []*types.VM `json:"vms"`
	Next string      `json:"next,omitempty"`
}

// TTLRequest is the body of POST /v1/vms/{id}/ttl.
type TTLRequest struct {
	TTLSeconds int64 `json:"ttl_seconds"`
}

// ExecRequest is the body of POST /v1/vms/{id}/exec and one command of a
// job.
type ExecRequest struct {
	Command        string            `json:"command"`
	Args           []string          `json:"args,omitempty"`
	Env            map[string]string `json:"env,omitempty"`
	Cwd            string            `json:"cwd,omitempty"`
	User           string            `json:"user,omitempty"`
	TimeoutSeconds int64             `json:"timeout_seconds,omitempty"`
	StdinB64       string            `json:"stdin_b64,omitempty"`
}

// JobRequest is the body of POST /v1/vms/{id}/jobs.
type JobRequest struct {
	Commands      []ExecRequest `json:"commands"`
	StopOnFailure bool          `json:"stop_on_failure,omitempty"`
}

// FileWritten answers PUT /v1/vms/{id}/files.
type FileWritten struct {
	Path string `json:"path"`
	Size int64  `json:"size"`
}

// NewExecRequest is the request that runs c. The timeout is rounded up to
// whole seconds, the API's unit, so a positive one never becomes zero
// (which means none).
func NewExecRequest(c types.Command) ExecRequest {
	r := ExecRequest{Command: c.Cmd, Args: c.Args, Env: c.Env, Cwd: c.Cwd, User: c.User, TimeoutSeconds: Seconds(c.Timeout)}
	if len(c.Stdin) > 0 {
		r.StdinB64 = base64.StdEncoding.EncodeToString(c.Stdin)
	}
	return r
}

// Seconds rounds d up to whole seconds (0 for d <= 0).
func Seconds(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64(math.Ceil(d.Seconds()))
}

// ErrBadStdin marks a stdin_b64 that is not standard base64: the request
// is malformed rather than invalid.
type ErrBadStdin struct{ Err error }

func (e ErrBadStdin) Error() string {
	return fmt.Sprintf("stdin_b64 is not standard base64: %v", e.Err)
}

// ToCommand is the command r asks for. A timeout too large for a duration
// wraps types.ErrInvalid; bad base64 in stdin_b64 is an ErrBadStdin.
func (r ExecRequest) ToCommand() (types.Command, error) {
	c := types.Command{Cmd: r.Command, Args: r.Args, Env: r.Env, Cwd: r.Cwd, User: r.User}
	const maxSec = int64(1<<63-1) / int64(time.Second)
	if r.TimeoutSeconds > maxSec {
		return c, fmt.Errorf("%w: timeout_seconds %d is too large", types.ErrInvalid, r.TimeoutSeconds)
	}
	c.Timeout = time.Duration(r.TimeoutSeconds) * time.Second
	if r.StdinB64 != "" {
		in, err := base64.StdEncoding.DecodeString(r.StdinB64)
		if err != nil {
			return c, ErrBadStdin{err}
		}
		c.Stdin = in
	}
	return c, nil
}
