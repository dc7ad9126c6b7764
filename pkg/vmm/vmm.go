// Package vmm defines VMOrchestrator, the one interface every VM backend
// (docker, qemu, firecracker) implements. Backends live in subpackages and
// all pass the conformance suite in vmmtest.
package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Capabilities tells callers what a backend offers, so that differences are
// handled by asking rather than by type switches.
type Capabilities struct {
	// Provider is the backend's name as used in configuration.
	Provider string `json:"provider"`
	// MaxVCPUs is the most vCPUs one VM may have (the host's CPU count).
	MaxVCPUs int `json:"max_vcpus"`
	// MaxMemoryMB is the most memory one VM may ask for, in MiB (the
	// backend's max_memory_mb; see DefaultMaxMemoryMB).
	MaxMemoryMB int `json:"max_memory_mb"`
	// Isolation describes the boundary: "container" or "vm".
	Isolation string `json:"isolation"`
	// PauseResume and Snapshot report the optional Snapshotter's features
	// (see AsSnapshotter); a Snapshotter method whose feature is false
	// returns types.ErrNotSupported.
	PauseResume bool `json:"pause_resume"`
	Snapshot    bool `json:"snapshot"`
	// Networking reports whether the backend can attach VMs to a network.
	Networking bool `json:"networking"`
}

// ExecIO carries optional live output sinks and the command's identity.
// Whatever is written to the sinks is also kept (up to the cap) in the
// returned ExecResult.
type ExecIO struct {
	Stdout io.Writer
	Stderr io.Writer

	// ExecutionID, when set, names the command so that it runs at most
	// once in the VM's guest: the agent journals it under this id while it
	// runs and for a retention period after it ends (see
	// agent.ExecRetention). A call with the id of a journaled execution
	// starts nothing; it reattaches: Started reports reattached, the output
	// kept so far is written to the sinks again from its start, then the
	// live output, and the result is the original command's. With an id,
	// the command outlives its caller: a dropped connection (a crashed
	// worker) does not kill it, only cancelling ctx or its own timeout
	// does.
	ExecutionID string
	// ReattachOnly makes the call only reattach: an execution the agent
	// has no record of (never started, or forgotten after its retention or
	// a guest reboot) starts nothing and returns an error wrapping
	// ErrUnknownExecution. It needs ExecutionID.
	ReattachOnly bool
	// Started, when set, is called once, before any output is written,
	// with the command's pid in the guest (0 for a program that could not
	// be started) and whether the call reattached to an execution that had
	// already started. The call waits for it to return.
	Started func(pid int, reattached bool)
	// Detach, when closed, ends the call without killing the command: it
	// returns an error wrapping ErrDetached and the command runs on, to be
	// reattached later by ExecutionID (which Detach needs). A worker
	// shutting down uses it; cancelling ctx, by contrast, kills the command.
	Detach <-chan struct{}
}

// ErrUnknownExecution is wrapped by ExecuteCommand with ExecIO.ReattachOnly
// when the guest agent has no record of the execution. It also wraps
// types.ErrNotFound.
var ErrUnknownExecution = fmt.Errorf("%w: the guest agent has no record of this execution", types.ErrNotFound)

// ErrDetached is wrapped by ExecuteCommand when ExecIO.Detach ended the
// call while the command ran on in the guest.
var ErrDetached = errors.New("detached from a command that runs on in the guest")

// VMOrchestrator creates, runs and removes VMs and runs commands in them.
//
// IDs are chosen by the caller (the worker passes the stored VM's id) so that
// every method can be retried after a crash. All methods are safe for
// concurrent use. Cancelling ctx aborts the call; the VM is then left in
// whatever state the backend reached and a later call resumes from there.
type VMOrchestrator interface {
	// CreateVM prepares the VM's resources without booting it. Calling it
	// again for an existing id is not an error and returns the current status.
	// Invalid specs return types.ErrInvalid and leave nothing behind.
	CreateVM(ctx context.Context, spec types.VMSpec) (*VMStatus, error)

	// StartVM boots a created or stopped VM and returns only once its guest
	// agent answers. Starting a running VM is a no-op. An unknown id returns
	// types.ErrNotFound.
	StartVM(ctx context.Context, id string) error

	// StopVM stops a VM, gracefully unless force is set. Stopping a stopped
	// VM is a no-op. An unknown id returns types.ErrNotFound.
	StopVM(ctx context.Context, id string, force bool) error

	// DeleteVM stops the VM if needed and removes every resource it holds
	// (processes, sockets, directories, containers). Deleting an unknown or
	// already deleted VM returns nil, so the call is idempotent.
	DeleteVM(ctx context.Context, id string) error

	// ExecuteCommand runs cmd through the VM's guest agent and waits for it
	// to end. The command's own failure is not an error: it is reported in
	// the result's ExitCode/TimedOut. Errors mean the command could not be
	// run: types.ErrNotFound for an unknown VM, types.ErrConflict when the VM
	// is not running, types.ErrUnavailable when the agent cannot be reached.
	// Cancelling ctx kills the command and everything it started in the
	// guest (its process tree, setsid'd and daemonized children included).
	// cmd is not validated here: the service checks user input and the
	// guest agent, the trust boundary, refuses what it cannot run. The
	// backend alone puts the VM spec's environment beneath cmd.Env.
	ExecuteCommand(ctx context.Context, id string, cmd types.Command, stream ExecIO) (*types.ExecResult, error)

	// WriteFile streams what r yields into path in a running VM's guest and
	// returns how many bytes were written. path must be absolute
	// (types.ErrInvalid otherwise). Only the permission bits of o.Mode are
	// used (0: 0644); o.User owns the file and any directory made for it;
	// without o.MakeParents a missing parent directory returns
	// types.ErrNotFound. An unknown VM returns types.ErrNotFound, one that is
	// not running types.ErrConflict. The content is streamed in chunks, so
	// memory stays bounded whatever the size. Writing the same content again
	// is harmless; if ctx ends or r fails the file may be left partly
	// written.
	WriteFile(ctx context.Context, id, path string, r io.Reader, o types.FileOptions) (int64, error)

	// ReadFile streams the file at path in a running VM's guest to w and
	// returns how many bytes were written to w. path must be absolute
	// (types.ErrInvalid otherwise); a missing file returns types.ErrNotFound
	// and a directory types.ErrInvalid, with nothing written to w. Unknown
	// and stopped VMs fail as in WriteFile. The content is streamed in
	// chunks; if ctx ends or w fails, w holds part of the file.
	ReadFile(ctx context.Context, id, path string, w io.Writer) (int64, error)

	// DialAgent opens a fresh byte stream to the gRPC server of a running
	// VM's guest agent, for callers that speak the agent's protocol
	// themselves (agent.NewClient with a dialer that calls DialAgent). Each
	// call makes a new connection shared with nothing else, so it is safe
	// to retry; the caller closes it, which ends only the calls it carried.
	// An unknown VM returns types.ErrNotFound, one that is not running
	// types.ErrConflict, and an agent that cannot be reached
	// types.ErrUnavailable. ctx bounds the dial only: once returned, the
	// conn lives until closed.
	DialAgent(ctx context.Context, id string) (net.Conn, error)

	// GetVMStatus returns the backend's view of one VM, or types.ErrNotFound.
	GetVMStatus(ctx context.Context, id string) (*VMStatus, error)

	// ListVMs returns every VM this backend instance manages.
	ListVMs(ctx context.Context) ([]VMStatus, error)

	// Health returns nil when the backend can create VMs, or an error that
	// says what is missing and how to fix it.
	Health(ctx context.Context) error

	// Capabilities describes the backend. It does no I/O.
	Capabilities() Capabilities

	// Close releases connections held by the orchestrator. VMs keep running.
	Close() error
}

