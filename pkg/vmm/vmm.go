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
	// Suspend reports Snapshotter.Suspend (and Resume of a suspended VM).
	Suspend bool `json:"suspend"`
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

// Snapshot describes a snapshot a backend wrote into a directory: a VM's
// guest memory, its VMM's device state and its disk, frozen at one point.
// The directory and everything in it belong to the caller (the worker
// keeps them under its state directory and removes them when the snapshot
// is deleted); the backend reads them again when a VM is started from the
// snapshot (types.VMSpec.FromSnapshot = Dir).
type Snapshot struct {
	// Dir is the directory the snapshot was written into.
	Dir string `json:"dir"`
	// Provider is the backend that wrote it; only it can restore it.
	Provider string `json:"provider"`
	// Spec is the source VM's spec when the snapshot was taken: a VM
	// started from the snapshot gets its vCPUs, memory and network mode.
	Spec types.VMSpec `json:"spec"`
	// SizeBytes is what the files in Dir take on disk.
	SizeBytes int64 `json:"size_bytes"`
}

// Snapshotter is the optional interface of backends that can pause,
// suspend and snapshot VMs, and start VMs from snapshots. Find it with
// AsSnapshotter, never by a type assertion of your own, so that
// Capabilities stays the one description; a method whose capability is
// false returns types.ErrNotSupported naming the backend.
//
// Every method is idempotent, and a crash or a cancelled ctx in the middle
// leaves the VM in its state before the call or after it, which a retry
// settles. A VM started from a snapshot (CreateVM with
// types.VMSpec.FromSnapshot, then StartVM) gets its own disk layer over
// the snapshot's frozen disk, never the snapshot's files, and its own
// identity: StartVM restores it instead of booting and, before it
// returns, gives the guest a new hostname (the spec's), machine-id, RNG
// seed and the host's time, and its own MAC and address on a nat network.
type Snapshotter interface {
	// Pause freezes a running VM's vCPUs; its VMM and memory stay. Its
	// status is then types.VMPaused. Pausing a paused VM is a no-op. An
	// unknown VM returns types.ErrNotFound, one that is neither running
	// nor paused types.ErrConflict. Capabilities().PauseResume.
	Pause(ctx context.Context, id string) error

	// Resume lets a paused VM run again, or restores a suspended one in a
	// new VMM from its saved state, memory intact (a process started
	// before the suspend still runs), and returns once its agent answers,
	// with the guest's clock stepped to the host's. Resuming a running VM
	// is a no-op; errors as for Pause.
	Resume(ctx context.Context, id string) error

	// Suspend saves a running or paused VM's memory and device state in
	// its own directory and ends its VMM, freeing its memory. Its status
	// is then types.VMSuspended, across restarts of the orchestrator;
	// DeleteVM removes the saved state. Suspending a suspended VM is a
	// no-op. Capabilities().Suspend.
	Suspend(ctx context.Context, id string) error

	// Snapshot writes a snapshot of a running or paused VM into dir,
	// which the caller made and which is empty: its memory, its device
	// state and its disk as they are now. The VM is left as it was (a
	// running VM is paused for the copy and resumed); its later disk
	// writes no longer reach the snapshot. Capabilities().Snapshot.
	Snapshot(ctx context.Context, id, dir string) (*Snapshot, error)
}

// AsSnapshotter returns o's Snapshotter when o has one and its
// Capabilities advertise pause/resume or snapshots; ok is false otherwise.
// It is the one documented way to reach these optional methods.
func AsSnapshotter(o VMOrchestrator) (s Snapshotter, ok bool) {
	s, ok = o.(Snapshotter)
	if !ok {
		return nil, false
	}
	if c := o.Capabilities(); !c.PauseResume && !c.Snapshot && !c.Suspend {
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
