package api

import "net/http"

// routes is the one list of what the API serves; openapi.yaml documents
// the same list.
func (s *Server) routes(mux *http.ServeMux) {
	const auth, open = true, false
	s.handle(mux, "GET /healthz", open, s.healthz)
	s.handle(mux, "GET /metrics", open, s.metrics)
	s.handle(mux, "GET /v1/openapi.json", open, s.openAPI)

	s.handle(mux, "POST /v1/vms", auth, s.createVM)
	s.handle(mux, "GET /v1/vms", auth, s.listVMs)
	s.handle(mux, "GET /v1/vms/{id}", auth, s.getVM)
	s.handle(mux, "DELETE /v1/vms/{id}", auth, s.deleteVM)
	s.handle(mux, "POST /v1/vms/{id}/stop", auth, s.stopVM)
	s.handle(mux, "POST /v1/vms/{id}/start", auth, s.startVM)
	s.handle(mux, "POST /v1/vms/{id}/pause", auth, s.pauseVM)
	s.handle(mux, "POST /v1/vms/{id}/resume", auth, s.resumeVM)
	s.handle(mux, "POST /v1/vms/{id}/suspend", auth, s.suspendVM)
	s.handle(mux, "POST /v1/vms/{id}/snapshots", auth, s.snapshotVM)
	s.handle(mux, "POST /v1/vms/{id}/ttl", auth, s.setTTL)
	s.handle(mux, "POST /v1/vms/{id}/exec", auth, s.exec)
	s.handle(mux, "GET /v1/vms/{id}/executions", auth, s.listExecutions)
	s.handle(mux, "POST /v1/vms/{id}/jobs", auth, s.runJob)
	s.handle(mux, "PUT /v1/vms/{id}/files", auth, s.putFile)
	s.handle(mux, "GET /v1/vms/{id}/files", auth, s.getFile)
	s.handle(mux, "POST /v1/vms/{id}/tools", auth, s.installTools)
	s.handle(mux, "GET /v1/vms/{id}/tools", auth, s.listVMTools)

	s.handle(mux, "GET /v1/snapshots", auth, s.listSnapshots)
	s.handle(mux, "GET /v1/snapshots/{name}", auth, s.getSnapshot)
	s.handle(mux, "DELETE /v1/snapshots/{name}", auth, s.deleteSnapshot)
	s.handle(mux, "POST /v1/templates", auth, s.createTemplate)

	s.handle(mux, "GET /v1/tasks/{id}", auth, s.getTask)
	s.handle(mux, "POST /v1/tasks/{id}/cancel", auth, s.cancelTask)
	s.handle(mux, "GET /v1/tasks/{id}/output", auth, s.taskOutput)
	s.handle(mux, "GET /v1/executions/{id}", auth, s.getExecution)
	s.handle(mux, "GET /v1/jobs/{id}", auth, s.getJob)
	s.handle(mux, "GET /v1/workers", auth, s.listWorkers)

	// Anything else answers a JSON 404 like every other error.
	s.handle(mux, "/", open, s.notFound)
}
