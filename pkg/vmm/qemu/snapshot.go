package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// Pause, suspend and snapshots go through QMP (qmp.go). QEMU saves a VM's
// memory and device state as an outgoing migration and loads it as an
// incoming one. QEMU runs under seccomp with spawn=deny, so no exec: URI
// can serve: the worker opens the file and passes it over the monitor
// socket (getfd, SCM_RIGHTS), and QEMU migrates to or from fd:NAME. The
// state file therefore never has to be inside the VMM's jail.
//
// The root disk is a chain of qcow2 layers over the base image. A
// snapshot freezes the active layer (QEMU goes on in a new one,
// blockdev-snapshot-sync) and hard-links the frozen layers into the
// snapshot's directory. Layers name the one below them relatively
// (overlay-1.qcow2 -> overlay.qcow2), so the same chain resolves in the run
// directory and in the snapshot directory; the first layer names the base
// image, or a snapshot's frozen top layer, absolutely.

// Files of a snapshot directory.
const (
	snapMeta  = "snapshot.json"
	snapState = "state"
)

// cloneFile records, in vm.json, the snapshot a VM was made from.
type cloneFile struct {
	// Dir is the snapshot's directory.
	Dir string `json:"dir"`
	// Restored is set once the VM was started from the snapshot; later
	// starts boot its disk.
	Restored bool `json:"restored,omitempty"`
	// Layers are the frozen disk layers the VM's disk stands on (in the
	// snapshot's directory and the directories of the snapshots it came
	// from), which its jail must show.
	Layers []string `json:"layers,omitempty"`
}

// snapshotFile is snapshot.json.
type snapshotFile struct {
	Provider string       `json:"provider"`
	SourceID string       `json:"source_id"`
	Spec     types.VMSpec `json:"spec"`
	// Cmdline is the kernel command line the source booted with: the
	// restore must be given the same devices and firmware input.
	Cmdline string `json:"cmdline"`
	// Kernel and Initrd are what the source booted.
	Kernel string `json:"kernel"`
	Initrd string `json:"initrd"`
	// Top is the frozen disk layer in this directory a clone's disk
	// stands on; Layers are every frozen layer the chain holds, this
	// directory's and those of the snapshots the source came from, by
	// absolute path.
	Top    string   `json:"top"`
	Layers []string `json:"layers"`
	// VirtualSize is the root disk's size in bytes.
	VirtualSize int64     `json:"virtual_size"`
	CreatedAt   time.Time `json:"created_at"`
}

// restoreFrom is a saved state a VM starts from instead of booting.
type restoreFrom struct {
	state   string // the memory and device state
	cmdline string // the kernel command line it was saved with; "": the VM's
	clone   bool   // a clone's first start (identity), not a resume
}

// disk is the root disk's active layer.
func (vf *vmFile) disk() string {
	if vf.Disk == "" {
		return fileOverlay
	}
	return vf.Disk
}

// sharedLayers are the frozen layers, outside the run directory, the VM's
// disk stands on.
func (vf *vmFile) sharedLayers() []string {
	if vf.Clone == nil {
		return nil
	}
	return vf.Clone.Layers
}

// pendingRestore returns the saved state StartVM must restore VM id from:
// its own after Suspend, its snapshot's on a clone's first start; nil to
// boot.
func (o *Orchestrator) pendingRestore(id string, vf *vmFile) (*restoreFrom, error) {
	if vf.Suspended {
		return &restoreFrom{state: o.path(id, fileState)}, nil
	}
	if vf.Clone != nil && !vf.Clone.Restored {
		meta, err := readSnapshot(vf.Clone.Dir)
		if err != nil {
			return nil, fmt.Errorf("starting vm %s from its snapshot: %w", id, err)
		}
		return &restoreFrom{state: filepath.Join(vf.Clone.Dir, snapState), cmdline: meta.Cmdline, clone: true}, nil
	}
	return nil, nil
}

