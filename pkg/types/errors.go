package types

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

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
	// ErrOutcomeUnknown: a command started, then the worker running it was
	// lost (killed, restarted) and its result can no longer be had from
	// the guest. The command is never run again (at most once), so whether
	// it did its work is unknown. A task failed this way has an Error that
	// begins with this error's text (see OutcomeUnknown).
	ErrOutcomeUnknown = errors.New("outcome unknown")
)

// OutcomeUnknown reports whether a failed task's error text says its
// command's outcome is unknown (ErrOutcomeUnknown), so that callers that
// only have the stored text (the CLI, HTTP clients) can tell it from a
// command that never ran.
func OutcomeUnknown(taskError string) bool {
	return strings.HasPrefix(taskError, ErrOutcomeUnknown.Error()+":")
}

// OwnerSilent is the reason given for a VM whose owner worker stopped
// reporting (VMLost): the same text from the service, which notices it
// when a call arrives, and from the workers' sweeper.
func OwnerSilent(worker string, lastSeen time.Time) string {
	return fmt.Sprintf("owner worker %s has not reported since %s", worker, lastSeen.UTC().Format(time.RFC3339))
}
