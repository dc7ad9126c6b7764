package types

import (
	"fmt"
	"regexp"
	"time"
)

// Limits bound what one tenant may hold at once. A zero field means no
// limit.
type Limits struct {
	MaxVMs      int `json:"max_vms,omitempty" yaml:"max_vms"`
	MaxVCPUs    int `json:"max_vcpus,omitempty" yaml:"max_vcpus"`
	MaxMemoryMB int `json:"max_memory_mb,omitempty" yaml:"max_memory_mb"`
}

// Merge returns l with every zero field taken from def.
func (l Limits) Merge(def Limits) Limits {
	if l.MaxVMs == 0 {
		l.MaxVMs = def.MaxVMs
	}
	if l.MaxVCPUs == 0 {
		l.MaxVCPUs = def.MaxVCPUs
	}
	if l.MaxMemoryMB == 0 {
		l.MaxMemoryMB = def.MaxMemoryMB
	}
	return l
}

// Validate rejects negative limits.
func (l Limits) Validate() error {
	if l.MaxVMs < 0 || l.MaxVCPUs < 0 || l.MaxMemoryMB < 0 {
		return fmt.Errorf("%w: limits must not be negative (max_vms %d, max_vcpus %d, max_memory_mb %d); use 0 for no limit",
			ErrInvalid, l.MaxVMs, l.MaxVCPUs, l.MaxMemoryMB)
	}
	return nil
}

// Usage is what a tenant holds: its VMs that are not deleted.
type Usage struct {
	VMs      int `json:"vms"`
	VCPUs    int `json:"vcpus"`
	MemoryMB int `json:"memory_mb"`
}

// Check returns an error wrapping ErrLimit when adding vcpus and memoryMB
// in one more VM to u would pass a limit; the message names the limit and
// the current use.
func (l Limits) Check(tenant string, u Usage, vcpus, memoryMB int) error {
	who := "tenant " + fmt.Sprintf("%q", tenant)
	switch {
	case l.MaxVMs > 0 && u.VMs+1 > l.MaxVMs:
		return fmt.Errorf("%w: %s may have at most %d live VMs and has %d; delete one first", ErrLimit, who, l.MaxVMs, u.VMs)
	case l.MaxVCPUs > 0 && u.VCPUs+vcpus > l.MaxVCPUs:
		return fmt.Errorf("%w: %s may use at most %d vCPUs in all and uses %d; this VM asks for %d more", ErrLimit, who, l.MaxVCPUs, u.VCPUs, vcpus)
	case l.MaxMemoryMB > 0 && u.MemoryMB+memoryMB > l.MaxMemoryMB:
		return fmt.Errorf("%w: %s may use at most %d MiB of memory in all and uses %d MiB; this VM asks for %d MiB more", ErrLimit, who, l.MaxMemoryMB, u.MemoryMB, memoryMB)
	}
	return nil
}

// APIKey is a stored API key. Only a hash of its secret is kept.
type APIKey struct {
	ID     string `json:"id"`
	Name   string `json:"name"`
	Tenant string `json:"tenant"`
	// Admin keys see and act on every tenant's VMs.
	Admin bool `json:"admin"`
	// Hash is the SHA-256 of the secret part of the key.
	Hash []byte `json:"-"`
	// Limits override the configured per-tenant limits where non-zero.
	Limits    Limits     `json:"limits"`
	CreatedAt time.Time  `json:"created_at"`
	RevokedAt *time.Time `json:"revoked_at,omitempty"`
}

var tenantRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$`)

// ValidateTenant checks a tenant name: 1 to 63 characters of [a-z0-9._-],
// starting and ending with a letter or digit.
func ValidateTenant(t string) error {
	if !tenantRE.MatchString(t) {
		return fmt.Errorf("%w: tenant %q must be 1-63 characters of lowercase letters, digits, '.', '_' and '-', starting and ending with a letter or digit", ErrInvalid, t)
	}
	return nil
}

// FileOptions say how a file is written into a guest.
type FileOptions struct {
	// Mode holds the permission bits (0: 0644).
	Mode uint32 `json:"mode,omitempty"`
	// User owns the file: a name or numeric uid in the guest. Empty: the
	// agent's user (root), the same default as commands.
	User string `json:"user,omitempty"`
	// MakeParents creates missing parent directories (owned by User).
	MakeParents bool `json:"make_parents,omitempty"`
}
