package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/jail"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// Confinement (see pkg/vmm/internal/jail). With it on, a VM's directory
// is laid out so that its uid can write only what its VMM must:
//
//	<id>/            root 0711: the uid can reach its files, not list or
//	                 replace them (vm.json names the uid and the jail's
//	                 contents, so a VMM able to rewrite it would choose its
//	                 next jail; this is why the directory is not the uid's)
//	  vm.json, *.pid, qemu.log, state       root 0600
//	  overlay*.qcow2 (active layer), console.log   the uid's, 0600
//	  overlay*.qcow2 (frozen by a snapshot)        root 0644
//	  run/           the uid's, 0700: the sockets its QEMU makes (QMP, agent)
//	  jail/          root 0700: the mount point of the jail's root, used
//	                 only inside each jailer's private mount namespace

// Jail-specific files in a VM's run directory.
const (
	dirSockets  = "run"
	dirJailRoot = "jail"
)

// leaseGrace is how long a uid lease of another run directory is kept
// after its VM directory is gone: longer than any create takes between
// leasing and renaming its directory into place.
const leaseGrace = time.Hour

// jailFile is a confined VM's ids, recorded in vm.json so that every boot
// (and a restarted worker) uses the same uid.
type jailFile struct {
	jail.IDs
}

// newJail returns the jail manager, or nil when confinement is off.
func newJail(cfg jail.Config) (*jail.Manager, error) {
	if !cfg.On() {
		return nil, nil
	}
	m, err := jail.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("qemu backend: confining VMs: %w (vmm.qemu.jail.enabled: false turns confinement off, for debugging only)", err)
	}
	return m, nil
}

// leaseUID gives the VM whose final directory is dir a uid (idempotent).
func (o *Orchestrator) leaseUID(dir string) (*jailFile, error) {
	ids, err := o.jail.Leases().Acquire(dir)
	if err != nil {
		return nil, fmt.Errorf("leasing a uid for vm %s: %w", filepath.Base(dir), err)
	}
	return &jailFile{IDs: ids}, nil
}

// prepareJail makes VM id ready to boot confined: its uid claimed (leased
// now for a VM made while confinement was off), its files owned as the
// layout above says, and its cgroup made with the VM's limits. It returns
// the cgroup directories the VMMs join.
func (o *Orchestrator) prepareJail(id string, vf *vmFile) ([]string, error) {
	dir := o.RunDir(id)
	if vf.Jail == nil {
		jf, err := o.leaseUID(dir)
		if err != nil {
			return nil, err
		}
		vf.Jail = jf
		if err := o.writeVM(id, vf); err != nil {
			return nil, err
		}
	} else if err := o.jail.Leases().Claim(vf.Jail.IDs, dir); err != nil {
		return nil, fmt.Errorf("claiming vm %s's uid: %w", id, err)
	}
	uid, gid := vf.Jail.UID, vf.Jail.GID
	if err := os.Chmod(dir, 0o711); err != nil {
		return nil, err
	}
	for _, d := range []struct {
		name     string
		uid, gid int
	}{{dirSockets, uid, gid}, {dirJailRoot, 0, 0}} {
		p := filepath.Join(dir, d.name)
		if err := os.Mkdir(p, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("preparing vm %s's jail: %w", id, err)
		}
		if err := os.Lchown(p, d.uid, d.gid); err != nil {
			return nil, fmt.Errorf("preparing vm %s's jail: %w", id, err)
		}
	}
	// QEMU opens the console log itself (append), so it must exist as
	// the uid's.
	con := o.path(id, fileConsole)
	f, err := os.OpenFile(con, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("preparing vm %s's console log: %w", id, err)
	}
	f.Close()
	for _, p := range []string{con, o.path(id, vf.disk())} {
		if err := ownPrivately(p, uid, gid); err != nil {
			return nil, fmt.Errorf("preparing vm %s's jail: %w", id, err)
		}
	}
	cgs, err := o.jail.Cgroups().Create(id, o.jail.Limits(vf.Spec.VCPUs, vf.Spec.MemoryMB))
	if err != nil {
		return nil, fmt.Errorf("making vm %s's cgroup: %w", id, err)
	}
	return cgs, nil
}

