package api

import (
	"context"
	"net/http"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/api/wire"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// The bodies of the tool routes, shared with pkg/client (pkg/api/wire).
type (
	ToolsInstallRequest = wire.ToolsInstallRequest
	VMToolList          = wire.VMToolList
)

// installTools answers POST /v1/vms/{id}/tools: 202 with the tools:install
// task, or with ?wait=true 200 with the task once it ended, however it
// ended (a failed install says why in the task's error).
func (s *Server) installTools(w http.ResponseWriter, r *http.Request) error {
	var req ToolsInstallRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	return s.lifecycle(w, r, func(ctx context.Context, vmID string) (uuid.UUID, error) {
		return s.svc.InstallToolsTask(ctx, vmID, req.Specs)
	}, "the tools are still being installed")
}

// listVMTools answers GET /v1/vms/{id}/tools.
func (s *Server) listVMTools(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	ts, err := s.svc.ListVMTools(r.Context(), id)
	if err != nil {
		return err
	}
	if ts == nil {
		ts = []types.VMTool{}
	}
	return writeJSON(w, http.StatusOK, VMToolList{Tools: ts})
}
