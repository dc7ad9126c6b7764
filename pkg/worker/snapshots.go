package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/hibiken/asynq"

	"github.com/aetherium/aetherium-core/internal/faults"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// Pause, resume, suspend, snapshots and templates (docs/architecture.md).
// A snapshot's files are on the disk of the worker that took it, under
// Config.SnapshotDir/<snapshot id>; only that worker starts VMs from it,
// so the service sends those creates to its queue.

// snapshotter returns the backend's Snapshotter, or types.ErrNotSupported
// saying that the backend has none.
func (w *Worker) snapshotter() (vmm.Snapshotter, error) {
	s, ok := vmm.AsSnapshotter(w.vmm)
	if !ok {
		return nil, fmt.Errorf("%w: the %s backend cannot pause, suspend or snapshot vms", types.ErrNotSupported, w.cfg.Provider)
	}
	return s, nil
}

// snapshotDir returns the directory of a ready snapshot this worker owns.
func (w *Worker) snapshotDir(ctx context.Context, id string) (string, error) {
	sn, err := w.store.GetSnapshot(ctx, id)
	if err != nil {
		return "", err
	}
	switch {
	case sn.State != types.SnapshotReady:
		return "", fmt.Errorf("%w: %s %s is %s, not ready", types.ErrConflict, sn.Kind, sn.Name, sn.State)
	case sn.Owner != w.cfg.ID:
		return "", fmt.Errorf("%w: %s %s is on worker %s, not %s", types.ErrConflict, sn.Kind, sn.Name, sn.Owner, w.cfg.ID)
	case sn.Dir == "":
		return "", fmt.Errorf("%w: %s %s has no files recorded", types.ErrConflict, sn.Kind, sn.Name)
	}
	return sn.Dir, nil
}

// handleVMOp pauses, resumes or suspends a VM this worker owns. Doing it
// to a VM already in the wanted state succeeds (a retry).
func (w *Worker) handleVMOp(ctx context.Context, t *asynq.Task, log *slog.Logger) (map[string]any, error) {
	p, err := queue.Decode[queue.VMOpPayload](t.Payload())
	if err != nil {
		return nil, err
	}
	snap, err := w.snapshotter()
	if err != nil {
		return nil, err
	}
	vm, err := w.ownedVM(ctx, p.VMID)
	if err != nil {
		return nil, err
	}
	var to types.VMState
	var op func(context.Context, string) error
	switch types.TaskType(t.Type()) {
	case types.TaskVMPause:
		to, op = types.VMPaused, snap.Pause
	case types.TaskVMResume:
		to, op = types.VMRunning, snap.Resume
	default:
		if !w.vmm.Capabilities().Suspend {
			return nil, fmt.Errorf("%w: the %s backend cannot suspend vms", types.ErrNotSupported, w.cfg.Provider)
		}
		to, op = types.VMSuspended, snap.Suspend
	}
	res := map[string]any{"vm_id": vm.ID, "state": to}
	if vm.State == to {
		return res, nil
	}
	if err := types.CheckTransition(vm.State, to); err != nil {
		return nil, fmt.Errorf("%w: vm %s is %s", err, vm.ID, vm.State)
	}
	start := time.Now()
	if err := op(ctx, vm.ID); err != nil {
		return nil, fmt.Errorf("%s vm %s: %w", strings.TrimPrefix(t.Type(), "vm:"), vm.ID, err)
	}
	if err := faults.Reach(ctx, faults.VMOpDone); err != nil {
		return nil, err
	}
	if err := w.setState(ctx, vm.ID, to, ""); err != nil {
		return nil, err
	}
	if to == types.VMRunning {
		w.recordConfinement(ctx, log, vm.ID) // a resumed suspended VM has a new VMM
	}
	res["took_ms"] = time.Since(start).Milliseconds()
	log.Info("vm "+string(to), "vm_id", vm.ID, "took", time.Since(start))
	return res, nil
}

