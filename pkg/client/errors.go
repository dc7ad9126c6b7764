package client

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/api/wire"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Error is an error answered by the API. It wraps the pkg/types kind of its
// code, so errors.Is(err, types.ErrNotFound) and the like work.
type Error struct {
	// Status is the HTTP status.
	Status int
	// Code is the API's error code, e.g. wire.CodeNotFound.
	Code string
	// Message is the server's explanation, meant for a person.
	Message string
	// noKey: the request carried no key at all.
	noKey bool
}

func (e *Error) Error() string {
	switch {
	case e.Code == wire.CodeUnauthenticated && e.noKey:
		return "no API key was given; set AETHERIUM_API_KEY (or api_key in the config): " + e.Message
	case e.Code == wire.CodeUnauthenticated:
		return ErrUnauthenticated.Error() + ": " + e.Message
	}
	return e.Message
}

// Unwrap returns the pkg/types kind of the error's code (nil for codes
// that have none, such as internal).
func (e *Error) Unwrap() error { return kindOf(e.Code) }

// kinds maps the API's error codes back to the kinds in pkg/types: the
// reverse of the server's mapping, in one place.
var kinds = map[string]error{
	wire.CodeInvalidRequest:  types.ErrInvalid,
	wire.CodeInvalid:         types.ErrInvalid,
	wire.CodeTooLarge:        types.ErrInvalid,
	wire.CodeNotFound:        types.ErrNotFound,
	wire.CodeConflict:        types.ErrConflict,
	wire.CodeLimitExceeded:   types.ErrLimit,
	wire.CodeUnavailable:     types.ErrUnavailable,
	wire.CodeNotSupported:    types.ErrNotSupported,
	wire.CodeUnauthenticated: ErrUnauthenticated,
}

func kindOf(code string) error { return kinds[code] }

// codeOfStatus names the code of an answer whose body carried none (a
// proxy's error page, say).
func codeOfStatus(status int) string {
	switch status {
	case http.StatusBadRequest:
		return wire.CodeInvalidRequest
	case http.StatusUnprocessableEntity:
		return wire.CodeInvalid
	case http.StatusUnauthorized:
		return wire.CodeUnauthenticated
	case http.StatusNotFound:
		return wire.CodeNotFound
	case http.StatusConflict:
		return wire.CodeConflict
	case http.StatusRequestEntityTooLarge:
		return wire.CodeTooLarge
	case http.StatusTooManyRequests:
		return wire.CodeLimitExceeded
	case http.StatusServiceUnavailable, http.StatusBadGateway, http.StatusGatewayTimeout:
		return wire.CodeUnavailable
	case http.StatusNotImplemented:
		return wire.CodeNotSupported
	default:
		return wire.CodeInternal
	}
}

// wireError is the API's error body: {"error":{"code","message"}}.
type wireError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// decodeError turns a non-2xx answer into an *Error.
func decodeError(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var body struct {
		Error *wireError `json:"error"`
	}
	if err := json.Unmarshal(b, &body); err == nil && body.Error != nil && body.Error.Code != "" {
		return newError(resp.StatusCode, *body.Error)
	}
	msg := strings.TrimSpace(string(b))
	if len(msg) > 200 {
		msg = msg[:200] + "..."
	}
	if msg == "" {
		msg = http.StatusText(resp.StatusCode)
	}
	return newError(resp.StatusCode, wireError{Code: codeOfStatus(resp.StatusCode),
		Message: fmt.Sprintf("%s %s: %s (HTTP %d)", resp.Request.Method, resp.Request.URL.Path, msg, resp.StatusCode)})
}

func newError(status int, w wireError) *Error {
	if w.Message == "" {
		w.Message = w.Code
	}
	return &Error{Status: status, Code: w.Code, Message: w.Message}
}
