package api

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/api/wire"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// The bodies of the snapshot and template routes, shared with pkg/client
// (pkg/api/wire).
type (
	SnapshotRequest = wire.SnapshotRequest
	TemplateRequest = wire.TemplateRequest
	SnapshotList    = wire.SnapshotList
)

// snapshots returns the service's snapshot operations, or why there are
// none: a service.TaskService need not implement service.Snapshots.
func (s *Server) snapshots() (service.Snapshots, error) {
	sn, ok := s.svc.(service.Snapshots)
	if !ok {
		return nil, fmt.Errorf("%w: this aether-api's service cannot pause, suspend or snapshot VMs", types.ErrNotSupported)
	}
	return sn, nil
}

// vmOp answers pause, resume and suspend as lifecycle answers stop and
// start; op picks the operation of the service's Snapshots.
func (s *Server) vmOp(w http.ResponseWriter, r *http.Request, op func(service.Snapshots) func(context.Context, string) (uuid.UUID, error), what string) error {
	sn, err := s.snapshots()
	if err != nil {
		return err
	}
	return s.lifecycle(w, r, op(sn), what)
}

func (s *Server) pauseVM(w http.ResponseWriter, r *http.Request) error {
	return s.vmOp(w, r, func(sn service.Snapshots) func(context.Context, string) (uuid.UUID, error) { return sn.PauseVMTask },
		"the VM is still pausing")
}

func (s *Server) resumeVM(w http.ResponseWriter, r *http.Request) error {
	return s.vmOp(w, r, func(sn service.Snapshots) func(context.Context, string) (uuid.UUID, error) { return sn.ResumeVMTask },
		"the VM is still resuming")
}

func (s *Server) suspendVM(w http.ResponseWriter, r *http.Request) error {
	return s.vmOp(w, r, func(sn service.Snapshots) func(context.Context, string) (uuid.UUID, error) { return sn.SuspendVMTask },
		"the VM is still being suspended")
}

func (s *Server) snapshotVM(w http.ResponseWriter, r *http.Request) error {
	sn, err := s.snapshots()
	if err != nil {
		return err
	}
	var req SnapshotRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	return s.lifecycle(w, r, func(ctx context.Context, vmID string) (uuid.UUID, error) {
		return sn.SnapshotVMTask(ctx, vmID, req.Name)
	}, "the snapshot is still being taken")
}

func (s *Server) createTemplate(w http.ResponseWriter, r *http.Request) error {
	sn, err := s.snapshots()
	if err != nil {
		return err
	}
	wait, err := queryBool(r, "wait")
	if err != nil {
		return err
	}
	var req TemplateRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	id, err := sn.CreateTemplateTask(r.Context(), service.TemplateOptions{Name: req.Name,
		VCPUs: cmp.Or(req.VCPUs, DefaultVCPUs), MemoryMB: cmp.Or(req.MemoryMB, DefaultMemoryMB),
		Network: req.Network, Tools: req.Tools, Setup: req.Setup, Env: req.Env})
	if err != nil {
		return err
	}
	s.log.Info("template build submitted", "task_id", id, "template", req.Name, "tenant", infoOf(r.Context()).tenant)
	return s.answerTask(w, r, id, wait, "the template is still being built")
}

// answerTask answers a submitted task: 202 with it, or with wait 200 with
// it once it ended, however it ended.
func (s *Server) answerTask(w http.ResponseWriter, r *http.Request, id uuid.UUID, wait bool, what string) error {
	if wait {
		t, err := s.wait(r.Context(), id, what)
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusOK, t)
	}
	t, err := s.svc.GetTask(r.Context(), id)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusAccepted, t)
}

// snapshotKind reads ?kind=; def when absent.
func snapshotKind(r *http.Request, def types.SnapshotKind) (types.SnapshotKind, error) {
	switch k := types.SnapshotKind(r.URL.Query().Get("kind")); k {
	case "":
		return def, nil
	case types.KindSnapshot, types.KindTemplate:
		return k, nil
	default:
		return "", badRequest("kind=%q is not snapshot or template", k)
	}
}

func (s *Server) listSnapshots(w http.ResponseWriter, r *http.Request) error {
	sn, err := s.snapshots()
	if err != nil {
		return err
	}
	kind, err := snapshotKind(r, "")
	if err != nil {
		return err
	}
	list, err := sn.ListSnapshots(r.Context(), kind)
	if err != nil {
		return err
	}
	if list == nil {
		list = []*types.Snapshot{}
	}
	return writeJSON(w, http.StatusOK, SnapshotList{Snapshots: list})
}

// findSnapshot returns the snapshot {name} of ?kind= (default snapshot).
// A missing one is a 404 here, where it is the resource the path names;
// the service reports it as invalid input, as when a body names it.
func (s *Server) findSnapshot(r *http.Request, sn service.Snapshots) (*types.Snapshot, error) {
	kind, err := snapshotKind(r, types.KindSnapshot)
	if err != nil {
		return nil, err
	}
	snap, err := sn.GetSnapshot(r.Context(), kind, r.PathValue("name"))
	return snap, notFoundHere(err)
}

// notFoundHere turns an error wrapping types.ErrNotFound into a 404, even
// when it also wraps types.ErrInvalid (which httpError ranks first).
func notFoundHere(err error) error {
	if err != nil && errors.Is(err, types.ErrNotFound) {
		return &Error{Status: http.StatusNotFound, Code: CodeNotFound, Message: err.Error()}
	}
	return err
}

func (s *Server) getSnapshot(w http.ResponseWriter, r *http.Request) error {
	sn, err := s.snapshots()
	if err != nil {
		return err
	}
	snap, err := s.findSnapshot(r, sn)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, snap)
}

func (s *Server) deleteSnapshot(w http.ResponseWriter, r *http.Request) error {
	sn, err := s.snapshots()
	if err != nil {
		return err
	}
	wait, err := queryBool(r, "wait")
	if err != nil {
		return err
	}
	kind, err := snapshotKind(r, types.KindSnapshot)
	if err != nil {
		return err
	}
	id, err := sn.DeleteSnapshotTask(r.Context(), kind, r.PathValue("name"))
	if err != nil {
		return notFoundHere(err)
	}
	s.log.Info("snapshot deletion submitted", "task_id", id, "kind", kind, "snapshot", r.PathValue("name"), "tenant", infoOf(r.Context()).tenant)
	ctx := r.Context()
	if !wait {
		t, err := s.svc.GetTask(ctx, id)
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusAccepted, t)
	}
	t, err := s.wait(ctx, id, "the "+string(kind)+" is still being deleted")
	if err != nil {
		return err
	}
	if t.State == types.TaskFailed {
		return &Error{Status: http.StatusInternalServerError, Code: CodeDeleteFailed,
			Message: fmt.Sprintf("deleting %s %s failed: %s", kind, r.PathValue("name"), t.Error)}
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
