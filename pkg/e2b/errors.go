package e2b

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"connectrpc.com/connect"

	"github.com/aetherium/aetherium-core/pkg/apikey"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// errorBody is E2B's error JSON: {"code": <HTTP status>, "message": ...}.
// The SDKs read code (404 means "not found") and message.
type errorBody struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
	// SandboxID is set on the sandbox plane's 502 (sandbox not found), as
	// E2B's proxy does.
	SandboxID string `json:"sandboxId,omitempty"`
}

// httpErr is an error whose status is decided where it is made.
type httpErr struct {
	status int
	msg    string
}

func (e *httpErr) Error() string { return e.msg }

func errStatus(status int, format string, args ...any) error {
	return &httpErr{status: status, msg: fmt.Sprintf(format, args...)}
}

// errNotSupported answers what E2B has and Aetherium does not yet.
func errNotSupported(what string) error {
	return errStatus(http.StatusNotImplemented, "%s is not supported by Aetherium's E2B API yet (see docs/e2b.md)", what)
}

// kinds maps the error kinds of pkg/types to HTTP statuses: the one place
// for both planes' REST answers.
var kinds = []struct {
	kind   error
	status int
}{
	{apikey.ErrUnauthenticated, http.StatusUnauthorized},
	{types.ErrInvalid, http.StatusBadRequest},
	{types.ErrNotFound, http.StatusNotFound},
	{types.ErrConflict, http.StatusConflict},
	{types.ErrLimit, http.StatusTooManyRequests},
	{types.ErrNotSupported, http.StatusNotImplemented},
	{types.ErrUnavailable, http.StatusServiceUnavailable},
	{context.DeadlineExceeded, http.StatusServiceUnavailable},
}

// statusOf returns the HTTP status of err and the message to show; an
// unclassified error's message names the log line instead of its detail.
func statusOf(err error) (int, string) {
	var he *httpErr
	if errors.As(err, &he) {
		return he.status, he.msg
	}
	for _, k := range kinds {
		if errors.Is(err, k.kind) {
			return k.status, err.Error()
		}
	}
	return http.StatusInternalServerError, "internal error; the aether-api log has the detail"
}

// writeError answers err as E2B's error JSON.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	status, msg := statusOf(err)
	if status >= 500 && status != http.StatusNotImplemented {
		s.log.Error("e2b request failed", "method", r.Method, "path", r.URL.Path, "status", status, "error", err)
	}
	writeJSON(w, status, errorBody{Code: status, Message: msg})
}

// writeEnvdError answers a sandbox-plane error in envd's shape.
func writeEnvdError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, errorBody{Code: status, Message: msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status, b = http.StatusInternalServerError, []byte(`{"code":500,"message":"encoding the response failed"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// connectCodes maps error kinds to Connect codes, which the SDKs turn into
// their error classes (not_found: NotFoundError or FileNotFoundError,
// invalid_argument: InvalidArgumentError, and so on).
var connectCodes = []struct {
	kind error
	code connect.Code
}{
	{types.ErrInvalid, connect.CodeInvalidArgument},
	{types.ErrNotFound, connect.CodeNotFound},
	{types.ErrConflict, connect.CodeAlreadyExists},
	{types.ErrLimit, connect.CodeResourceExhausted},
	{types.ErrNotSupported, connect.CodeUnimplemented},
	{types.ErrUnavailable, connect.CodeUnavailable},
	{context.DeadlineExceeded, connect.CodeDeadlineExceeded},
	{context.Canceled, connect.CodeCanceled},
}

// rpcError turns an agent error into a Connect error.
func (s *Server) rpcError(err error) error {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	for _, k := range connectCodes {
		if errors.Is(err, k.kind) {
			return connect.NewError(k.code, err)
		}
	}
	s.log.Error("e2b rpc failed", "error", err)
	return connect.NewError(connect.CodeInternal, errors.New("internal error; the aether-api log has the detail"))
}

// rpcUnimplemented answers an RPC Aetherium does not serve yet.
func rpcUnimplemented(what string) error {
	return connect.NewError(connect.CodeUnimplemented, fmt.Errorf("%s is not supported by Aetherium's E2B API yet (see docs/e2b.md)", what))
}
