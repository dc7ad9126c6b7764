package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// The layout of a snapshot directory this backend writes (Snapshot) and
// reads (CreateVM with types.VMSpec.FromSnapshot).
const (
	// snapshotMetaName is the snapshot's description (snapshotMeta).
	snapshotMetaName = "snapshot.json"
	// snapshotFormat is the layout's version in snapshotMeta.Format.
	snapshotFormat  = 1
	snapDirState    = "vm.state"
	snapDirMem      = "vm.mem"
	snapDirRootfs   = "rootfs.ext4"
	snapshotVersion = "firecracker-v1.16"
)

// Names, in a clone's root, of the hard links to its snapshot's state and
// memory: they keep the memory file alive for the life of the clone,
// whatever becomes of the snapshot directory, and put it inside the
// clone's jail where its VMM can open it.
const (
	cloneStateName = "clone.state"
	cloneMemName   = "clone.mem"
)

// ifaceID is the guest network interface's id in the Firecracker API.
const ifaceID = "eth0"

// snapshotMeta is a snapshot directory's snapshot.json.
type snapshotMeta struct {
	// Format is snapshotFormat.
	Format int `json:"format"`
	// Provider is always "firecracker".
	Provider string `json:"provider"`
	// VMM names the API the state file was written by.
	VMM string `json:"vmm"`
	// Source is the id of the VM the snapshot was taken of.
	Source string `json:"source"`
	// Spec is the source VM's spec.
	Spec types.VMSpec `json:"spec"`
	// Taken is when the snapshot was taken.
	Taken time.Time `json:"taken"`
	// Files name the snapshot's files, relative to its directory.
	Files struct {
		State  string `json:"state"`
		Memory string `json:"memory"`
		Rootfs string `json:"rootfs"`
	} `json:"files"`
	// Drives maps each drive id to the path the source VMM had it at;
	// Firecracker re-opens these paths on load.
	Drives map[string]string `json:"drives"`
	// IfaceID is the source VM's network interface, or "".
	IfaceID string `json:"iface_id,omitempty"`
	// Jailed says whether the source VMM ran in a jail (its paths are
	// then relative to the jail's root).
	Jailed bool `json:"jailed"`
}

// checkSnapshotDir refuses a snapshot directory that is not an absolute
// path to an existing, empty directory.
func checkSnapshotDir(dir string) error {
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("%w: snapshot dir %q must be an absolute path", types.ErrInvalid, dir)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("%w: snapshot dir %s: %v; create it (empty) first", types.ErrInvalid, dir, err)
	}
	if len(entries) > 0 {
		return fmt.Errorf("%w: snapshot dir %s is not empty (it holds %s); give an empty directory", types.ErrInvalid, dir, entries[0].Name())
	}
	return nil
}

// clearDir removes what Snapshot may have written into dir; the
// directory itself is the caller's.
func clearDir(dir string) {
	for _, n := range []string{snapDirState, snapDirMem, snapDirRootfs, snapshotMetaName} {
		os.Remove(filepath.Join(dir, n))
	}
}

// collectSnapshot moves a snapshot just written into the VM's root to
// dir, with a frozen copy of the VM's rootfs, and describes it. The VM is
// paused. The files are made the orchestrator's and read-only: the
// jailed VMM that wrote them runs as a leased uid, which a later VM may
// hold.
func (o *Orchestrator) collectSnapshot(rec *record, p paths, dir string) (*vmm.Snapshot, error) {
	for _, f := range []struct{ from, to string }{{snapStateName, snapDirState}, {snapMemName, snapDirMem}} {
		if err := moveFile(p.host(f.from), filepath.Join(dir, f.to)); err != nil {
			return nil, err
		}
	}
	method, err := cloneFile(p.host(rootfsName), filepath.Join(dir, snapDirRootfs), 0o444)
	if err != nil {
		return nil, fmt.Errorf("copying the rootfs: %w", err)
	}
	o.log.Info("froze the rootfs into the snapshot", "vm_id", rec.ID, "method", method)
	meta := snapshotMeta{Format: snapshotFormat, Provider: Provider, VMM: snapshotVersion, Source: rec.ID,
		Spec: recordSpec(rec), Taken: time.Now().UTC(), Drives: o.drives(p, rec), Jailed: p.jailed}
	meta.Files.State, meta.Files.Memory, meta.Files.Rootfs = snapDirState, snapDirMem, snapDirRootfs
	if rec.Options.TAPDevice != "" {
		meta.IfaceID = ifaceID
	}
	b, err := json.MarshalIndent(meta, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, snapshotMetaName), b, 0o444); err != nil {
		return nil, err
	}
	var size int64
	for _, n := range []string{snapDirState, snapDirMem, snapDirRootfs, snapshotMetaName} {
		f := filepath.Join(dir, n)
		if err := os.Lchown(f, os.Getuid(), os.Getgid()); err != nil {
			return nil, err
		}
		if err := os.Chmod(f, 0o444); err != nil {
			return nil, err
		}
		size += diskUsage(f)
	}
	return &vmm.Snapshot{Dir: dir, Provider: Provider, Spec: meta.Spec, SizeBytes: size}, nil
}

