package api

import (
	"cmp"
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/api/wire"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Defaults of POST /v1/vms.
const (
	DefaultVCPUs    = 1
	DefaultMemoryMB = 256
)

// The bodies of the VM routes, shared with pkg/client (pkg/api/wire).
type (
	CreateVMRequest = wire.CreateVMRequest
	VMList          = wire.VMList
	TTLRequest      = wire.TTLRequest
)

func (s *Server) notFound(w http.ResponseWriter, r *http.Request) error {
	return fmt.Errorf("%w: no route %s %s; GET /v1/openapi.json lists the routes", types.ErrNotFound, r.Method, r.URL.Path)
}

// ttl turns seconds into a duration, bounded by MaxTTL.
func (s *Server) ttl(sec int64) (time.Duration, error) {
	const maxSec = int64(1<<63-1) / int64(time.Second)
	if sec > maxSec {
		return 0, fmt.Errorf("%w: ttl_seconds %d is too large", types.ErrInvalid, sec)
	}
	d := time.Duration(sec) * time.Second
	if s.cfg.MaxTTL > 0 && d > s.cfg.MaxTTL {
		return 0, fmt.Errorf("%w: ttl_seconds %d is longer than the %s this deployment allows", types.ErrInvalid, sec, s.cfg.MaxTTL)
	}
	return d, nil
}

func (s *Server) createVM(w http.ResponseWriter, r *http.Request) error {
	wait, err := queryBool(r, "wait")
	if err != nil {
		return err
	}
	var req CreateVMRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	ttl, err := s.ttl(req.TTLSeconds)
	if err != nil {
		return err
	}
	if req.TTLSeconds < 0 {
		return fmt.Errorf("%w: ttl_seconds %d is negative; use 0 for no expiry", types.ErrInvalid, req.TTLSeconds)
	}
	o := service.CreateVMOptions{Name: req.Name, VCPUs: req.VCPUs, MemoryMB: req.MemoryMB, Network: req.Network,
		Labels: req.Labels, Env: req.Env, TTL: ttl, OnExpiry: req.OnExpiry, Tools: req.Tools, FromSnapshot: req.FromSnapshot, Template: req.Template}
	if o.FromSnapshot == "" && o.Template == "" {
		// A clone takes its snapshot's size: only a boot gets defaults.
		o.VCPUs, o.MemoryMB = cmp.Or(o.VCPUs, DefaultVCPUs), cmp.Or(o.MemoryMB, DefaultMemoryMB)
	}
	id, err := s.svc.CreateVMTaskWithOptions(r.Context(), o)
	if err != nil {
		return err
	}
	s.log.Info("vm creation submitted", "vm_id", id, "task_id", id, "tenant", infoOf(r.Context()).tenant)
	if !wait {
		vm, err := s.svc.GetVM(r.Context(), id)
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusAccepted, vm)
	}
	t, err := s.wait(r.Context(), id, "the VM is still being created")
	if err != nil {
		return err
	}
	if t.State == types.TaskFailed {
		return &Error{Status: http.StatusInternalServerError, Code: CodeCreateFailed,
			Message: fmt.Sprintf("creating vm %s failed: %s", id, t.Error)}
	}
	vm, err := s.svc.GetVM(r.Context(), id)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusCreated, vm)
}

// wait waits for a task to end, for as long as the request lasts or until
// Shutdown begins (then an "unavailable" error saying what goes on).
func (s *Server) wait(ctx context.Context, id uuid.UUID, what string) (*types.Task, error) {
	wctx, cancel := s.waitCtx(ctx)
	defer cancel()
	t, err := s.svc.WaitTask(wctx, id)
	if err != nil && s.shuttingDown() && ctx.Err() == nil {
		return nil, errShuttingDown(fmt.Sprintf("%s; follow it with GET /v1/tasks/%s", what, id))
	}
	return t, err
}

