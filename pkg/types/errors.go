package types

import "errors"

// Error kinds. Every error returned by the public API wraps at most one of
// these so callers (the CLI, the gateway) can map it to an exit code or an
// HTTP status with errors.Is, in one place.
var (
	// ErrNotFound: the VM, task, execution or job does not exist.
	ErrNotFound = errors.New("not found")
	// ErrConflict: the request clashes with the current state, e.g. exec on
	// a stopped VM or a name that is already taken.
	ErrConflict = errors.New("conflict")
	// ErrInvalid: the input can never succeed as given.
	ErrInvalid = errors.New("invalid input")
	// ErrNotSupported: the backend does not offer the operation.
	ErrNotSupported = errors.New("not supported")
	// ErrUnavailable: a dependency (PostgreSQL, Redis, the VMM, the guest
	// agent) cannot be reached right now; retrying later may succeed.
	ErrUnavailable = errors.New("unavailable")
	// ErrLimit: a quota (VMs, vCPUs, memory of a tenant) would be exceeded.
	// Deleting something or raising the limit makes the request succeed.
	ErrLimit = errors.New("limit exceeded")
)
