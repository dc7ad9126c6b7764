package types

import (
	"fmt"
	"regexp"
	"time"
)

// SnapshotKind says what a Snapshot is.
type SnapshotKind string

// Snapshot kinds.
const (
	// KindSnapshot is a snapshot of a user's VM (`aether-cli snapshot`).
	KindSnapshot SnapshotKind = "snapshot"
	// KindTemplate is a template: a VM booted with its tools, set up by a
	// command, and snapshotted once its agent was ready. `vm create
	// --template` restores clones of it instead of booting.
	KindTemplate SnapshotKind = "template"
)

// SnapshotState is where a snapshot is in its life.
type SnapshotState string

// Snapshot states.
const (
	SnapshotCreating SnapshotState = "creating"
	SnapshotReady    SnapshotState = "ready"
	SnapshotFailed   SnapshotState = "failed"
	SnapshotDeleting SnapshotState = "deleting"
	SnapshotDeleted  SnapshotState = "deleted"
)

// Snapshot is a saved VM (memory, devices and disk) that new VMs start
// from by restoring it: a named snapshot of a VM, or a template. Its files
// are on the disk of the worker that owns it, which alone starts its
// clones.
type Snapshot struct {
	ID   string       `json:"id"`
	Name string       `json:"name"`
	Kind SnapshotKind `json:"kind"`
	// VMID is the VM it was taken from (for a template, the VM that built
	// it, deleted once the template is ready).
	VMID     string `json:"vm_id,omitempty"`
	Owner    string `json:"owner,omitempty"`
	Provider string `json:"provider,omitempty"`
	// VCPUs, MemoryMB and Network are the size and network mode of the
	// VMs started from it.
	VCPUs    int    `json:"vcpus"`
	MemoryMB int    `json:"memory_mb"`
	Network  string `json:"network,omitempty"`
	// Tools and Setup are what a template was built with.
	Tools []string `json:"tools,omitempty"`
	Setup string   `json:"setup,omitempty"`
	// Env is the default environment of the VMs started from it.
	Env map[string]string `json:"env,omitempty"`
	// Dir is where its files are on its owner's disk.
	Dir       string        `json:"dir,omitempty"`
	SizeBytes int64         `json:"size_bytes"`
	State     SnapshotState `json:"state"`
	Error     string        `json:"error,omitempty"`
	Tenant    string        `json:"tenant,omitempty"`
	CreatedAt time.Time     `json:"created_at"`
	UpdatedAt time.Time     `json:"updated_at"`
}

// Live reports whether the snapshot is not (being) deleted.
func (s *Snapshot) Live() bool {
	return s.State != SnapshotDeleted && s.State != SnapshotDeleting
}

var snapshotName = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$`)

// ValidateSnapshotName checks the name of a snapshot or template.
func ValidateSnapshotName(kind SnapshotKind, name string) error {
	if !snapshotName.MatchString(name) {
		return fmt.Errorf("%w: %s name %q is invalid; use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalid, kind, name)
	}
	return nil
}
