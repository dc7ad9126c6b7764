package cli

import (
	"github.com/aetherium/aetherium-core/pkg/config"
	"github.com/aetherium/aetherium-core/pkg/vmm/jailer"
)

// checkJail reports how the configured microVM backend confines its VMMs
// (pkg/vmm/internal/jail): on or off (off fails loudly), the jailer binary,
// the cgroup version and controllers, the uid range and seccomp. Only the
// qemu backend uses this jail; docker and firecracker have their own.
func checkJail(cfg *config.Config) []check {
	if cfg.VMM.Provider != "qemu" {
		return nil
	}
	var out []check
	for _, c := range jailer.Diagnose(cfg.VMM.QEMU.Jail) {
		out = append(out, check{Name: "qemu " + c.Name, OK: c.OK, Detail: c.Detail, Fix: c.Fix})
	}
	return out
}
