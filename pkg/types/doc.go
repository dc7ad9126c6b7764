// Package types holds Aetherium Core's domain types (VMs, tasks, executions,
// jobs), their validation, the VM state machine and the error kinds every
// other package wraps. It imports nothing else of ours so that the public API
// in pkg/ and the gateway service that consumes it can share it freely.
package types