// Snapshot is a full snapshot of a VM: its VMM state and its guest memory,
// as host paths.
type Snapshot struct {
	StatePath string `json:"state_path"`
	MemPath   string `json:"mem_path"`
}

// Snapshotter is the optional interface of backends that can pause, resume
// and snapshot VMs. Find it with AsSnapshotter, never by a type assertion
// of your own, so that Capabilities stays the one description.
type Snapshotter interface {
	// Pause freezes a running VM's vCPUs. Pausing a paused VM is a no-op.
	// An unknown VM returns types.ErrNotFound, one that does not run
	// types.ErrConflict. Cancelling ctx abandons the request; the VM is
	// then paused or not, and a retry settles it.
	Pause(ctx context.Context, id string) error

	// Resume lets a paused VM run again. Resuming a running VM is a
	// no-op; errors as for Pause.
	Resume(ctx context.Context, id string) error

	// CreateSnapshot writes a full snapshot of a paused VM, replacing the
	// VM's earlier one, and returns where it is. A VM that is not paused
	// returns types.ErrConflict (pause it first, so that the snapshot is
	// consistent). Calling it again takes a new snapshot; a cancelled one
	// may leave a partial snapshot that the next call replaces.
	CreateSnapshot(ctx context.Context, id string) (*Snapshot, error)

	// LoadSnapshot restores a stopped VM from snap in a fresh VMM and, when
	// resume is set, resumes it and returns once its agent answers. A
	// running VM returns types.ErrConflict; an unknown one
	// types.ErrNotFound. If ctx ends, the new VMM is killed and the VM
	// stays stopped.
	LoadSnapshot(ctx context.Context, id string, snap Snapshot, resume bool) error
}

// AsSnapshotter returns o's Snapshotter when o has one and its
// Capabilities advertise pause/resume or snapshots; ok is false otherwise.
// It is the one documented way to reach these optional methods.
func AsSnapshotter(o VMOrchestrator) (s Snapshotter, ok bool) {
	s, ok = o.(Snapshotter)
	if !ok {
		return nil, false
	}
	if c := o.Capabilities(); !c.PauseResume && !c.Snapshot {
		return nil, false
	}
	return s, true
}

// VMStatus is a backend's view of a VM.
type VMStatus struct {
	ID    string        `json:"id"`
	Name  string        `json:"name"`
	State types.VMState `json:"state"`
	// Detail explains a failed or unexpected state, e.g. an exit code.
	Detail string `json:"detail,omitempty"`
	// Labels are the spec's labels as the backend recorded them.
	Labels map[string]string `json:"labels,omitempty"`
	// Jail is how the VM's VMM is confined; nil when the backend does not
	// confine it (confinement off, or a backend without a jail).
	Jail *JailInfo `json:"jail,omitempty"`
}

// Diagnoser is what every backend offers beside VMOrchestrator: a report
// on the host, for aether-cli doctor. Each backend package also has a
// function Diagnose(ctx, Config) that needs no orchestrator.
type Diagnoser interface {
	// Diagnose checks, without creating anything, what the backend needs
	// of this host. It never fails: each Check says what it found and,
	// when it failed, how to fix it. Cancelling ctx cuts the checks short.
	Diagnose(ctx context.Context) []Check
}

// Check is one finding of a backend's host diagnosis (aether-cli doctor).
type Check struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
	// Fix says what to do when the check fails.
	Fix string `json:"fix,omitempty"`
}
