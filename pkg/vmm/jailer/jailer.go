// Package jailer is the public face of the VMM jail (pkg/vmm/internal/jail)
// for the programs outside pkg/vmm that need it: cmd/aether-jailer runs
// Main, and aether-cli doctor runs Diagnose. Backends use the internal
// package directly.
package jailer

import (
	"io"

	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/jail"
)

// Config configures confinement (the vmm.<backend>.jail section).
type Config = jail.Config

// Main is aether-jailer's body: it confines itself as args say and exec()s
// the VMM, returning only on failure, with the exit code, after writing
// why to stderr.
func Main(args []string, stderr io.Writer) int { return jail.Main(args, stderr) }

// Diagnose checks this host's prerequisites for confinement as cfg
// configures it: whether it is on, the jailer binary, the cgroup version
// and controllers, the uid range and seccomp support. It never fails;
// each check says how to fix what it found.
func Diagnose(cfg Config) []vmm.Check { return jail.Diagnose(cfg) }
