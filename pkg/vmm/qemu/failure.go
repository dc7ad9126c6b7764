package qemu

import (
	"os"

	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// Every message about a failed VM on this backend has one shape: what
// failed, then "; <log> ends with:" and the last lines that log got during
// this boot, the log being the one that says why. The text recorded as
// the VM's failure (its status Detail) and the error StartVM returns for
// the same end are the same words.

// withTail is that shape.
func withTail(what, log, tail string) string { return what + "; " + log + " ends with:\n" + tail }

// logSize is a log's size now, where a boot's own lines will start.
func logSize(path string) int64 {
	if fi, err := os.Stat(path); err == nil {
		return fi.Size()
	}
	return 0
}

// qemuEnded describes the end of p's QEMU: its own log when it wrote
// anything this boot (QEMU's errors, e.g. a kernel it cannot load), else
// the guest's serial console of this boot (a panic, a power-off).
func (o *Orchestrator) qemuEnded(id string, p *vmProcs) string {
	what := "QEMU " + p.qemu.Status()
	if t := vmutil.TailFrom(o.path(id, fileQEMULog), p.qemuLogFrom, 10); t != "" {
		return withTail(what, "QEMU's log", t)
	}
	if t := vmutil.TailFrom(o.path(id, fileConsole), p.consoleFrom, 20); t != "" {
		return withTail(what, "the serial console", t)
	}
	return what + "; neither QEMU's log nor the serial console got any output this boot"
}