// handleVMSnapshot takes the recorded snapshot of a running or paused VM
// into Config.SnapshotDir/<id>. A retry starts it again from an empty
// directory; on the last failed attempt the snapshot is marked failed
// and its files removed.
func (w *Worker) handleVMSnapshot(ctx context.Context, t *asynq.Task, log *slog.Logger) (map[string]any, error) {
	p, err := queue.Decode[queue.VMSnapshotPayload](t.Payload())
	if err != nil {
		return nil, err
	}
	vm, err := w.ownedVM(ctx, p.VMID)
	if err != nil {
		return nil, err
	}
	sn, err := w.store.GetSnapshot(ctx, p.SnapshotID)
	if err != nil {
		return nil, err
	}
	res := map[string]any{"vm_id": vm.ID, "snapshot_id": sn.ID, "name": sn.Name}
	if sn.State == types.SnapshotReady {
		return res, nil
	}
	if sn.State != types.SnapshotCreating {
		return nil, fmt.Errorf("%w: snapshot %s is %s", types.ErrConflict, sn.Name, sn.State)
	}
	if vm.State != types.VMRunning && vm.State != types.VMPaused {
		return nil, fmt.Errorf("%w: vm %s is %s; only a running or paused vm can be snapshotted", types.ErrConflict, vm.ID, vm.State)
	}
	start := time.Now()
	got, err := w.takeSnapshot(ctx, vm.ID, sn.ID)
	if err != nil {
		if final(ctx, err) {
			w.failSnapshot(context.WithoutCancel(ctx), log, sn, err)
		}
		return nil, err
	}
	if err := faults.Reach(ctx, faults.SnapshotTaken); err != nil {
		return nil, err
	}
	if _, err := w.store.UpdateSnapshot(ctx, sn.ID, storage.SnapshotUpdate{State: ptr(types.SnapshotReady), Dir: &got.Dir,
		SizeBytes: &got.SizeBytes, Owner: &w.cfg.ID, Provider: &w.cfg.Provider}); err != nil {
		return nil, err
	}
	log.Info("snapshot taken", "vm_id", vm.ID, "snapshot", sn.Name, "bytes", got.SizeBytes, "took", time.Since(start))
	res["size_bytes"], res["took_ms"] = got.SizeBytes, time.Since(start).Milliseconds()
	return res, nil
}

