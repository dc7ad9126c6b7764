// Package fcfake is a fake Firecracker for tests. It serves the Firecracker
// API on a unix socket, checks every request against the pinned OpenAPI
// spec (firecracker-api-v1.16.1.yaml, loaded at run time with kin-openapi,
// never copied by hand), enforces the pre-boot/post-boot ordering of
// Firecracker's docs and answers bad input with 400 and a fault_message.
//
// It can also stand in for the firecracker and jailer processes (Main,
// JailerMain): a test binary that re-executes itself under those names
// lets the backend spawn, configure and stop a real child process, whose
// hybrid vsock socket forwards "CONNECT 9999" to an in-process fc-agent.
// What it cannot emulate is a guest: commands run on the host, and the
// chroot, uid switch, cgroups and network namespace of the jailer are
// checked and recorded, not applied.
package fcfake

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"strings"

	"github.com/getkin/kin-openapi/openapi2"
	"github.com/getkin/kin-openapi/openapi2conv"
	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
	"gopkg.in/yaml.v3"
)

// SpecEnv names the variable that tells a re-executed fake where the spec
// is.
const SpecEnv = "FCFAKE_SPEC"

// Spec is the loaded API specification with a router over its paths.
type Spec struct {
	// Version is the spec's info.version, e.g. "1.16.1".
	Version string
	doc     *openapi3.T
	router  routers.Router
}

// LoadSpec reads Firecracker's swagger 2.0 file, converts it to OpenAPI 3
// (kin-openapi validates only v3) and builds a router over it.
func LoadSpec(path string) (*Spec, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the Firecracker API spec: %w", err)
	}
	// kin-openapi's swagger 2.0 type decodes JSON; go through a generic
	// YAML tree first.
	var tree any
	if err := yaml.Unmarshal(raw, &tree); err != nil {
		return nil, fmt.Errorf("parsing %s: %w", path, err)
	}
	js, err := json.Marshal(stringKeys(tree))
	if err != nil {
		return nil, fmt.Errorf("converting %s to JSON: %w", path, err)
	}
	var doc2 openapi2.T
	if err := json.Unmarshal(js, &doc2); err != nil {
		return nil, fmt.Errorf("decoding %s as swagger 2.0: %w", path, err)
	}
	doc3, err := openapi2conv.ToV3(&doc2)
	if err != nil {
		return nil, fmt.Errorf("converting %s to OpenAPI 3: %w", path, err)
	}
	if err := doc3.Validate(context.Background()); err != nil {
		return nil, fmt.Errorf("%s is not a valid API description: %w", path, err)
	}
	denyUnknownFields(doc3)
	// The API is served on a unix socket, whatever host a client names:
	// match on paths only.
	doc3.Servers = nil
	router, err := gorillamux.NewRouter(doc3)
	if err != nil {
		return nil, fmt.Errorf("routing %s: %w", path, err)
	}
	return &Spec{Version: doc2.Info.Version, doc: doc3, router: router}, nil
}

// denyUnknownFields makes every object schema with properties reachable
// from a request body refuse properties it does not name. Firecracker
// decodes its request bodies with serde's deny_unknown_fields, so a
// misspelt field is a 400 there; its spec says nothing about it, and
// JSON Schema (so kin-openapi) then allows any extra property. A schema
// that states additionalProperties itself keeps it: MMDS
// (MmdsContentsObject says true) takes arbitrary JSON. The vendored
// spec file stays as published; the rule is applied to the loaded tree.
// Schemas are shared by $ref, so answers using the same definitions are
// held to the same rule, which keeps the fake's own answers honest too.
func denyUnknownFields(doc *openapi3.T) {
	seen := map[*openapi3.Schema]bool{}
	var walk func(*openapi3.SchemaRef)
	walk = func(ref *openapi3.SchemaRef) {
		if ref == nil || ref.Value == nil || seen[ref.Value] {
			return
		}
		s := ref.Value
		seen[s] = true
		if len(s.Properties) > 0 && s.AdditionalProperties.Has == nil && s.AdditionalProperties.Schema == nil {
			s.AdditionalProperties.Has = openapi3.Ptr(false)
		}
		for _, p := range s.Properties {
			walk(p)
		}
		walk(s.Items)
		walk(s.AdditionalProperties.Schema)
		for _, l := range []openapi3.SchemaRefs{s.AllOf, s.AnyOf, s.OneOf} {
			for _, e := range l {
				walk(e)
			}
		}
	}
	for _, item := range doc.Paths.Map() {
		for _, op := range item.Operations() {
			if op.RequestBody == nil || op.RequestBody.Value == nil {
				continue
			}
			for _, mt := range op.RequestBody.Value.Content {
				walk(mt.Schema)
			}
		}
	}
}

// stringKeys turns the map[any]any that YAML gives for keys such as 200
// into map[string]any, which JSON can encode.
func stringKeys(v any) any {
	switch t := v.(type) {
	case map[string]any:
		for k, e := range t {
			t[k] = stringKeys(e)
		}
		return t
	case map[any]any:
		m := make(map[string]any, len(t))
		for k, e := range t {
			m[fmt.Sprint(k)] = stringKeys(e)
		}
		return m
	case []any:
		for i, e := range t {
			t[i] = stringKeys(e)
		}
		return t
	}
	return v
}

// Validate checks a request against the spec: the route must exist and
// the body must match its schema. body is the request's body, already
// read. It returns the matched route and its path parameters.
func (s *Spec) Validate(r *http.Request, body []byte) (*routers.Route, map[string]string, error) {
	route, params, err := s.router.FindRoute(r)
	if err != nil {
		return nil, nil, fmt.Errorf("Invalid request method and/or path: %s %s", r.Method, r.URL.Path)
	}
	r.Body = http.NoBody
	if len(body) > 0 {
		r.Body = ioNopCloser{bytes.NewReader(body)}
	}
	in := &openapi3filter.RequestValidationInput{
		Request:    r,
		PathParams: params,
		Route:      route,
		Options:    &openapi3filter.Options{MultiError: true},
	}
	if err := openapi3filter.ValidateRequest(r.Context(), in); err != nil {
		return route, params, fmt.Errorf("the request does not match the Firecracker %s API: %s", s.Version, withoutSchema(oneLine(err.Error())))
	}
	return route, params, nil
}

// ValidateResponse checks an answer the fake is about to give.
func (s *Spec) ValidateResponse(r *http.Request, route *routers.Route, params map[string]string, status int, body []byte) error {
	h := http.Header{}
	h.Set("Content-Type", "application/json")
	in := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{Request: r, PathParams: params, Route: route},
		Status:                 status,
		Header:                 h,
		Options:                &openapi3filter.Options{IncludeResponseStatus: true},
	}
	in.SetBodyBytes(body)
	return openapi3filter.ValidateResponse(r.Context(), in)
}

type ioNopCloser struct{ *bytes.Reader }

func (ioNopCloser) Close() error { return nil }

// schemaRE matches the schema kin-openapi quotes in its errors: the
// constraint and the value say enough in a fault message.
var schemaRE = regexp.MustCompile(` Schema: .*? Value: `)

func withoutSchema(s string) string { return schemaRE.ReplaceAllString(s, "; value: ") }

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