// live returns VM id's record and processes when its QEMU runs, or
// types.ErrConflict naming its state. The VM's lock is held.
func (o *Orchestrator) live(id string, vf *vmFile, op string) (*vmProcs, error) {
	p := o.procs(id)
	if p != nil && p.qemu.Alive() {
		return p, nil
	}
	st, err := o.status(id)
	state := types.VMStopped
	if err == nil {
		state = st.State
	}
	return nil, fmt.Errorf("%w: cannot %s vm %s: it is %s, not running or paused", types.ErrConflict, op, id, state)
}

// Pause implements vmm.Snapshotter: QMP stop.
func (o *Orchestrator) Pause(ctx context.Context, id string) error {
	vf, unlock, err := vmutil.Enter(ctx, &o.locks, id, o.readVM)
	if err != nil {
		return err
	}
	defer unlock()
	if _, err := o.live(id, vf, "pause"); err != nil {
		return err
	}
	if vf.Paused {
		return nil
	}
	if err := o.setPaused(ctx, id, vf, true); err != nil {
		return err
	}
	o.log.Info("paused vm", "vm_id", id)
	return nil
}

// Resume implements vmm.Snapshotter: QMP cont for a paused VM, a restore
// from its state file in a new QEMU for a suspended one.
func (o *Orchestrator) Resume(ctx context.Context, id string) error {
	vf, unlock, err := vmutil.Enter(ctx, &o.locks, id, o.readVM)
	if err != nil {
		return err
	}
	defer unlock()
	p := o.procs(id)
	if (p == nil || !p.qemu.Alive()) && vf.Suspended {
		return o.restore(ctx, id, vf, &restoreFrom{state: o.path(id, fileState)})
	}
	if _, err := o.live(id, vf, "resume"); err != nil {
		return err
	}
	if !vf.Paused {
		return nil
	}
	if err := o.setPaused(ctx, id, vf, false); err != nil {
		return err
	}
	c, err := o.client(id)
	if err != nil {
		return err
	}
	if err := o.afterResume(ctx, id, c, vf, false); err != nil {
		return fmt.Errorf("resuming vm %s: %w", id, err)
	}
	o.log.Info("resumed vm", "vm_id", id)
	return nil
}

// setPaused stops (paused) or continues VM id's vCPUs through QMP and
// records it in vm.json.
func (o *Orchestrator) setPaused(ctx context.Context, id string, vf *vmFile, paused bool) error {
	cmd, what := "cont", "resuming"
	if paused {
		cmd, what = "stop", "pausing"
	}
	if err := o.withMonitor(ctx, id, func(m monitor) error { return m.run(cmd, nil, nil, nil) }); err != nil {
		return fmt.Errorf("%s vm %s: %w", what, id, err)
	}
	vf.Paused = paused
	return o.writeVM(id, vf)
}

// afterResume runs once a VM's vCPUs run again after a pause or a
// suspend, or as a snapshot's clone, with its agent's client: the guest's
// clock stands where it stopped, and a clone has its source's identity.
//
// A nat clone's NIC also has its source's MAC and address: the restored
// virtio-net device state carries the source's MAC whatever -device
// says, and the guest configured the source's address at boot. Its TAP's
// anti-spoofing rules admit only the clone's own MAC and address, so
// until the agent moves the NIC to them (the guest sets the MAC through
// virtio-net's control queue, which QEMU's receive filter follows) the
// clone can reach nothing and nothing can be spoofed.
func (o *Orchestrator) afterResume(ctx context.Context, id string, c *agent.Client, vf *vmFile, clone bool) error {
	if !clone {
		return vmutil.SyncClock(ctx, c)
	}
	var ni *agent.NetIdentity
	if vf.Net != nil {
		// Attach is idempotent: it returns the attachment CreateVM made.
		a, err := o.net.Attach(ctx, id)
		if err != nil {
			return fmt.Errorf("reading the clone's network attachment: %w", err)
		}
		ni = &agent.NetIdentity{Interface: guestNIC, MAC: a.MAC, Addr: a.IP, Gateway: a.Gateway, DNS: a.DNS}
	}
	return vmutil.Reidentify(ctx, c, vf.Spec, ni)
}

