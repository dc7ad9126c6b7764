package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/aetherium/aetherium-core/pkg/api/wire"
	"github.com/aetherium/aetherium-core/pkg/apikey"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Error codes of the JSON error body (see pkg/api/wire).
const (
	CodeInvalidRequest  = wire.CodeInvalidRequest
	CodeUnauthenticated = wire.CodeUnauthenticated
	CodeNotFound        = wire.CodeNotFound
	CodeConflict        = wire.CodeConflict
	CodeTooLarge        = wire.CodeTooLarge
	CodeInvalid         = wire.CodeInvalid
	CodeLimitExceeded   = wire.CodeLimitExceeded
	CodeInternal        = wire.CodeInternal
	CodeCreateFailed    = wire.CodeCreateFailed
	CodeDeleteFailed    = wire.CodeDeleteFailed
	CodeExecFailed      = wire.CodeExecFailed
	CodeNotSupported    = wire.CodeNotSupported
	CodeUnavailable     = wire.CodeUnavailable
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
