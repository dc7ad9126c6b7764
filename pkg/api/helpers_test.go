package api_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/api"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// contractTransport holds every request a test makes, and every answer,
// to openapi.yaml: a mismatch fails the test. Raw file bodies and NDJSON
// streams are not read, but their status, content type and the request's
// parameters are still checked.
type contractTransport struct {
	t      testing.TB
	router routers.Router
	next   http.RoundTripper
}

type offContractKey struct{}

// offContract marks a request the test makes malformed on purpose: only
// its answer is checked.
func offContract(req *http.Request) *http.Request {
	return req.WithContext(context.WithValue(req.Context(), offContractKey{}, true))
}

// newContractClient returns an http.Client checking the contract for the
// API at baseURL.
func newContractClient(t testing.TB, baseURL string, next http.RoundTripper) *http.Client {
	t.Helper()
	doc, err := api.LoadOpenAPI(context.Background())
	require.NoError(t, err)
	doc.Servers = openapi3.Servers{{URL: baseURL}}
	router, err := gorillamux.NewRouter(doc)
	require.NoError(t, err)
	if next == nil {
		next = http.DefaultTransport.(*http.Transport).Clone()
	}
	return &http.Client{Transport: &contractTransport{t: t, router: router, next: next}, Timeout: 5 * time.Minute}
}

func (c *contractTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	route, params, err := c.router.FindRoute(req)
	if err != nil {
		c.t.Errorf("contract: %s %s is not in openapi.yaml: %v", req.Method, req.URL.Path, err)
		return c.next.RoundTrip(req)
	}
	raw := req.Header.Get("Content-Type") == "application/octet-stream"
	opts := &openapi3filter.Options{
		AuthenticationFunc:    openapi3filter.NoopAuthenticationFunc,
		ExcludeRequestBody:    raw,
		IncludeResponseStatus: true,
		MultiError:            true,
	}
	checked := req
	if raw {
		// The security check reads the whole body into memory: keep the
		// file away from it, it is streamed.
		checked = req.Clone(req.Context())
		checked.Body, checked.GetBody = http.NoBody, nil
	}
	in := &openapi3filter.RequestValidationInput{Request: checked, PathParams: params, Route: route, Options: opts}
	if off, _ := req.Context().Value(offContractKey{}).(bool); !off {
		if err := openapi3filter.ValidateRequest(req.Context(), in); err != nil {
			c.t.Errorf("contract: request %s %s does not match openapi.yaml: %v", req.Method, req.URL, err)
		}
	}
	resp, err := c.next.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	ct := resp.Header.Get("Content-Type")
	stream := strings.HasPrefix(ct, api.NDJSON) || strings.HasPrefix(ct, "application/octet-stream")
	out := &openapi3filter.ResponseValidationInput{RequestValidationInput: in, Status: resp.StatusCode, Header: resp.Header,
		Options: &openapi3filter.Options{IncludeResponseStatus: true, MultiError: true, ExcludeResponseBody: stream}}
	if stream {
		out.SetBodyBytes(nil)
		if r := route.Operation.Responses.Status(resp.StatusCode); r != nil && r.Value.Content.Get(ct) == nil {
			c.t.Errorf("contract: %s %s answered %d with %s, which openapi.yaml does not list", req.Method, req.URL.Path, resp.StatusCode, ct)
		}
	} else {
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return nil, err
		}
		resp.Body = io.NopCloser(bytes.NewReader(body))
		out.SetBodyBytes(body)
	}
	if err := openapi3filter.ValidateResponse(req.Context(), out); err != nil {
		c.t.Errorf("contract: answer %d to %s %s does not match openapi.yaml: %v", resp.StatusCode, req.Method, req.URL, err)
	}
	return resp, nil
}

// client talks to one API with one key.
type client struct {
	t    testing.TB
	base string
	key  string
	hc   *http.Client
}

func newClient(t testing.TB, a *stack.API, key string) *client {
	return &client{t: t, base: a.URL, key: key, hc: newContractClient(t, a.URL, nil)}
}

// as returns the same client with another key.
func (c *client) as(key string) *client {
	cc := *c
	cc.key = key
	return &cc
}