// guestNIC is the name the guest kernel gives the VM's one virtio-net NIC.
const guestNIC = "eth0"

// Suspend implements vmm.Snapshotter: the VM's state goes to the file
// "state" in its directory, then its QEMU ends.
func (o *Orchestrator) Suspend(ctx context.Context, id string) error {
	vf, unlock, err := vmutil.Enter(ctx, &o.locks, id, o.readVM)
	if err != nil {
		return err
	}
	defer unlock()
	p := o.procs(id)
	if (p == nil || !p.qemu.Alive()) && vf.Suspended {
		return nil
	}
	if _, err := o.live(id, vf, "suspend"); err != nil {
		return err
	}
	tmp := o.path(id, fileState+".tmp")
	if err := o.saveState(ctx, id, vf, tmp, nil); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("suspending vm %s: %w", id, err)
	}
	if err := os.Rename(tmp, o.path(id, fileState)); err != nil {
		return fmt.Errorf("suspending vm %s: %w", id, err)
	}
	// Recorded before QEMU ends: a crash in between leaves a suspended
	// VM whose QEMU the next worker ends (recover).
	vf.Suspended, vf.Paused, vf.Running, vf.Failed = true, false, false, ""
	if err := o.writeVM(id, vf); err != nil {
		return err
	}
	o.stopProcs(id, true)
	o.cleanRuntime(id)
	o.log.Info("suspended vm", "vm_id", id, "state", o.path(id, fileState))
	return nil
}

// saveState stops VM id's vCPUs (unless paused), runs between (nil: skip)
// with them stopped, and migrates the VM's state into a new file at path.
// The VM is left stopped (QEMU's postmigrate) with its disks inactive; a
// cont makes it run again.
func (o *Orchestrator) saveState(ctx context.Context, id string, vf *vmFile, path string, between func(m monitor) error) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	return o.withMonitor(ctx, id, func(m monitor) error {
		if !vf.Paused {
			if err := m.run("stop", nil, nil, nil); err != nil {
				return err
			}
		} else if st, err := m.status(); err != nil {
			return err
		} else if st == "postmigrate" {
			// A paused VM whose state was saved before (a snapshot): QEMU
			// refuses to migrate it again, and QEMU 7.2 reactivates its
			// disks only on cont (block-set-active came in 10.0). So it
			// runs between this cont and stop, about a millisecond.
			if err := m.run("cont", nil, nil, nil); err != nil {
				return err
			}
			if err := m.run("stop", nil, nil, nil); err != nil {
				// It runs now: recorded so, not left "paused".
				vf.Paused = false
				if werr := o.writeVM(id, vf); werr != nil {
					o.log.Warn("cannot record a vm running again after a failed stop", "vm_id", id, "err", werr)
				}
				return err
			}
		}
		if between != nil {
			if err := between(m); err != nil {
				return err
			}
		}
		// QEMU throttles migrations to 128 MiB/s by default, meant for
		// a live migration over a shared network; this one goes to a
		// local file with the vCPUs stopped.
		if err := m.run("migrate-set-parameters", map[string]int64{"max-bandwidth": 1 << 40}, nil, nil); err != nil {
			return err
		}
		if err := m.passFD("state", f); err != nil {
			return err
		}
		if err := m.run("migrate", map[string]string{"uri": "fd:state"}, nil, nil); err != nil {
			return err
		}
		return m.waitMigration(ctx)
	})
}

// cont lets VM id's vCPUs run again (after saveState of a running VM).
func (o *Orchestrator) cont(ctx context.Context, id string) error {
	return o.withMonitor(ctx, id, func(m monitor) error { return m.run("cont", nil, nil, nil) })
}

