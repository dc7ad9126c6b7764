package e2b

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// pauseWait bounds how long pause and resume wait for their task.
const pauseWait = 2 * time.Minute

// snapshots returns the service's pause and resume, or why there are none.
func (s *Server) snapshots(what string) (service.Snapshots, error) {
	sn, ok := s.svc.(service.Snapshots)
	if !ok {
		return nil, errNotSupported(what)
	}
	return sn, nil
}

// pause answers POST /sandboxes/{id}/pause: E2B's pause keeps the
// sandbox's memory and files and frees what it can. On backends that can
// suspend (qemu, firecracker) the VM is suspended to its worker's disk,
// which frees its memory; elsewhere (docker) its processes are paused.
func (s *Server) pause(w http.ResponseWriter, r *http.Request) error {
	vm, _, err := s.lookup(r)
	if err != nil {
		return err
	}
	switch vm.State {
	case types.VMPaused, types.VMSuspended:
		return errStatus(http.StatusConflict, "sandbox %s is already paused", vm.ID)
	case types.VMRunning:
	default:
		return errStatus(http.StatusConflict, "sandbox %s is %s, not running", vm.ID, vm.State)
	}
	sn, err := s.snapshots("pausing a sandbox")
	if err != nil {
		return err
	}
	ctx := r.Context()
	// A paused sandbox does not time out (E2B keeps it until it is
	// resumed or killed; connect gives it a timeout again). The expiry
	// goes first, whatever happens to this request, so that it cannot
	// fall during a slow suspend and delete what is being paused; a
	// failed pause puts it back.
	bg := context.WithoutCancel(ctx)
	if _, err := s.store.SetVMExpiry(bg, vm.ID, nil); err != nil {
		return fmt.Errorf("pausing sandbox %s: clearing its timeout: %w", vm.ID, err)
	}
	err = s.runOp(ctx, sn.SuspendVMTask, vm.ID)
	if errors.Is(err, types.ErrNotSupported) {
		err = s.runOp(ctx, sn.PauseVMTask, vm.ID)
	}
	if err != nil {
		if vm.ExpiresAt != nil {
			if _, rerr := s.store.SetVMExpiry(bg, vm.ID, vm.ExpiresAt); rerr != nil {
				s.log.Warn("e2b: restoring the timeout of a sandbox whose pause failed", "vm_id", vm.ID, "err", rerr)
			}
		}
		return err
	}
	s.clients.drop(vm.ID)
	s.log.Info("e2b: sandbox paused", "vm_id", vm.ID)
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// resume answers the deprecated POST /sandboxes/{id}/resume: connect
// resumes a paused sandbox too.
func (s *Server) resume(w http.ResponseWriter, r *http.Request) error {
	return s.connect(w, r)
}

// resumeVM brings a paused or suspended sandbox back, memory intact.
func (s *Server) resumeVM(ctx context.Context, vm *types.VM) error {
	sn, err := s.snapshots("resuming a paused sandbox")
	if err != nil {
		return err
	}
	if err := s.runOp(ctx, sn.ResumeVMTask, vm.ID); err != nil {
		return err
	}
	s.log.Info("e2b: sandbox resumed", "vm_id", vm.ID)
	return nil
}

// runOp submits a pause, suspend or resume task and waits for it; a
// failed task is returned with its error, whose kind (e.g.
// types.ErrNotSupported from a backend that cannot suspend) is kept.
func (s *Server) runOp(ctx context.Context, submit func(context.Context, string) (uuid.UUID, error), vmID string) error {
	id, err := submit(ctx, vmID)
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, pauseWait)
	defer cancel()
	t, err := s.svc.WaitTask(wctx, id)
	if err != nil {
		return err
	}
	if t.State == types.TaskFailed {
		// The stored text keeps the kind as its prefix: a backend that
		// cannot suspend says "not supported: ...".
		if strings.HasPrefix(t.Error, types.ErrNotSupported.Error()) {
			return fmt.Errorf("%w: %s", types.ErrNotSupported, strings.TrimPrefix(t.Error, types.ErrNotSupported.Error()+": "))
		}
		return fmt.Errorf("sandbox %s: %s", vmID, t.Error)
	}
	return nil
}