// takeSnapshot snapshots VM vmID into a fresh directory for snapshot id.
func (w *Worker) takeSnapshot(ctx context.Context, vmID, id string) (*vmm.Snapshot, error) {
	snap, err := w.snapshotter()
	if err != nil {
		return nil, err
	}
	if !w.vmm.Capabilities().Snapshot {
		return nil, fmt.Errorf("%w: the %s backend cannot snapshot vms", types.ErrNotSupported, w.cfg.Provider)
	}
	if w.cfg.SnapshotDir == "" {
		return nil, fmt.Errorf("%w: this worker has no snapshot directory; set worker.snapshot_dir", types.ErrNotSupported)
	}
	dir := filepath.Join(w.cfg.SnapshotDir, id)
	// A retry starts from an empty directory: what an interrupted attempt
	// wrote is incomplete.
	if err := os.RemoveAll(dir); err != nil {
		return nil, fmt.Errorf("clearing snapshot directory %s: %w", dir, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("making snapshot directory %s: %w", dir, err)
	}
	got, err := snap.Snapshot(ctx, vmID, dir)
	if err != nil {
		return nil, fmt.Errorf("snapshotting vm %s: %w", vmID, err)
	}
	return got, nil
}

// failSnapshot records why a snapshot failed and removes its files.
func (w *Worker) failSnapshot(ctx context.Context, log *slog.Logger, sn *types.Snapshot, cause error) {
	if w.cfg.SnapshotDir != "" {
		if err := os.RemoveAll(filepath.Join(w.cfg.SnapshotDir, sn.ID)); err != nil {
			log.Warn("removing a failed snapshot's files", "snapshot", sn.Name, "err", err)
		}
	}
	msg := cause.Error()
	if _, err := w.store.UpdateSnapshot(ctx, sn.ID, storage.SnapshotUpdate{State: ptr(types.SnapshotFailed), Error: &msg}); err != nil {
		log.Error("recording a failed snapshot", "snapshot", sn.Name, "err", err)
	}
}

// handleSnapshotDelete removes a snapshot's or template's files, unless a
// live VM was started from it: then it fails, naming them (the service
// checks first; this settles a create that raced the delete).
func (w *Worker) handleSnapshotDelete(ctx context.Context, t *asynq.Task, log *slog.Logger) (map[string]any, error) {
	p, err := queue.Decode[queue.SnapshotDeletePayload](t.Payload())
	if err != nil {
		return nil, err
	}
	sn, err := w.store.GetSnapshot(ctx, p.SnapshotID)
	if err != nil {
		return nil, err
	}
	res := map[string]any{"snapshot_id": sn.ID, "name": sn.Name}
	if sn.State == types.SnapshotDeleted {
		return res, nil
	}
	if sn.Owner != "" && sn.Owner != w.cfg.ID {
		return nil, fmt.Errorf("%w: %s %s is on worker %s, not %s", types.ErrConflict, sn.Kind, sn.Name, sn.Owner, w.cfg.ID)
	}
	if err := checkNoClones(ctx, w.store, sn); err != nil {
		return nil, err
	}
	if _, err := w.store.UpdateSnapshot(ctx, sn.ID, storage.SnapshotUpdate{State: ptr(types.SnapshotDeleting)}); err != nil {
		return nil, err
	}
	if err := w.removeSnapshotFiles(sn); err != nil {
		return nil, err
	}
	if _, err := w.store.UpdateSnapshot(ctx, sn.ID, storage.SnapshotUpdate{State: ptr(types.SnapshotDeleted)}); err != nil {
		return nil, err
	}
	log.Info(string(sn.Kind)+" deleted", "name", sn.Name)
	return res, nil
}

// removeSnapshotFiles removes a snapshot's directory, refusing one that
// is not under Config.SnapshotDir.
func (w *Worker) removeSnapshotFiles(sn *types.Snapshot) error {
	if sn.Dir == "" {
		return nil
	}
	if w.cfg.SnapshotDir == "" || filepath.Dir(filepath.Clean(sn.Dir)) != filepath.Clean(w.cfg.SnapshotDir) {
		return fmt.Errorf("%w: %s %s's files at %s are not under this worker's snapshot directory %q", types.ErrConflict, sn.Kind, sn.Name, sn.Dir, w.cfg.SnapshotDir)
	}
	if err := os.RemoveAll(sn.Dir); err != nil {
		return fmt.Errorf("removing %s %s's files: %w", sn.Kind, sn.Name, err)
	}
	return nil
}

// checkNoClones returns types.ErrConflict naming the live VMs started from
// sn, if any.
func checkNoClones(ctx context.Context, st storage.Store, sn *types.Snapshot) error {
	clones, err := st.ListSnapshotClones(ctx, sn.ID)
	if err != nil || len(clones) == 0 {
		return err
	}
	ids := make([]string, 0, min(len(clones), 5))
	for _, c := range clones[:min(len(clones), 5)] {
		ids = append(ids, c.ID)
	}
	more := ""
	if len(clones) > 5 {
		more = fmt.Sprintf(" and %d more", len(clones)-5)
	}
	return fmt.Errorf("%w: %s %s is used by %d vm(s) started from it (%s%s); delete them first", types.ErrConflict, sn.Kind, sn.Name, len(clones), strings.Join(ids, ", "), more)
}

// setupTimeout bounds a template's setup command.
const setupTimeout = 30 * time.Minute

// handleTemplateBuild builds a template: it creates its builder VM (with
// the template's tools), runs its setup command, snapshots the VM with
// its agent ready, and removes the VM. The setup runs at most once (its
// execution id is derived from the template's id), so a retry after a
// crash resumes after it. On the last failed attempt the template is
// marked failed and the VM removed.
func (w *Worker) handleTemplateBuild(ctx context.Context, t *asynq.Task, log *slog.Logger) (map[string]any, error) {
	p, err := queue.Decode[queue.TemplateBuildPayload](t.Payload())
	if err != nil {
		return nil, err
	}
	sn, err := w.store.GetSnapshot(ctx, p.SnapshotID)
	if err != nil {
		return nil, err
	}
	res := map[string]any{"snapshot_id": sn.ID, "name": sn.Name, "vm_id": p.VMID}
	switch sn.State {
	case types.SnapshotReady:
		return res, nil
	case types.SnapshotCreating:
	default:
		return nil, fmt.Errorf("%w: template %s is %s", types.ErrConflict, sn.Name, sn.State)
	}
	if _, err := w.snapshotter(); err != nil {
		return nil, err
	}
	if !w.vmm.Capabilities().Snapshot {
		// Before the builder VM is made: it could never be snapshotted.
		err := fmt.Errorf("%w: the %s backend cannot snapshot vms, so it cannot build templates", types.ErrNotSupported, w.cfg.Provider)
		w.failSnapshot(context.WithoutCancel(ctx), log, sn, err)
		w.removeBuilder(context.WithoutCancel(ctx), log, p.VMID)
		return nil, err
	}
	log = log.With("template", sn.Name, "vm_id", p.VMID)
	start := time.Now()
	err = w.buildTemplate(ctx, log, sn, p)
	bg := context.WithoutCancel(ctx)
	if err != nil {
		if final(ctx, err) {
			w.failSnapshot(bg, log, sn, err)
			w.removeBuilder(bg, log, p.VMID)
		}
		return nil, err
	}
	w.removeBuilder(bg, log, p.VMID)
	res["took_ms"] = time.Since(start).Milliseconds()
	log.Info("template ready", "took", time.Since(start))
	return res, nil
}

func (w *Worker) buildTemplate(ctx context.Context, log *slog.Logger, sn *types.Snapshot, p queue.TemplateBuildPayload) error {
	vm, err := w.store.GetVM(ctx, p.VMID)
	if err != nil {
		return err
	}
	if vm.Owner != "" && vm.Owner != w.cfg.ID {
		return fmt.Errorf("%w: template %s's builder vm belongs to worker %s, not %s", types.ErrConflict, sn.Name, vm.Owner, w.cfg.ID)
	}
	if vm.State != types.VMRunning {
		if err := w.createVM(ctx, log, vm, queue.VMCreatePayload{VMID: vm.ID, Tools: sn.Tools, DefaultNetwork: p.DefaultNetwork}); err != nil {
			return err
		}
	}
	if sn.Setup != "" {
		snUUID, err := uuid.Parse(sn.ID)
		if err != nil {
			return fmt.Errorf("%w: template id %q is not a UUID", types.ErrInvalid, sn.ID)
		}
		execID := uuid.NewSHA1(snUUID, []byte("setup")).String()
		e, err := w.runCommand(ctx, log, vm.ID, execID, "", types.Command{Cmd: "/bin/sh", Args: []string{"-c", sn.Setup}, Timeout: setupTimeout}, vmm.ExecIO{})
		if err != nil {
			return fmt.Errorf("running template %s's setup: %w", sn.Name, err)
		}
		if e.ExitCode != 0 || e.TimedOut {
			return fmt.Errorf("%w: template %s's setup exited %d%s: %s", types.ErrInvalid, sn.Name, e.ExitCode, timedOutNote(e.TimedOut), tail(e.Stderr, 400))
		}
	}
	w.warmExec(ctx, log, vm.ID)
	got, err := w.takeSnapshot(ctx, vm.ID, sn.ID)
	if err != nil {
		return err
	}
	// The template's clones get the size and network its VM had.
	_, err = w.store.UpdateSnapshot(ctx, sn.ID, storage.SnapshotUpdate{State: ptr(types.SnapshotReady), Dir: &got.Dir,
		SizeBytes: &got.SizeBytes, Owner: &w.cfg.ID, Provider: &w.cfg.Provider, VMID: &vm.ID})
	return err
}

// warmCommand is what a template's VM runs just before its snapshot.
const warmCommand = "/usr/bin/true; if [ -x /bin/bash ]; then /bin/bash -c /usr/bin/true; fi; exit 0"

// warmExec runs warmCommand in a template's VM before its snapshot, so
// that the files every first command needs (the dynamic loader, libc, the
// shells) are in the guest's page cache each clone restores with, instead
// of being read through the clone's disk chain on its first exec (under
// TCG its first `exec true` took ~120 ms without this, ~70 ms with it).
// A failure is logged: the template still works, its clones' first
// command is only slower.
func (w *Worker) warmExec(ctx context.Context, log *slog.Logger, vmID string) {
	res, err := w.vmm.ExecuteCommand(ctx, vmID, types.Command{Cmd: "/bin/sh", Args: []string{"-c", warmCommand}, Timeout: time.Minute}, vmm.ExecIO{})
	if err == nil && res.ExitCode != 0 {
		err = fmt.Errorf("exit code %d: %s", res.ExitCode, tail(string(res.Stderr), 200))
	}
	if err != nil {
		log.Warn("warming the template's exec path failed; its clones' first command will be slower", "err", err)
	}
}

func timedOutNote(timedOut bool) string {
	if timedOut {
		return " (timed out)"
	}
	return ""
}

// tail is the end of s, at most n bytes.
func tail(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// removeBuilder deletes a template's builder VM: the template keeps its
// own copy of everything it needs.
func (w *Worker) removeBuilder(ctx context.Context, log *slog.Logger, id string) {
	if err := w.vmm.DeleteVM(ctx, id); err != nil {
		log.Warn("removing the template's builder vm", "err", err)
		return
	}
	for _, st := range []types.VMState{types.VMDeleting, types.VMDeleted} {
		if _, err := w.store.UpdateVMState(ctx, id, st, ""); err != nil && !errors.Is(err, types.ErrNotFound) {
			log.Warn("recording the template's builder vm deleted", "err", err)
			return
		}
	}
}

// reconcileSnapshots removes the snapshot directories under
// Config.SnapshotDir that no live snapshot of this worker records (a
// snapshot deleted, or one cut short by a crash whose row failed), and
// finishes the deletions a crash interrupted.
func (w *Worker) reconcileSnapshots(ctx context.Context) error {
	if w.cfg.SnapshotDir == "" {
		return nil
	}
	ents, err := os.ReadDir(w.cfg.SnapshotDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading snapshot directory: %w", err)
	}
	for _, e := range ents {
		if !e.IsDir() || types.ValidateID(e.Name()) != nil {
			continue
		}
		sn, err := w.store.GetSnapshot(ctx, e.Name())
		keep := err == nil && sn.Owner == w.cfg.ID && (sn.State == types.SnapshotReady || sn.State == types.SnapshotCreating)
		if err == nil && sn.State == types.SnapshotCreating && sn.Owner == "" {
			keep = true // its task is under way or will retry
		}
		if err != nil && !errors.Is(err, types.ErrNotFound) {
			return err
		}
		if keep {
			continue
		}
		w.log.Info("removing snapshot files no live snapshot records", "dir", filepath.Join(w.cfg.SnapshotDir, e.Name()))
		if err := os.RemoveAll(filepath.Join(w.cfg.SnapshotDir, e.Name())); err != nil {
			return fmt.Errorf("removing leaked snapshot files: %w", err)
		}
		if err == nil && sn.State == types.SnapshotDeleting {
			if _, err := w.store.UpdateSnapshot(ctx, sn.ID, storage.SnapshotUpdate{State: ptr(types.SnapshotDeleted)}); err != nil {
				return err
			}
		}
	}
	return nil
}
