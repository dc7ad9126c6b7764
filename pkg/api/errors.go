package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/aetherium/aetherium-core/pkg/apikey"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Error codes of the JSON error body. The first ones follow the kinds in
// pkg/types; the *_failed ones report a task that ended failed.
const (
	CodeInvalidRequest  = "invalid_request" // 400: the request itself is malformed
	CodeUnauthenticated = "unauthenticated" // 401
	CodeNotFound        = "not_found"       // 404
	CodeConflict        = "conflict"        // 409
	CodeTooLarge        = "too_large"       // 413
	CodeInvalid         = "invalid"         // 422: well-formed but can never succeed
	CodeLimitExceeded   = "limit_exceeded"  // 429: a tenant limit
	CodeInternal        = "internal"        // 500
	CodeCreateFailed    = "create_failed"   // 500: the create task failed
	CodeDeleteFailed    = "delete_failed"   // 500: the delete task failed
	CodeExecFailed      = "exec_failed"     // 500: the command could not run
	CodeNotSupported    = "not_supported"   // 501
	CodeUnavailable     = "unavailable"     // 503
)

// Error is an error with its HTTP status and code decided where it is
// made: malformed requests and failed tasks. Every other error is
// classified by its kind in httpError.
type Error struct {
	Status  int
	Code    string
	Message string
}

func (e *Error) Error() string { return e.Message }

// badRequest reports a request that is malformed (400).
func badRequest(format string, args ...any) error {
	return &Error{Status: http.StatusBadRequest, Code: CodeInvalidRequest, Message: fmt.Sprintf(format, args...)}
}

// errShuttingDown answers requests that were waiting when Shutdown began.
func errShuttingDown(what string) error {
	return &Error{Status: http.StatusServiceUnavailable, Code: CodeUnavailable,
		Message: "the server is shutting down; " + what}
}

// errorBody is the JSON of an error: {"error":{"code":..,"message":..}}.
type errorBody struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// httpError is the one place errors become HTTP statuses and codes. An
// internal error's detail stays in the log: its message names the request
// id to look it up with.
func httpError(err error, requestID string) (int, errorBody) {
	var e *Error
	var tooBig *http.MaxBytesError
	kinds := []struct {
		kind   error
		status int
		code   string
	}{
		{apikey.ErrUnauthenticated, http.StatusUnauthorized, CodeUnauthenticated},
		{types.ErrInvalid, http.StatusUnprocessableEntity, CodeInvalid},
		{types.ErrNotFound, http.StatusNotFound, CodeNotFound},
		{types.ErrConflict, http.StatusConflict, CodeConflict},
		{types.ErrLimit, http.StatusTooManyRequests, CodeLimitExceeded},
		{types.ErrNotSupported, http.StatusNotImplemented, CodeNotSupported},
		{types.ErrUnavailable, http.StatusServiceUnavailable, CodeUnavailable},
	}
	switch {
	case errors.As(err, &e):
		return e.Status, errorBody{e.Code, e.Message}
	case errors.As(err, &tooBig):
		return http.StatusRequestEntityTooLarge, errorBody{CodeTooLarge,
			fmt.Sprintf("the request body is larger than the %d bytes this server accepts", tooBig.Limit)}
	}
	for _, k := range kinds {
		if errors.Is(err, k.kind) {
			return k.status, errorBody{k.code, err.Error()}
		}
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return http.StatusServiceUnavailable, errorBody{CodeUnavailable, "timed out: " + err.Error()}
	}
	return http.StatusInternalServerError, errorBody{CodeInternal,
		fmt.Sprintf("internal error (request %s); the aether-api log has the detail under that request id", requestID)}
}