// readSnapshotMeta reads a snapshot directory this backend wrote.
func readSnapshotMeta(dir string) (*snapshotMeta, error) {
	if !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("%w: snapshot dir %q must be an absolute path", types.ErrInvalid, dir)
	}
	b, err := os.ReadFile(filepath.Join(dir, snapshotMetaName))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: no firecracker snapshot in %s (it has no %s); take one with Snapshot", types.ErrInvalid, dir, snapshotMetaName)
	} else if err != nil {
		return nil, fmt.Errorf("reading snapshot %s: %w", dir, err)
	}
	var m snapshotMeta
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%w: snapshot %s: %s is not valid: %v", types.ErrInvalid, dir, snapshotMetaName, err)
	}
	if m.Provider != Provider || m.Format != snapshotFormat {
		return nil, fmt.Errorf("%w: snapshot %s was written by the %q backend (format %d); only a firecracker snapshot of format %d can start a firecracker vm", types.ErrInvalid, dir, m.Provider, m.Format, snapshotFormat)
	}
	for _, n := range []string{m.Files.State, m.Files.Memory, m.Files.Rootfs} {
		if n == "" || filepath.Base(n) != n {
			return nil, fmt.Errorf("%w: snapshot %s: %s names a bad file %q", types.ErrInvalid, dir, snapshotMetaName, n)
		}
		if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
			return nil, fmt.Errorf("%w: snapshot %s is incomplete: %v; take it again", types.ErrInvalid, dir, err)
		}
	}
	return &m, nil
}

// fromSnapshot makes spec a clone's: the snapshot fixes its vCPUs,
// memory, tools and network mode (a restored machine keeps its devices).
func fromSnapshot(spec *types.VMSpec, m *snapshotMeta, jailed bool) error {
	wantNIC := m.IfaceID != ""
	if spec.Network == types.NetworkNAT && !wantNIC {
		return fmt.Errorf("%w: snapshot %s was taken of a vm without a network; a vm started from it cannot have one (ask for network none)", types.ErrInvalid, spec.FromSnapshot)
	}
	if jailed != m.Jailed {
		return fmt.Errorf("%w: snapshot %s was taken with the jailer %s and this backend runs with it %s: the snapshot's drive paths would not resolve; restore it on a backend configured alike",
			types.ErrInvalid, spec.FromSnapshot, onOff(m.Jailed), onOff(jailed))
	}
	spec.VCPUs, spec.MemoryMB, spec.Tools = m.Spec.VCPUs, m.Spec.MemoryMB, m.Spec.Tools
	spec.Network = types.NetworkNone
	if wantNIC {
		spec.Network = types.NetworkNAT
	}
	return nil
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// prepareClone links the snapshot's state and memory into a clone's root.
func prepareClone(p paths, m *snapshotMeta, dir string) error {
	for _, f := range []struct{ from, to string }{{m.Files.State, cloneStateName}, {m.Files.Memory, cloneMemName}} {
		if _, err := linkOrCopy(filepath.Join(dir, f.from), p.host(f.to)); err != nil {
			return fmt.Errorf("putting snapshot file %s into the vm's root: %w", f.from, err)
		}
	}
	return nil
}

// recordSpec is the spec a record was created from.
func recordSpec(rec *record) types.VMSpec {
	sp := types.VMSpec{ID: rec.ID, Name: rec.Name, VCPUs: rec.VCPUs, MemoryMB: rec.MemoryMB, Labels: rec.Labels,
		Env: rec.Env, Network: types.NetworkNone, Tools: rec.Tools}
	if rec.Options.TAPDevice != "" {
		sp.Network = types.NetworkNAT
	}
	if rec.Clone != nil {
		sp.FromSnapshot = rec.Clone.Snapshot
	}
	return sp
}

// drives maps a VM's drive ids to their paths as its VMM sees them.
func (o *Orchestrator) drives(p paths, rec *record) map[string]string {
	m := map[string]string{"rootfs": p.vmm(rootfsName)}
	for i := range toolVolumes(rec.Tools) {
		m[toolDriveName(i)] = o.drivePath(p, rec, toolDriveName(i))
	}
	return m
}

// drivePath is where VM rec's drive driveID is as its VMM sees it, or ""
// for a drive it does not have.
func (o *Orchestrator) drivePath(p paths, rec *record, driveID string) string {
	if driveID == "rootfs" {
		return p.vmm(rootfsName)
	}
	for i, v := range toolVolumes(rec.Tools) {
		if toolDriveName(i) != driveID {
			continue
		}
		if p.jailed {
			return p.vmm(toolDriveName(i))
		}
		return v.Image
	}
	return ""
}

// moveFile renames src to dst, or copies it (keeping holes) and removes
// src when they are on different file systems.
func moveFile(src, dst string) error {
	err := os.Rename(src, dst)
	if !errors.Is(err, syscall.EXDEV) {
		return err
	}
	if _, err := cloneFile(src, dst, 0o444); err != nil {
		return err
	}
	return os.Remove(src)
}

// diskUsage is the space a file takes on disk (its allocated blocks).
func diskUsage(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}

// reidentify gives a restored clone its own identity: hostname (its
// spec's), machine-id, RNG seed, the host's time and, on a nat network,
// its own MAC and address, which its TAP's anti-spoofing rules expect (the
// restored NIC still has the snapshot's).
func (o *Orchestrator) reidentify(ctx context.Context, rec *record, c *agent.Client, a *network.Attachment) error {
	var ni *agent.NetIdentity
	if a != nil {
		ni = &agent.NetIdentity{Interface: ifaceID, MAC: a.MAC, Addr: a.IP, Gateway: a.Gateway, DNS: a.DNS}
	}
	return vmutil.Reidentify(ctx, c, recordSpec(rec), ni)
}
