package types

import (
	"fmt"
	"regexp"
	"time"
)

// VMState is the life-cycle state of a VM.
type VMState string

// VM states. The allowed transitions between them are in vmTransitions.
const (
	VMPending  VMState = "pending"  // recorded, waiting for a worker
	VMCreating VMState = "creating" // a worker is creating and booting it
	VMRunning  VMState = "running"  // the guest agent answers
	VMStopping VMState = "stopping"
	VMStopped  VMState = "stopped"
	VMDeleting VMState = "deleting"
	VMDeleted  VMState = "deleted" // terminal: every resource is gone
	VMFailed   VMState = "failed"  // something broke; only delete is allowed
	// VMLost: the worker that owns the VM stopped reporting (for
	// worker.dead_after). Calls on it fail at once saying so; a delete is
	// recorded and finished by the owner when it returns, which also takes
	// the VM back (running) if it still runs, or fails it.
	VMLost VMState = "lost"
	// VMPaused: its vCPUs are frozen; its VMM and memory stay.
	VMPaused VMState = "paused"
	// VMSuspended: its memory and device state are saved on its owner's
	// disk and its VMM ended; resume restores it, memory intact.
	VMSuspended VMState = "suspended"
)

// AllVMStates lists every state, in life-cycle order.
var AllVMStates = []VMState{VMPending, VMCreating, VMRunning, VMPaused, VMSuspended, VMStopping, VMStopped, VMDeleting, VMDeleted, VMFailed, VMLost}

// vmTransitions is the one place the VM state machine is written down.
var vmTransitions = map[VMState][]VMState{
	VMPending:   {VMCreating, VMDeleting, VMFailed, VMLost},
	VMCreating:  {VMRunning, VMDeleting, VMFailed, VMLost},
	VMRunning:   {VMPaused, VMSuspended, VMStopping, VMDeleting, VMFailed, VMLost},
	VMPaused:    {VMRunning, VMSuspended, VMStopping, VMDeleting, VMFailed, VMLost},
	VMSuspended: {VMRunning, VMDeleting, VMFailed, VMLost},
	VMStopping:  {VMStopped, VMDeleting, VMFailed, VMLost},
	VMStopped:   {VMCreating, VMRunning, VMDeleting, VMFailed, VMLost},
	VMDeleting:  {VMDeleted, VMFailed},
	VMFailed:    {VMDeleting},
	VMLost:      {VMRunning, VMPaused, VMSuspended, VMStopped, VMDeleting, VMFailed},
	VMDeleted:   {},
}

// Valid reports whether s is a known state.
func (s VMState) Valid() bool {
	_, ok := vmTransitions[s]
	return ok
}

// Terminal reports whether no transition leaves s.
func (s VMState) Terminal() bool { return s == VMDeleted }

// CheckTransition returns nil when a VM may go from `from` to `to`. Staying
// in the same state is allowed so that retried steps are idempotent.
func CheckTransition(from, to VMState) error {
	if !from.Valid() || !to.Valid() {
		return fmt.Errorf("%w: unknown vm state %q -> %q", ErrInvalid, from, to)
	}
	if from == to {
		return nil
	}
	for _, s := range vmTransitions[from] {
		if s == to {
			return nil
		}
	}
	return fmt.Errorf("%w: vm cannot go from %s to %s", ErrConflict, from, to)
}

// What the owning worker does with a VM when its ExpiresAt passes.
const (
	// ExpiryDelete deletes it, the default.
	ExpiryDelete = "delete"
	// ExpiryPause pauses it as E2B's autoPause does: a running VM is
	// suspended to disk where the backend can (its memory freed), its
	// vCPUs paused elsewhere; then its ExpiresAt is cleared, so it waits
	// until it is resumed (and given a new TTL) or deleted. A VM that is
	// not running then only loses its ExpiresAt.
	ExpiryPause = "pause"
)

// CheckOnExpiry checks an on-expiry action: empty, ExpiryDelete or
// ExpiryPause.
func CheckOnExpiry(a string) error {
	switch a {
	case "", ExpiryDelete, ExpiryPause:
		return nil
	}
	return fmt.Errorf("%w: on-expiry action %q is unknown; use %q (the default) or %q", ErrInvalid, a, ExpiryDelete, ExpiryPause)
}