// restore starts VM id in a new QEMU from the state r names, and returns
// once its agent answers. A failure leaves the VM as it was (suspended,
// or a clone not yet started), so a retry restores again.
func (o *Orchestrator) restore(ctx context.Context, id string, vf *vmFile, r *restoreFrom) error {
	state, err := os.Open(r.state)
	if err != nil {
		return fmt.Errorf("%w: restoring vm %s: its saved state: %v", types.ErrUnavailable, id, err)
	}
	defer state.Close()
	fail := func(err error) error {
		o.stopProcs(id, true)
		o.cleanRuntime(id)
		if vf, rerr := o.readVM(id); rerr == nil {
			vf.Running = false
			_ = o.writeVM(id, vf)
		}
		return fmt.Errorf("restoring vm %s: %w", id, err)
	}
	p, err := o.boot(ctx, id, vf, r)
	if err != nil {
		return err
	}
	// boot recorded a failure of its own; a restore's is not the VM's.
	if err := vmutil.WaitFile(o.path(id, fileQMP), p.qemu, 10*time.Second); err != nil {
		return fail(fmt.Errorf("%s", withTail(err.Error(), "QEMU's log", vmutil.TailFrom(o.path(id, fileQEMULog), p.qemuLogFrom, 10))))
	}
	err = o.withNewMonitor(ctx, id, p.qemu, func(m monitor) error {
		if err := m.passFD("state", state); err != nil {
			return err
		}
		if err := m.run("migrate-incoming", map[string]string{"uri": "fd:state"}, nil, nil); err != nil {
			return err
		}
		if err := m.waitMigration(ctx); err != nil {
			return err
		}
		for {
			st, err := m.status()
			if err != nil {
				return err
			}
			if st != "inmigrate" {
				break
			}
			time.Sleep(time.Millisecond)
		}
		return m.run("cont", nil, nil, nil)
	})
	if err != nil {
		if !p.qemu.Alive() {
			err = fmt.Errorf("%w: %s", err, o.qemuEnded(id, p))
		}
		return fail(err)
	}
	// The clone's identity (or the resumed guest's clock) is the first
	// call: its answer is the agent's.
	err = o.waitAgent(ctx, id, p, false, func(ctx context.Context, c *agent.Client) error {
		return o.afterResume(ctx, id, c, vf, r.clone)
	})
	if err != nil {
		return fail(err)
	}
	vf, err = o.readVM(id)
	if err != nil {
		return err
	}
	vf.Suspended, vf.Paused, vf.Failed = false, false, ""
	if vf.Clone != nil {
		vf.Clone.Restored = true
	}
	if err := o.writeVM(id, vf); err != nil {
		return err
	}
	if !r.clone {
		if err := os.Remove(r.state); err != nil && !errors.Is(err, os.ErrNotExist) {
			o.log.Warn("cannot remove a resumed vm's saved state", "vm_id", id, "err", err)
		}
	}
	o.log.Info("restored vm", "vm_id", id, "from", r.state)
	return nil
}