// on returns the same client reporting to t (a subtest).
func (c *client) on(t testing.TB) *client {
	cc := *c
	cc.t = t
	return &cc
}

// request builds a request; body is JSON-encoded unless it is an
// io.Reader or a string (sent as it is).
func (c *client) request(method, path string, body any) *http.Request {
	c.t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case io.Reader:
		r = b
	case string:
		r = strings.NewReader(b)
	default:
		j, err := json.Marshal(b)
		require.NoError(c.t, err)
		r = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, c.base+path, r)
	require.NoError(c.t, err)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.key != "" {
		req.Header.Set("Authorization", "Bearer "+c.key)
	}
	return req
}

func (c *client) send(req *http.Request) *http.Response {
	c.t.Helper()
	resp, err := c.hc.Do(req)
	require.NoError(c.t, err)
	return resp
}

// call sends a JSON request, requires status want and decodes the answer
// into out (when not nil).
func (c *client) call(method, path string, body any, want int, out any) {
	c.t.Helper()
	c.check(c.request(method, path, body), want, out)
}

func (c *client) check(req *http.Request, want int, out any) {
	c.t.Helper()
	c.answer(c.send(req), want, out)
}

// answer requires status want of resp and decodes its JSON into out.
func (c *client) answer(resp *http.Response, want int, out any) {
	c.t.Helper()
	req := resp.Request
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(c.t, err)
	require.Equal(c.t, want, resp.StatusCode, "%s %s answered %s", req.Method, req.URL.Path, b)
	if out != nil {
		require.NoError(c.t, json.Unmarshal(b, out), "%s", b)
	}
}

// apiErr is the JSON of an error answer.
type apiErr struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// fail sends a request expected to fail and returns the error.
func (c *client) fail(req *http.Request, want int, code string) apiErr {
	c.t.Helper()
	return c.failed(c.send(req), want, code)
}

// failed requires resp to be the error want/code and returns it.
func (c *client) failed(resp *http.Response, want int, code string) apiErr {
	c.t.Helper()
	var e apiErr
	c.answer(resp, want, &e)
	require.Equal(c.t, code, e.Error.Code, "%s", e.Error.Message)
	require.NotEmpty(c.t, e.Error.Message)
	return e
}

// createVM makes a running VM and returns it.
func (c *client) createVM(name string) *types.VM {
	c.t.Helper()
	var vm types.VM
	c.call("POST", "/v1/vms?wait=true", api.CreateVMRequest{Name: name}, http.StatusCreated, &vm)
	require.Equal(c.t, types.VMRunning, vm.State)
	return &vm
}

// stream starts a streamed exec and returns the response for events.
func (c *client) stream(vmID string, req api.ExecRequest) (*http.Response, *events) {
	c.t.Helper()
	r := c.request("POST", "/v1/vms/"+vmID+"/exec", req)
	r.Header.Set("Accept", api.NDJSON)
	resp := c.send(r)
	require.Equal(c.t, http.StatusOK, resp.StatusCode)
	require.Equal(c.t, api.NDJSON, resp.Header.Get("Content-Type"))
	return resp, &events{t: c.t, sc: bufio.NewScanner(resp.Body)}
}

// events reads an NDJSON stream line by line.
type events struct {
	t  testing.TB
	sc *bufio.Scanner
}

// next returns the next event, or nil at the end of the stream.
func (e *events) next() *api.Event {
	e.t.Helper()
	if !e.sc.Scan() {
		return nil
	}
	var ev api.Event
	require.NoError(e.t, json.Unmarshal(e.sc.Bytes(), &ev), "line %q", e.sc.Text())
	return &ev
}

// all reads the rest of the stream.
func (e *events) all() []*api.Event {
	var evs []*api.Event
	for ev := e.next(); ev != nil; ev = e.next() {
		evs = append(evs, ev)
	}
	return evs
}

func fmtEvents(evs []*api.Event) string {
	var b strings.Builder
	for _, ev := range evs {
		j, _ := json.Marshal(ev)
		fmt.Fprintf(&b, "%s\n", j)
	}
	return b.String()
}

func newScanner(resp *http.Response) *bufio.Scanner { return bufio.NewScanner(resp.Body) }
