// Package dataplane carries file content, and tunnels to the guest agents,
// between the service and the worker that owns a VM, over HTTP and outside
// the task queue: Handler is the worker's side, Client (a
// service.DataPlane) the caller's. Content is streamed both ways and never
// held whole. Every request carries the cluster token, the shared secret of
// the API and the workers.
//
// The wire, under /internal/v1 because only Aetherium's own parts speak it:
//
//	PUT /internal/v1/vms/{id}/files?path=P&mode=0644&user=U&mkdir=1   body: the content
//	    200 {"bytes_written": N}
//	GET /internal/v1/vms/{id}/files?path=P
//	    200 the content (application/octet-stream)
//	GET /internal/v1/vms/{id}/agent   Connection: Upgrade, Upgrade: aetherium-agent/1
//	    101 then the connection is the guest agent's gRPC stream, both ways,
//	    until either end closes
//
// Errors answer {"error":{"code":C,"message":M}}, C being one of the Code
// constants; the status and the code follow from the error's kind in
// pkg/types, in both directions, in this file alone.
package dataplane

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// filesPath is the route of a VM's files, in http.ServeMux's pattern syntax.
const filesPath = "/internal/v1/vms/{id}/files"

// Query parameters of the files route.
const (
	paramPath  = "path"
	paramMode  = "mode"
	paramUser  = "user"
	paramMkdir = "mkdir"
)

// Error codes of the wire.
const (
	CodeInvalid      = "invalid"
	CodeNotFound     = "not_found"
	CodeConflict     = "conflict"
	CodeUnavailable  = "unavailable"
	CodeNotSupported = "not_supported"
	CodeUnauthorized = "unauthorized"
	CodeInternal     = "internal"
)

// kinds pairs each code with its status and its kind in pkg/types. The
// order matters only for errors wrapping several kinds: the first wins.
var kinds = []struct {
	code   string
	status int
	kind   error
}{
	{CodeInvalid, http.StatusBadRequest, types.ErrInvalid},
	{CodeNotFound, http.StatusNotFound, types.ErrNotFound},
	{CodeConflict, http.StatusConflict, types.ErrConflict},
	{CodeUnavailable, http.StatusServiceUnavailable, types.ErrUnavailable},
	{CodeNotSupported, http.StatusNotImplemented, types.ErrNotSupported},
}

// errorBody is the JSON of an error answer.
type errorBody struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// writeResult is the JSON of a successful write.
type writeResult struct {
	BytesWritten int64 `json:"bytes_written"`
}

// statusOf gives err's status and code.
func statusOf(err error) (int, string) {
	for _, k := range kinds {
		if errors.Is(err, k.kind) {
			return k.status, k.code
		}
	}
	return http.StatusInternalServerError, CodeInternal
}

// writeError answers err as the wire says.
func writeError(w http.ResponseWriter, err error) {
	status, code := statusOf(err)
	writeCode(w, status, code, err.Error())
}

func writeCode(w http.ResponseWriter, status int, code, msg string) {
	var b errorBody
	b.Error.Code, b.Error.Message = code, msg
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(b)
}

// errorOf turns an error answer back into an error wrapping its kind.
// Unauthorized becomes types.ErrUnavailable: the caller did nothing wrong,
// the deployment's tokens disagree. Unknown codes fall back on the status.
func errorOf(status int, b errorBody, what string) error {
	msg := b.Error.Message
	if msg == "" {
		msg = http.StatusText(status)
	}
	if b.Error.Code == CodeUnauthorized || status == http.StatusUnauthorized {
		return fmt.Errorf("%s: %w: the worker refused the cluster token (%s); give the API and every worker the same cluster.token", what, types.ErrUnavailable, msg)
	}
	for _, k := range kinds {
		if b.Error.Code == k.code || (b.Error.Code == "" && status == k.status) {
			// The worker's message already names the kind; do not repeat it.
			return fmt.Errorf("%s: %w", what, &kindError{kind: k.kind, msg: msg})
		}
	}
	return fmt.Errorf("%s: the worker failed (%d): %s", what, status, msg)
}

// kindError carries a worker's message verbatim while matching its kind
// with errors.Is.
type kindError struct {
	kind error
	msg  string
}

func (e *kindError) Error() string { return e.msg }
func (e *kindError) Unwrap() error { return e.kind }
