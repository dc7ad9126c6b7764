package docker

import (
	"strconv"

	"github.com/docker/docker/api/types/container"
)

// DefaultPidsLimit bounds the processes and threads of one container (the
// agent's included) unless Config.PidsLimit says otherwise: enough for
// builds and test runners, few enough that a fork bomb stays a nuisance to
// its own VM.
const DefaultPidsLimit = 1024

// keptCapabilities are the only capabilities a VM's container keeps; every
// other one is dropped (CapDrop ALL). The agent runs as root and each is
// there because it, or an ordinary root command in the sandbox, needs it:
var keptCapabilities = []string{
	// WriteFile and MakeDir with a user give the new files to that user
	// (pkg/agent/server_files.go), and root's `chown` works.
	"CAP_CHOWN",
	// Root reads and writes files whatever their mode and owner, as it
	// does on a VM: a file upload into a user's 0700 home, reading a
	// user's 0600 file.
	"CAP_DAC_OVERRIDE",
	// WriteFile applies the asked mode to an existing file another user
	// owns; root's chmod and touch of other users' files.
	"CAP_FOWNER",
	// Commands run as another user (Exec's user, E2B's `user`) switch with
	// setgroups, setgid and setuid before exec (pkg/agent/command.go).
	"CAP_SETGID",
	"CAP_SETUID",
	// The agent signals and kills the process groups of commands that run
	// as other users (timeouts, cancel, E2B's kill).
	"CAP_KILL",
}

// Left out of Docker's default set, and why nothing needs them here:
// MKNOD (the engine makes /dev), NET_RAW (VMs have no network, and raw
// sockets are a classic kernel attack surface), NET_BIND_SERVICE (Docker
// 20.10 and later set net.ipv4.ip_unprivileged_port_start=0 in a
// container's network namespace, so root binds low ports without it),
// SYS_CHROOT, SETPCAP, SETFCAP, FSETID and AUDIT_WRITE (no agent path and
// no ordinary command needs them).

// securityOpts turns on no-new-privileges: a setuid binary gains nothing,
// so a command that runs as another user cannot climb back to root. No
// "seccomp=" option is ever given, so the engine's default seccomp profile
// applies; "seccomp=unconfined" must never appear here. Engine API 1.41
// accepts the bare name (and "no-new-privileges:true").
var securityOpts = []string{"no-new-privileges"}

// Writable places of the read-only root file system, where the agent and
// ordinary programs write. The paths hold no data that must outlive a
// stop, as in a VM, where /tmp and /run are tmpfs too (see
// pkg/agent/guestinit). The agent's socket directory (GuestRunDir) is a
// bind mount under /run; the engine mounts parents first.
var tmpfsDirs = []struct {
	path string
	mode string
}{
	{"/tmp", "1777"},
	{"/var/tmp", "1777"},
	{"/run", "755"},
}

// homeDirs are the users' home directories (root's, and /home with E2B's
// /home/user and others). Files there must survive a stop and start as on
// a VM's disk, so they are anonymous volumes, not tmpfs: the engine fills
// them from the image at create and removes them with the container
// (DeleteVM removes volumes). They are declared in the container's config
// rather than as Mounts because Engine 20.10 removes only config volumes
// with the container.
var homeDirs = []string{"/root", "/home"}

// tmpfsOptions is the mount data of a writable tmpfs of a VM with memMB
// of memory. exec overrides the engine's default noexec: users run what
// they build or download there, as on a VM. Its size is the VM's memory,
// which the memory cgroup charges tmpfs pages to anyway.
func tmpfsOptions(mode string, memMB int) string {
	return "rw,exec,nosuid,nodev,mode=" + mode + ",size=" + strconv.Itoa(memMB) + "m"
}

// confine sets what hardens a VM's container (see keptCapabilities,
// securityOpts, tmpfsDirs and homeDirs) on its config.
func (o *Orchestrator) confine(cfg *container.Config, hc *container.HostConfig, memMB int) {
	hc.CapDrop = []string{"ALL"}
	hc.CapAdd = append([]string(nil), keptCapabilities...)
	hc.SecurityOpt = append([]string(nil), securityOpts...)
	limit := o.cfg.PidsLimit
	hc.PidsLimit = &limit
	hc.ReadonlyRootfs = !o.cfg.WritableRootfs
	if hc.Tmpfs == nil {
		hc.Tmpfs = map[string]string{}
	}
	for _, d := range tmpfsDirs {
		hc.Tmpfs[d.path] = tmpfsOptions(d.mode, memMB)
	}
	if cfg.Volumes == nil {
		cfg.Volumes = map[string]struct{}{}
	}
	for _, d := range homeDirs {
		cfg.Volumes[d] = struct{}{}
	}
}

// minPidsLimit is the lowest pids limit New accepts: below it the Go
// runtime of the agent could not even start its threads.
const minPidsLimit = 32