// ownPrivately gives the file at p to uid/gid, readable by them alone
// (qemu-img makes overlays 0644, which would let every VM's uid read
// every other VM's disk).
func ownPrivately(p string, uid, gid int) error {
	if err := os.Lchown(p, uid, gid); err != nil {
		return err
	}
	return os.Chmod(p, 0o600)
}

// setTAPOwner gives a nat VM's TAP to its uid, so the unprivileged QEMU
// may attach to it.
func (o *Orchestrator) setTAPOwner(vf *vmFile) error {
	if o.jail == nil || vf.Net == nil || vf.Jail == nil {
		return nil
	}
	return o.net.Do(func() error { return network.SetTAPOwner(vf.Net.TAP, vf.Jail.UID, vf.Jail.GID) })
}

// jailedCommand returns the command that starts argv (argv[0] absolute)
// for VM id: through the jailer when confinement is on, directly when off.
// needsNet is set for the QEMU of a VM with a TAP, which must open it in
// the TAP's network namespace; every other VMM gets a namespace of its own.
func (o *Orchestrator) jailedCommand(id string, vf *vmFile, cgroups []string, devices []string, argv []string, needsNet bool) (*exec.Cmd, error) {
	if o.jail == nil {
		return exec.Command(argv[0], argv[1:]...), nil
	}
	ro := []string{"/usr"}
	if _, err := os.Stat("/etc/ld.so.cache"); err == nil {
		ro = append(ro, "/etc/ld.so.cache")
	}
	// Merged-/usr hosts have /lib and /lib64 as links into /usr (copied
	// into the jail as links); others have them as directories.
	for _, p := range []string{"/lib", "/lib64", "/bin"} {
		if _, err := os.Lstat(p); err == nil {
			ro = append(ro, p)
		}
	}
	// The VMM binary, and what a link to it resolves to, must be in the
	// jail too.
	ro = append(ro, argv[0])
	if real, err := filepath.EvalSymlinks(argv[0]); err == nil {
		ro = append(ro, real)
	}
	ro = append(ro, o.cfg.KernelPath, o.cfg.InitrdPath, o.cfg.RootfsPath)
	// A clone's disk layers below its own: the snapshots' frozen ones.
	ro = append(ro, vf.sharedLayers()...)
	if vf.Spec.Tools != nil {
		for _, v := range vf.Spec.Tools.Volumes {
			if v.Image != "" {
				ro = append(ro, v.Image)
			}
		}
	}
	return o.jail.Command(jail.Spec{
		UID: vf.Jail.UID, GID: vf.Jail.GID,
		Root:      o.path(id, dirJailRoot),
		ReadOnly:  dedupe(ro),
		ReadWrite: []string{o.RunDir(id)},
		Devices:   devices,
		Cgroups:   cgroups,
		Argv:      argv,
		NoNetwork: !needsNet,
	})
}

// vmmDevices are the device nodes a VMM gets in its jail.
func (o *Orchestrator) vmmDevices(vf *vmFile, qemu bool) []string {
	devs := []string{"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"}
	if qemu && vf.Net != nil {
		devs = append(devs, "/dev/net/tun")
	}
	if qemu && o.accel.Name == AccelKVM {
		devs = append(devs, "/dev/kvm")
	}
	return devs
}

// dedupe drops repeated paths and paths under a directory already listed
// (a kernel under /usr), keeping the order.
func dedupe(paths []string) []string {
	var out []string
	for _, p := range paths {
		covered := false
		for _, q := range out {
			if p == q || strings.HasPrefix(p, q+"/") {
				covered = true
				break
			}
		}
		if !covered {
			out = append(out, p)
		}
	}
	return out
}

// sandboxArgs is QEMU's own seccomp filter, on top of the jailer's. It
// works because QEMU starts already unprivileged; with -runas it would
// kill QEMU (see docs/security.md).
var sandboxArgs = []string{"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"}

// jailArgs appends QEMU's own sandbox to args when confinement is on.
func (o *Orchestrator) jailArgs(args []string) []string {
	if o.jail == nil {
		return args
	}
	return append(args, sandboxArgs...)
}

// dropCgroup removes VM id's cgroup once its processes are gone.
func (o *Orchestrator) dropCgroup(id string) {
	if o.jail == nil {
		return
	}
	if err := o.jail.Cgroups().Remove(id); err != nil {
		o.log.Warn("cannot remove vm cgroup; reconcile will", "vm_id", id, "err", err)
	}
}