func (s *Server) listVMs(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	o := service.ListVMsOptions{After: q.Get("after")}
	for _, l := range q["label"] {
		k, v, ok := strings.Cut(l, "=")
		if !ok || k == "" {
			return badRequest("label=%q is not key=value", l)
		}
		if o.Labels == nil {
			o.Labels = map[string]string{}
		}
		o.Labels[k] = v
	}
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return badRequest("limit=%q is not a non-negative integer", v)
		}
		o.Limit = n
	}
	if o.After != "" {
		if _, err := uuid.Parse(o.After); err != nil {
			return badRequest("after=%q is not a VM id (a UUID)", o.After)
		}
	}
	vms, err := s.svc.ListVMsWithOptions(r.Context(), o)
	if err != nil {
		return err
	}
	out := VMList{VMs: vms}
	if out.VMs == nil {
		out.VMs = []*types.VM{}
	}
	if o.Limit > 0 && len(vms) == o.Limit {
		out.Next = vms[len(vms)-1].ID
	}
	return writeJSON(w, http.StatusOK, out)
}

func (s *Server) getVM(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	vm, err := s.svc.GetVM(r.Context(), id)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, vm)
}

func (s *Server) deleteVM(w http.ResponseWriter, r *http.Request) error {
	t, wait, err := s.submitVMTask(r, s.svc.DeleteVMTask)
	if err != nil || !wait {
		if err == nil {
			err = writeJSON(w, http.StatusAccepted, t)
		}
		return err
	}
	if t, err = s.wait(r.Context(), uuid.MustParse(t.ID), "the VM is still being deleted"); err != nil {
		return err
	}
	if t.State == types.TaskFailed {
		return &Error{Status: http.StatusInternalServerError, Code: CodeDeleteFailed,
			Message: fmt.Sprintf("deleting vm %s failed: %s", t.VMID, t.Error)}
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) stopVM(w http.ResponseWriter, r *http.Request) error {
	return s.lifecycle(w, r, s.svc.StopVMTask, "the VM is still stopping")
}

func (s *Server) startVM(w http.ResponseWriter, r *http.Request) error {
	return s.lifecycle(w, r, s.svc.StartVMTask, "the VM is still starting")
}

// lifecycle answers stop and start: 202 with the task, or with ?wait=true
// 200 with the task once it ended, however it ended.
func (s *Server) lifecycle(w http.ResponseWriter, r *http.Request, submit func(context.Context, string) (uuid.UUID, error), what string) error {
	t, wait, err := s.submitVMTask(r, submit)
	if err != nil {
		return err
	}
	if !wait {
		return writeJSON(w, http.StatusAccepted, t)
	}
	if t, err = s.wait(r.Context(), uuid.MustParse(t.ID), what); err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, t)
}

// submitVMTask submits a task on the VM {id} and returns it as recorded.
func (s *Server) submitVMTask(r *http.Request, submit func(context.Context, string) (uuid.UUID, error)) (*types.Task, bool, error) {
	id, err := pathID(r, "id")
	if err != nil {
		return nil, false, err
	}
	wait, err := queryBool(r, "wait")
	if err != nil {
		return nil, false, err
	}
	tid, err := submit(r.Context(), id.String())
	if err != nil {
		return nil, false, err
	}
	t, err := s.svc.GetTask(r.Context(), tid)
	return t, wait, err
}

func (s *Server) setTTL(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	var req TTLRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	ttl, err := s.ttl(req.TTLSeconds)
	if err != nil {
		return err
	}
	vm, err := s.svc.SetVMTTL(r.Context(), id, ttl)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, vm)
}

func (s *Server) listWorkers(w http.ResponseWriter, r *http.Request) error {
	ws, err := s.svc.ListWorkers(r.Context())
	if err != nil {
		return err
	}
	if ws == nil {
		ws = []*types.Worker{}
	}
	return writeJSON(w, http.StatusOK, map[string][]*types.Worker{"workers": ws})
}