// Snapshot implements vmm.Snapshotter.
func (o *Orchestrator) Snapshot(ctx context.Context, id, dir string) (*vmm.Snapshot, error) {
	if err := checkSnapshotDir(dir); err != nil {
		return nil, err
	}
	vf, unlock, err := vmutil.Enter(ctx, &o.locks, id, o.readVM)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if _, err := o.live(id, vf, "snapshot"); err != nil {
		return nil, err
	}
	var size int64
	err = o.withMonitor(ctx, id, func(m monitor) (err error) {
		size, err = m.rootSize()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("snapshotting vm %s: %w", id, err)
	}
	// The new active layer, made now (QEMU may not create files in the
	// run directory), standing on the current one by its relative name.
	frozen := vf.disk()
	next := "overlay-" + strconv.Itoa(vf.Layers+1) + ".qcow2"
	if err := o.newLayer(ctx, o.path(id, next), frozen, size, vf); err != nil {
		return nil, fmt.Errorf("snapshotting vm %s: %w", id, err)
	}
	switched := false
	err = o.saveState(ctx, id, vf, filepath.Join(dir, snapState), func(m monitor) error {
		err := m.run("blockdev-snapshot-sync", map[string]string{
			"device": "root", "snapshot-file": o.path(id, next), "format": "qcow2", "mode": "existing",
		}, nil, nil)
		switched = err == nil
		return err
	})
	if switched {
		vf.Disk, vf.Layers = next, vf.Layers+1
		if werr := o.writeVM(id, vf); werr != nil && err == nil {
			err = werr
		}
	} else {
		os.Remove(o.path(id, next))
	}
	if !vf.Paused {
		// Running again whatever happened, as it was.
		if cerr := o.cont(context.WithoutCancel(ctx), id); cerr != nil && err == nil {
			err = cerr
		}
	}
	if err != nil {
		cleanDir(dir)
		return nil, fmt.Errorf("snapshotting vm %s: %w", id, err)
	}
	meta, err := o.writeSnapshot(id, vf, dir, frozen, size)
	if err != nil {
		cleanDir(dir)
		return nil, fmt.Errorf("snapshotting vm %s: %w", id, err)
	}
	o.log.Info("snapshotted vm", "vm_id", id, "dir", dir)
	return &vmm.Snapshot{Dir: dir, Provider: Provider, Spec: meta.Spec, SizeBytes: dirSize(dir)}, nil
}

// writeSnapshot freezes VM id's layers below its active one (root's,
// read-only for every VM's uid: clones read them), links them into dir
// and writes snapshot.json; top is the layer frozen last.
func (o *Orchestrator) writeSnapshot(id string, vf *vmFile, dir, top string, size int64) (*snapshotFile, error) {
	meta := &snapshotFile{
		Provider: Provider, SourceID: id, Spec: vf.Spec,
		Cmdline: cmdlineOf(o.qemuArgs(id, vf, nil)),
		Kernel:  o.cfg.KernelPath, Initrd: o.cfg.InitrdPath,
		Top: top, VirtualSize: size, CreatedAt: time.Now().UTC(),
	}
	meta.Spec.FromSnapshot = ""
	// Frozen layers of the run directory: the original and every
	// overlay-N below the active one.
	names := []string{fileOverlay}
	for n := 1; n < vf.Layers; n++ {
		names = append(names, "overlay-"+strconv.Itoa(n)+".qcow2")
	}
	for _, name := range names {
		src := o.path(id, name)
		if err := os.Chown(src, 0, 0); err != nil {
			return nil, err
		}
		if err := os.Chmod(src, 0o644); err != nil {
			return nil, err
		}
		dst := filepath.Join(dir, name)
		if err := linkOrCopy(src, dst); err != nil {
			return nil, fmt.Errorf("keeping disk layer %s: %w", name, err)
		}
		meta.Layers = append(meta.Layers, dst)
	}
	if vf.Clone != nil {
		meta.Layers = append(meta.Layers, vf.Clone.Layers...)
	} else {
		meta.Layers = append(meta.Layers, o.cfg.RootfsPath) // the first layer's backing
	}
	if err := vmutil.WriteRecord(filepath.Join(dir, snapMeta), meta); err != nil {
		return nil, err
	}
	return meta, nil
}

// cmdlineOf returns the -append value of QEMU arguments.
func cmdlineOf(args []string) string {
	if i := slices.Index(args, "-append"); i >= 0 && i+1 < len(args) {
		return args[i+1]
	}
	return ""
}

// readSnapshot reads dir's snapshot.json.
func readSnapshot(dir string) (*snapshotFile, error) {
	b, err := os.ReadFile(filepath.Join(dir, snapMeta))
	if err != nil {
		return nil, fmt.Errorf("%w: %s is not a qemu snapshot directory: %v", types.ErrInvalid, dir, err)
	}
	var meta snapshotFile
	if err := json.Unmarshal(b, &meta); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", types.ErrInvalid, filepath.Join(dir, snapMeta), err)
	}
	if meta.Provider != Provider {
		return nil, fmt.Errorf("%w: the snapshot in %s was made by the %s backend, not qemu", types.ErrInvalid, dir, meta.Provider)
	}
	for _, f := range append([]string{filepath.Join(dir, snapState)}, meta.Layers...) {
		if _, err := os.Stat(f); err != nil {
			return nil, fmt.Errorf("%w: the snapshot in %s is incomplete: %v", types.ErrInvalid, dir, err)
		}
	}
	return &meta, nil
}