// releaseUID gives VM id's uid back after its directory is gone.
func (o *Orchestrator) releaseUID(id string, jf *jailFile) error {
	if o.jail == nil || jf == nil {
		return nil
	}
	if err := o.jail.Leases().Release(jf.UID, o.RunDir(id)); err != nil {
		return fmt.Errorf("releasing vm %s's uid: %w", id, err)
	}
	return nil
}

// reconcileJail removes the cgroups and uid leases of VMs that are gone:
// a cgroup of no running VM of this backend that holds no process, and a
// lease of a VM directory that no longer exists (creating: ids being
// made by CreateVM now).
func (o *Orchestrator) reconcileJail(creating map[string]bool) error {
	if o.jail == nil {
		return nil
	}
	// A cgroup of a VM whose uid lease names this backend's run dir is
	// this backend's own, and goes at once when the VM is gone; any other
	// may be another worker's VM being made, and gets the lease grace.
	held, err := o.jail.Leases().List()
	if err != nil {
		return err
	}
	mine := map[string]bool{}
	for _, h := range held {
		if filepath.Dir(h) == filepath.Clean(o.cfg.RunDir) {
			mine[filepath.Base(h)] = true
		}
	}
	cgs, err1 := o.jail.Cgroups().Reap(func(name string) bool {
		p := o.procs(name)
		return p != nil && p.qemu.Alive()
	}, func(name string) time.Duration {
		if mine[name] && !creating[name] {
			return 0
		}
		return leaseGrace
	})
	leases, err2 := o.jail.Leases().Reap(o.cfg.RunDir, func(holder string) bool {
		if creating[filepath.Base(holder)] {
			return true
		}
		_, err := os.Stat(holder)
		return err == nil
	}, leaseGrace)
	if len(cgs)+len(leases) > 0 {
		o.log.Info("reconcile removed jail leftovers", "cgroups", cgs, "uids", leases)
	}
	return errors.Join(err1, err2)
}

// jailInfo is VM id's confinement for its status.
func (o *Orchestrator) jailInfo(id string, vf *vmFile, running bool) *vmm.JailInfo {
	if o.jail == nil || vf.Jail == nil {
		return nil
	}
	ji := &vmm.JailInfo{UID: vf.Jail.UID, GID: vf.Jail.GID}
	if running {
		ji.Cgroup = o.jail.Cgroups().Path(id)
	}
	return ji
}

// Usage implements vmm.UsageReporter from the VM's cgroup.
func (o *Orchestrator) Usage(ctx context.Context, id string) (vmm.Usage, error) {
	if err := ctx.Err(); err != nil {
		return vmm.Usage{}, err
	}
	if types.ValidateID(id) != nil {
		return vmm.Usage{}, notFound(id)
	}
	if _, err := o.readVM(id); err != nil {
		return vmm.Usage{}, err
	}
	if o.jail == nil {
		return vmm.Usage{}, fmt.Errorf("%w: vm %s runs without a cgroup: confinement (vmm.qemu.jail) is off", types.ErrConflict, id)
	}
	if p := o.procs(id); p == nil || !p.qemu.Alive() {
		return vmm.Usage{}, fmt.Errorf("%w: vm %s is not running", types.ErrConflict, id)
	}
	u, err := o.jail.Cgroups().Usage(id)
	if errors.Is(err, types.ErrNotFound) {
		return vmm.Usage{}, fmt.Errorf("%w: vm %s is not running", types.ErrConflict, id)
	}
	if err != nil {
		return vmm.Usage{}, err
	}
	return vmm.Usage{CPUNanos: u.CPUNanos, MemoryBytes: u.MemoryBytes}, nil
}

// spawnJailed starts argv for VM id, its output appended to logPath and its
// pid written to pidPath, confined when confinement is on: in the
// network's namespace when needsNet (QEMU with a TAP), in a network
// namespace of its own otherwise.
func (o *Orchestrator) spawnJailed(id string, vf *vmFile, cgroups, devices, argv []string, logPath, pidPath string, needsNet bool) (*vmutil.Proc, error) {
	cmd, err := o.jailedCommand(id, vf, cgroups, devices, argv, needsNet)
	if err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	var p *vmutil.Proc
	err = o.inNetns(vf.Net, func() (err error) {
		p, err = vmutil.Spawn(cmd, pidPath, nil)
		return err
	})
	return p, err
}