// VM is a machine as recorded in storage.
type VM struct {
	ID       string            `json:"id"`
	Name     string            `json:"name"`
	VCPUs    int               `json:"vcpus"`
	MemoryMB int               `json:"memory_mb"`
	State    VMState           `json:"state"`
	Provider string            `json:"provider"`
	Owner    string            `json:"owner,omitempty"` // id of the worker that created it
	Labels   map[string]string `json:"labels,omitempty"`
	Env      map[string]string `json:"env,omitempty"`     // default environment of every command
	Network  string            `json:"network,omitempty"` // NetworkNone or NetworkNAT
	Error    string            `json:"error,omitempty"`
	// Tenant owns the VM: API keys of another tenant cannot see it. Empty
	// for VMs made without a tenant (the local CLI acting as admin).
	Tenant string `json:"tenant,omitempty"`
	// ExpiresAt is when the owning worker deletes the VM (or, with
	// OnExpiry ExpiryPause, pauses it); nil: never.
	ExpiresAt *time.Time `json:"expires_at,omitempty"`
	// OnExpiry is what happens at ExpiresAt: ExpiryDelete (empty means
	// the same) or ExpiryPause.
	OnExpiry string `json:"on_expiry,omitempty"`
	// Confinement is how the VM's VMM processes are confined on their
	// host, as recorded when it last booted; nil when the backend does not
	// confine them (docker) or confinement is off.
	Confinement *Confinement `json:"confinement,omitempty"`
	// FromSnapshot is the id of the snapshot or template the VM was
	// started from (empty for a VM that booted).
	FromSnapshot string `json:"from_snapshot,omitempty"`

	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// Confinement says how a VM's VMM processes are confined on the host.
type Confinement struct {
	// UID and GID are the unprivileged ids the VMM runs as, the VM's own.
	UID int `json:"uid"`
	GID int `json:"gid"`
	// Cgroup is the VM's cgroup as /proc/PID/cgroup names it, e.g.
	// /aetherium/<vm-id>; empty while the VM does not run.
	Cgroup string `json:"cgroup,omitempty"`
}

// Live reports whether the VM still holds (or is about to hold) resources:
// every state but deleted.
func (v *VM) Live() bool { return v.State != VMDeleted }

// VMSpec is what a backend needs to create a VM.
type VMSpec struct {
	ID       string
	Name     string
	VCPUs    int
	MemoryMB int
	Labels   map[string]string
	Env      map[string]string
	// Network is NetworkNone or NetworkNAT; empty means NetworkNone.
	Network string
	// Tools are the cached tool versions delivered read-only into the VM
	// (see ToolSet for the delivery contract); nil: none.
	Tools *ToolSet `json:",omitempty"`
	// FromSnapshot, when set, is the directory of a snapshot this
	// backend wrote (vmm.Snapshot.Dir): the VM is started by restoring
	// it, with its own disk layer and identity, instead of booting. Set
	// by the worker, never by users.
	FromSnapshot string `json:",omitempty"`
}

// Network modes of a VM.
const (
	// NetworkNone gives the VM no network interface besides loopback.
	NetworkNone = "none"
	// NetworkNAT gives the VM a TAP on the host's bridge, an address, a
	// default route and NAT to the outside, isolated from other VMs.
	NetworkNAT = "nat"
)

// ValidateNetwork checks a network mode ("" counts as none).
func ValidateNetwork(mode string) error {
	switch mode {
	case "", NetworkNone, NetworkNAT:
		return nil
	}
	return fmt.Errorf("%w: network %q is unknown; use none or nat", ErrInvalid, mode)
}

// Spec returns the backend spec of a stored VM.
func (v *VM) Spec() VMSpec {
	return VMSpec{ID: v.ID, Name: v.Name, VCPUs: v.VCPUs, MemoryMB: v.MemoryMB, Labels: v.Labels, Env: v.Env, Network: v.Network}
}

// Limits of a VM spec that hold for every backend. A backend may narrow them
// further through its capabilities (e.g. the host's CPU count).
const (
	MinMemoryMB   = 64
	MaxNameLength = 63
	maxLabels     = 64
)

var (
	nameRE     = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`)
	labelKeyRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$`)
	envKeyRE   = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
)

// ValidateName checks a VM name: 1 to 63 characters of [a-z0-9-], not
// starting or ending with '-' (a DNS label, so it can become a hostname).
func ValidateName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%w: vm name is empty; pass a name such as --name web-1", ErrInvalid)
	case len(name) > MaxNameLength:
		return fmt.Errorf("%w: vm name is %d characters long; use at most %d", ErrInvalid, len(name), MaxNameLength)
	case !nameRE.MatchString(name):
		return fmt.Errorf("%w: vm name %q may only hold lowercase letters, digits and '-', and must start and end with a letter or digit", ErrInvalid, name)
	}
	return nil
}

// ValidateEnv checks environment variable names.
func ValidateEnv(env map[string]string) error {
	for k := range env {
		if !envKeyRE.MatchString(k) {
			return fmt.Errorf("%w: environment variable name %q must match [A-Za-z_][A-Za-z0-9_]*", ErrInvalid, k)
		}
	}
	return nil
}

// Validate checks a spec against the limits every backend shares. maxVCPUs
// is the most vCPUs this deployment allows (usually the host's CPU count);
// zero means no upper bound is checked here.
func (s VMSpec) Validate(maxVCPUs int) error {
	if err := ValidateName(s.Name); err != nil {
		return err
	}
	if s.VCPUs < 1 {
		return fmt.Errorf("%w: vcpus is %d; a VM needs at least 1", ErrInvalid, s.VCPUs)
	}
	if maxVCPUs > 0 && s.VCPUs > maxVCPUs {
		return fmt.Errorf("%w: vcpus is %d but the host has only %d CPUs; ask for %d or fewer", ErrInvalid, s.VCPUs, maxVCPUs, maxVCPUs)
	}
	if s.MemoryMB < MinMemoryMB {
		return fmt.Errorf("%w: memory is %d MiB; a VM needs at least %d MiB", ErrInvalid, s.MemoryMB, MinMemoryMB)
	}
	if len(s.Labels) > maxLabels {
		return fmt.Errorf("%w: %d labels given; at most %d are allowed", ErrInvalid, len(s.Labels), maxLabels)
	}
	for k := range s.Labels {
		if !labelKeyRE.MatchString(k) {
			return fmt.Errorf("%w: label key %q must be 1-63 characters of [A-Za-z0-9._/-]", ErrInvalid, k)
		}
	}
	if err := ValidateNetwork(s.Network); err != nil {
		return err
	}
	if err := s.Tools.Validate(); err != nil {
		return err
	}
	return ValidateEnv(s.Env)
}