// checkSnapshotDir checks that dir is an absolute, existing, empty
// directory, as Snapshot wants.
func checkSnapshotDir(dir string) error {
	if !filepath.IsAbs(dir) || filepath.Clean(dir) != dir || strings.Contains(dir, ",") {
		return fmt.Errorf("%w: snapshot directory %q must be a clean absolute path without commas", types.ErrInvalid, dir)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("%w: snapshot directory: %v; make it first", types.ErrInvalid, err)
	}
	if len(ents) > 0 {
		return fmt.Errorf("%w: snapshot directory %s is not empty; give a new one", types.ErrInvalid, dir)
	}
	return nil
}

// cleanDir empties dir, which a failed Snapshot leaves as it found it.
func cleanDir(dir string) {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		os.RemoveAll(filepath.Join(dir, e.Name()))
	}
}

// dirSize is what the files in dir take on disk.
func dirSize(dir string) int64 {
	var n int64
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if fi, err := e.Info(); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				n += st.Blocks * 512
			}
		}
	}
	return n
}

// linkOrCopy hard-links src at dst, or copies it across file systems.
func linkOrCopy(src, dst string) error {
	err := os.Link(src, dst)
	if err == nil || !errors.Is(err, syscall.EXDEV) {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// newLayer makes a qcow2 layer at path standing on backing (a name
// relative to path's directory, or absolute) without opening it (QEMU
// may hold it), owned as VM disks are.
func (o *Orchestrator) newLayer(ctx context.Context, path, backing string, size int64, vf *vmFile) error {
	out, err := exec.CommandContext(ctx, o.cfg.ImgBinary, "create", "-q", "-f", "qcow2", "-F", "qcow2",
		"-b", backing, "-u", path, strconv.FormatInt(size, 10)).CombinedOutput()
	if err != nil {
		return fmt.Errorf("making disk layer %s: %v: %s", filepath.Base(path), err, strings.TrimSpace(string(out)))
	}
	if o.jail != nil && vf.Jail != nil {
		return ownPrivately(path, vf.Jail.UID, vf.Jail.GID)
	}
	return nil
}

// prepareClone fills a clone's spec from its snapshot (vCPUs, memory, tool
// disks and whether it has a NIC must be the source's: a restore needs the
// same devices) and returns its record's clone part
// and the snapshot. The clone's own layer is made by CreateVM.
func prepareClone(spec *types.VMSpec) (*cloneFile, *snapshotFile, error) {
	dir := spec.FromSnapshot
	if !filepath.IsAbs(dir) || strings.Contains(dir, ",") {
		return nil, nil, fmt.Errorf("%w: FromSnapshot %q must be an absolute path without commas", types.ErrInvalid, dir)
	}
	meta, err := readSnapshot(dir)
	if err != nil {
		return nil, nil, err
	}
	nic := meta.Spec.Network == types.NetworkNAT
	if spec.Network == types.NetworkNAT && !nic {
		return nil, nil, fmt.Errorf("%w: snapshot %s was taken of a vm without a network; a vm started from it cannot have one (ask for network none)", types.ErrInvalid, dir)
	}
	spec.VCPUs, spec.MemoryMB, spec.Tools = meta.Spec.VCPUs, meta.Spec.MemoryMB, meta.Spec.Tools
	spec.Network = types.NetworkNone
	if nic {
		// The clone gets its own TAP, MAC and address (CreateVM attaches
		// it); afterResume moves the guest's NIC to them.
		spec.Network = types.NetworkNAT
	}
	return &cloneFile{Dir: dir, Layers: meta.Layers}, meta, nil
}

// vmmSnapshotter: Pause, Resume, Suspend and Snapshot are this file's.
var _ vmm.Snapshotter = (*Orchestrator)(nil)

// notRunning is the error of a call that needs the VM's vCPUs running.
func notRunning(id string, vf *vmFile) error {
	switch {
	case vf.Paused:
		return fmt.Errorf("%w: vm %s is paused; resume it first", types.ErrConflict, id)
	case vf.Suspended:
		return fmt.Errorf("%w: vm %s is suspended; resume it first", types.ErrConflict, id)
	}
	return nil
}
