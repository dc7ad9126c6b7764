package e2b

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/apikey"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// maxBodyBytes bounds a control-plane JSON body.
const maxBodyBytes = 1 << 20

// List paging (GET /v2/sandboxes): E2B's default and maximum page.
const (
	defaultListLimit = 100
	maxListLimit     = 100
)

// maxTimeout is the longest timeout in seconds that a time.Duration holds
// with room to spare (about 31 years); api.max_ttl may bound it further.
const maxTimeout = 1 << 30

// killWait bounds how long kill waits for the VM to be deleted before it
// answers; the deletion goes on if it takes longer.
const killWait = 20 * time.Second

// farFuture is the endAt of a sandbox without expiry (one made through
// the native API and never given a TTL).
var farFuture = time.Date(9999, 12, 31, 0, 0, 0, 0, time.UTC)

func (s *Server) controlRoutes() http.Handler {
	mux := http.NewServeMux()
	h := func(pattern string, f func(http.ResponseWriter, *http.Request) error) {
		mux.HandleFunc(pattern, s.authed(f))
	}
	h("POST /sandboxes", s.create)
	h("POST /v2/sandboxes", s.create)
	h("GET /sandboxes", s.listV1)
	h("GET /v2/sandboxes", s.listV2)
	h("GET /sandboxes/{id}", s.get)
	h("DELETE /sandboxes/{id}", s.kill)
	h("POST /sandboxes/{id}/timeout", s.setTimeout)
	h("POST /sandboxes/{id}/connect", s.connect)
	h("POST /v2/sandboxes/{id}/connect", s.connect)
	h("POST /sandboxes/{id}/pause", s.pause)
	h("POST /sandboxes/{id}/resume", s.resume)
	h("POST /sandboxes/{id}/refreshes", notSupported("refreshing a sandbox (use setTimeout)"))
	h("GET /sandboxes/{id}/metrics", notSupported("sandbox metrics"))
	h("GET /sandboxes/metrics", notSupported("sandbox metrics"))
	h("GET /sandboxes/{id}/logs", notSupported("sandbox logs"))
	h("GET /v2/sandboxes/{id}/logs", notSupported("sandbox logs"))
	h("/sandboxes/", notSupported("this sandbox route"))
	h("/v2/sandboxes/", notSupported("this sandbox route"))
	h("/templates", notSupported("managing templates over the API (use `aether-cli template`)"))
	h("/templates/", notSupported("managing templates over the API (use `aether-cli template`)"))
	h("/v2/templates", notSupported("managing templates over the API (use `aether-cli template`)"))
	h("/v2/templates/", notSupported("managing templates over the API (use `aether-cli template`)"))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, errorBody{Code: http.StatusNotFound, Message: "no route " + r.Method + " " + r.URL.Path})
	})
	return mux
}

func notSupported(what string) func(http.ResponseWriter, *http.Request) error {
	return func(http.ResponseWriter, *http.Request) error { return errNotSupported(what) }
}

// authed checks X-API-KEY and runs f in the key's scope.
func (s *Server) authed(f func(http.ResponseWriter, *http.Request) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		key := strings.TrimSpace(r.Header.Get("X-API-Key"))
		k, err := apikey.Authenticate(r.Context(), s.keys, key)
		switch {
		case errors.Is(err, apikey.ErrUnauthenticated):
			s.log.Info("e2b: rejected an API key", "key_id", apikey.ID(key))
			s.writeError(w, r, errStatus(http.StatusUnauthorized, "a valid Aetherium API key is required in X-API-KEY (E2B_API_KEY); create one with `aether-cli apikey create NAME`"))
			return
		case err != nil:
			s.writeError(w, r, fmt.Errorf("%w: cannot check the API key: the key store does not answer; try again shortly", types.ErrUnavailable))
			return
		}
		ctx := service.WithScope(r.Context(), service.Scope{Tenant: k.Tenant, Admin: k.Admin, Limits: k.Limits.Merge(s.cfg.DefaultLimits)})
		if err := f(w, r.WithContext(ctx)); err != nil {
			s.writeError(w, r, err)
		}
	}
}

// decodeBody reads an optional JSON body into v; unknown fields are
// ignored, as the SDKs send options Aetherium does not act on.
func decodeBody(r *http.Request, v any) error {
	b, err := io.ReadAll(io.LimitReader(r.Body, maxBodyBytes+1))
	if err != nil {
		return fmt.Errorf("reading the request body: %w", err)
	}
	if len(b) > maxBodyBytes {
		return errStatus(http.StatusRequestEntityTooLarge, "the request body is larger than %d bytes", maxBodyBytes)
	}
	if len(strings.TrimSpace(string(b))) == 0 {
		return nil
	}
	if err := json.Unmarshal(b, v); err != nil {
		return errStatus(http.StatusBadRequest, "the request body is not valid JSON for this route: %s", strings.TrimPrefix(err.Error(), "json: "))
	}
	return nil
}

// newSandboxRequest is E2B's NewSandbox body; other fields are ignored.
type newSandboxRequest struct {
	TemplateID string            `json:"templateID"`
	Timeout    *int64            `json:"timeout"`
	Metadata   map[string]string `json:"metadata"`
	EnvVars    map[string]string `json:"envVars"`
	// AutoPause (the SDKs' lifecycle.onTimeout "pause") pauses the
	// sandbox at its timeout instead of killing it (types.ExpiryPause).
	AutoPause bool `json:"autoPause"`
	// AutoPauseMemory false asks for a filesystem-only pause; AutoResume
	// for a resume on traffic. Neither is supported.
	AutoPauseMemory *bool `json:"autoPauseMemory"`
	AutoResume      *struct {
		Enabled bool `json:"enabled"`
	} `json:"autoResume"`
}

// onExpiry is the VM's on-expiry action for req, or why it cannot be had.
func (req newSandboxRequest) onExpiry() (string, error) {
	if req.AutoResume != nil && req.AutoResume.Enabled {
		return "", errNotSupported("resuming a paused sandbox when traffic reaches it (lifecycle.autoResume); resume it with Sandbox.connect()")
	}
	if !req.AutoPause {
		return types.ExpiryDelete, nil
	}
	if req.AutoPauseMemory != nil && !*req.AutoPauseMemory {
		return "", errNotSupported("a filesystem-only pause on timeout (onTimeout.keepMemory false); the pause keeps memory, so leave keepMemory unset or true")
	}
	return types.ExpiryPause, nil
}

// sandboxResponse is E2B's Sandbox, the answer of create and connect.
type sandboxResponse struct {
	SandboxID          string  `json:"sandboxID"`
	TemplateID         string  `json:"templateID"`
	ClientID           string  `json:"clientID"`
	EnvdVersion        string  `json:"envdVersion"`
	EnvdAccessToken    string  `json:"envdAccessToken"`
	Domain             *string `json:"domain"`
	Alias              string  `json:"alias"`
	TrafficAccessToken *string `json:"trafficAccessToken"`
}

// listedSandbox is E2B's ListedSandbox; sandboxDetail adds what GET
// /sandboxes/{id} answers.
type listedSandbox struct {
	SandboxID    string            `json:"sandboxID"`
	TemplateID   string            `json:"templateID"`
	Alias        string            `json:"alias"`
	ClientID     string            `json:"clientID"`
	CPUCount     int               `json:"cpuCount"`
	MemoryMB     int               `json:"memoryMB"`
	DiskSizeMB   int               `json:"diskSizeMB"`
	StartedAt    time.Time         `json:"startedAt"`
	EndAt        time.Time         `json:"endAt"`
	State        string            `json:"state"`
	EnvdVersion  string            `json:"envdVersion"`
	Metadata     map[string]string `json:"metadata"`
	VolumeMounts []any             `json:"volumeMounts"`
}

type sandboxDetail struct {
	listedSandbox
	Domain              *string           `json:"domain"`
	AllowInternetAccess *bool             `json:"allowInternetAccess"`
	Lifecycle           *sandboxLifecycle `json:"lifecycle"`
}

// sandboxLifecycle is E2B's SandboxLifecycle.
type sandboxLifecycle struct {
	AutoResume bool   `json:"autoResume"`
	OnTimeout  string `json:"onTimeout"` // kill or pause
}

func lifecycleOf(vm *types.VM) *sandboxLifecycle {
	l := &sandboxLifecycle{OnTimeout: "kill"}
	if vm.OnExpiry == types.ExpiryPause {
		l.OnTimeout = "pause"
	}
	return l
}

// template resolves a templateID: the built-in base or a registered one.
func (s *Server) template(ctx context.Context, name string) (*storage.Template, error) {
	if name == "" || name == BaseTemplate {
		return &storage.Template{Name: BaseTemplate, VCPUs: min(BaseVCPUs, s.cfg.MaxVCPUs), MemoryMB: BaseMemoryMB}, nil
	}
	tpl, err := s.store.GetTemplate(ctx, name)
	if errors.Is(err, types.ErrNotFound) {
		return nil, errStatus(http.StatusBadRequest, "template %q is not registered; use %q or register it with `aether-cli template create %s`", name, BaseTemplate, name)
	}
	return tpl, err
}

// newToken returns a fresh access token and its SHA-256.
func newToken() (string, []byte, error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", nil, err
	}
	tok := base64.RawURLEncoding.EncodeToString(b[:])
	h := sha256.Sum256([]byte(tok))
	return tok, h[:], nil
}

func (s *Server) create(w http.ResponseWriter, r *http.Request) error {
	var req newSandboxRequest
	if err := decodeBody(r, &req); err != nil {
		return err
	}
	onExpiry, err := req.onExpiry()
	if err != nil {
		return err
	}
	ctx := r.Context()
	tpl, err := s.template(ctx, req.TemplateID)
	if err != nil {
		return err
	}
	ttl, err := timeoutRequest{Timeout: req.Timeout}.ttl(s.cfg.DefaultTimeout)
	if err != nil {
		return err
	}
	for k := range req.Metadata {
		// The label rules are types.VMSpec's: check one key at a time to
		// name the metadata key in the answer.
		probe := types.VMSpec{Name: "probe", VCPUs: 1, MemoryMB: types.MinMemoryMB, Labels: map[string]string{k: ""}}
		if err := probe.Validate(0); err != nil {
			return errStatus(http.StatusBadRequest, "metadata key %q cannot be stored: Aetherium keeps metadata as VM labels, whose keys are 1-63 characters of [A-Za-z0-9._/-] starting with a letter or digit", k)
		}
	}
	env := maps.Clone(tpl.Env)
	if env == nil && len(req.EnvVars) > 0 {
		env = map[string]string{}
	}
	maps.Copy(env, req.EnvVars)
	var suffix [5]byte
	_, _ = rand.Read(suffix[:])
	name := "e2b-" + hex.EncodeToString(suffix[:])
	tok, hash, err := newToken()
	if err != nil {
		return err
	}

	o := service.CreateVMOptions{Name: name, VCPUs: tpl.VCPUs, MemoryMB: tpl.MemoryMB, Labels: req.Metadata, Env: env, TTL: ttl, OnExpiry: onExpiry}
	if tpl.Name != BaseTemplate {
		// A template built into a snapshot starts its sandboxes by
		// restoring a clone of a booted guest instead of booting one.
		if sn, err := s.store.FindSnapshot(ctx, types.KindTemplate, tpl.Name); err == nil && sn.State == types.SnapshotReady {
			o.Template, o.VCPUs, o.MemoryMB = tpl.Name, 0, 0
		}
	}
	id, err := s.svc.CreateVMTaskWithOptions(ctx, o)
	if err != nil {
		return err
	}
	if err := s.store.CreateSandbox(ctx, &storage.Sandbox{VMID: id.String(), Template: tpl.Name, TokenHashes: [][]byte{hash}}); err != nil {
		s.abandon(ctx, id)
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, s.cfg.CreateWait)
	defer cancel()
	task, err := s.svc.WaitTask(wctx, id)
	switch {
	case err != nil && wctx.Err() != nil && ctx.Err() == nil:
		s.abandon(ctx, id)
		return errStatus(http.StatusServiceUnavailable, "sandbox %s did not start within %s, so it was deleted; the workers may be busy, try again", id, s.cfg.CreateWait)
	case err != nil:
		s.abandon(ctx, id)
		return err
	case task.State != types.TaskSucceeded:
		s.abandon(ctx, id)
		return errStatus(http.StatusInternalServerError, "creating sandbox %s failed: %s", id, task.Error)
	}
	s.log.Info("e2b: sandbox created", "vm_id", id, "template", tpl.Name)
	w.Header().Set("Location", "/sandboxes/"+id.String())
	writeJSON(w, http.StatusCreated, s.sandboxJSON(id.String(), tpl.Name, tok))
	return nil
}

// abandon deletes the VM of a create that failed half-way.
func (s *Server) abandon(ctx context.Context, id uuid.UUID) {
	if _, err := s.svc.DeleteVMTask(context.WithoutCancel(ctx), id.String()); err != nil {
		s.log.Warn("e2b: deleting the VM of a failed create", "vm_id", id, "error", err)
	}
}

func (s *Server) sandboxJSON(id, template, token string) sandboxResponse {
	return sandboxResponse{SandboxID: id, TemplateID: template, ClientID: ClientID, EnvdVersion: EnvdVersion,
		EnvdAccessToken: token, Domain: s.domain(), Alias: template}
}

func (s *Server) domain() *string {
	if s.cfg.Domain == "" {
		return nil
	}
	d := s.cfg.Domain
	return &d
}

// errNoSandbox is the control plane's 404; the SDKs need code 404 in the
// body to raise SandboxNotFoundError (or return false from kill).
func errNoSandbox(id string) error {
	return errStatus(http.StatusNotFound, "sandbox %q not found", id)
}

// lookup returns the live VM and sandbox of {id} as the caller may see
// them, or errNoSandbox.
func (s *Server) lookup(r *http.Request) (*types.VM, *storage.Sandbox, error) {
	raw := r.PathValue("id")
	id, err := uuid.Parse(raw)
	if err != nil {
		return nil, nil, errNoSandbox(raw)
	}
	vm, err := s.svc.GetVM(r.Context(), id)
	if errors.Is(err, types.ErrNotFound) || (err == nil && (vm.State == types.VMDeleted || vm.State == types.VMDeleting)) {
		return nil, nil, errNoSandbox(raw)
	}
	if err != nil {
		return nil, nil, err
	}
	sb, err := s.store.GetSandbox(r.Context(), vm.ID)
	if errors.Is(err, types.ErrNotFound) {
		return nil, nil, errStatus(http.StatusNotFound, "VM %s was not created through the E2B API, so it is no sandbox", raw)
	}
	return vm, sb, err
}

func (s *Server) get(w http.ResponseWriter, r *http.Request) error {
	vm, sb, err := s.lookup(r)
	if err != nil {
		return err
	}
	yes := true
	writeJSON(w, http.StatusOK, sandboxDetail{listedSandbox: listed(vm, sb), Domain: s.domain(), AllowInternetAccess: &yes, Lifecycle: lifecycleOf(vm)})
	return nil
}

func listed(vm *types.VM, sb *storage.Sandbox) listedSandbox {
	end := farFuture
	if vm.ExpiresAt != nil {
		end = *vm.ExpiresAt
	}
	md := vm.Labels
	if md == nil {
		md = map[string]string{}
	}
	return listedSandbox{SandboxID: vm.ID, TemplateID: sb.Template, Alias: sb.Template, ClientID: ClientID,
		CPUCount: vm.VCPUs, MemoryMB: vm.MemoryMB, StartedAt: vm.CreatedAt, EndAt: end, State: sandboxState(vm.State),
		EnvdVersion: EnvdVersion, Metadata: md, VolumeMounts: []any{}}
}

// sandboxState is E2B's state of a VM: a stopped VM is the nearest thing
// to a paused sandbox, and so is a lost one (E2B has no other state that
// is not running: it takes no commands until its worker returns); every
// other live VM counts as running.
func sandboxState(st types.VMState) string {
	if st == types.VMStopped || st == types.VMStopping || st == types.VMLost || st == types.VMPaused || st == types.VMSuspended {
		return "paused"
	}
	return "running"
}

func (s *Server) kill(w http.ResponseWriter, r *http.Request) error {
	vm, _, err := s.lookup(r)
	if err != nil {
		return err
	}
	task, err := s.svc.DeleteVMTask(r.Context(), vm.ID)
	if err != nil {
		return err
	}
	s.clients.drop(vm.ID)
	// E2B's kill is done when it answers: wait (a bounded time) so that
	// a second kill, getInfo and the sandbox plane see the sandbox gone.
	wctx, cancel := context.WithTimeout(r.Context(), killWait)
	defer cancel()
	if t, err := s.svc.WaitTask(wctx, task); err == nil && t.State == types.TaskFailed {
		return fmt.Errorf("deleting sandbox %s failed: %s", vm.ID, t.Error)
	}
	s.log.Info("e2b: sandbox killed", "vm_id", vm.ID)
	w.WriteHeader(http.StatusNoContent)
	return nil
}

type timeoutRequest struct {
	Timeout *int64 `json:"timeout"`
}

func (req timeoutRequest) ttl(def time.Duration) (time.Duration, error) {
	if req.Timeout == nil {
		return def, nil
	}
	if *req.Timeout <= 0 || *req.Timeout > maxTimeout {
		return 0, errStatus(http.StatusBadRequest, "timeout %d must be a number of seconds from 1 to %d", *req.Timeout, maxTimeout)
	}
	return time.Duration(*req.Timeout) * time.Second, nil
}

func (s *Server) setTimeout(w http.ResponseWriter, r *http.Request) error {
	var req timeoutRequest
	if err := decodeBody(r, &req); err != nil {
		return err
	}
	if req.Timeout == nil {
		return errStatus(http.StatusBadRequest, "timeout is required: the number of seconds from now the sandbox lives")
	}
	ttl, err := req.ttl(0)
	if err != nil {
		return err
	}
	vm, _, err := s.lookup(r)
	if err != nil {
		return err
	}
	if _, err := s.svc.SetVMTTL(r.Context(), uuid.MustParse(vm.ID), ttl); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// connect answers a running sandbox's details with a fresh access token
// (only hashes are stored, so the first token cannot be shown again) and
// extends its TTL when the timeout asked for ends later than the current.
func (s *Server) connect(w http.ResponseWriter, r *http.Request) error {
	var req timeoutRequest
	if err := decodeBody(r, &req); err != nil {
		return err
	}
	ttl, err := req.ttl(s.cfg.DefaultTimeout)
	if err != nil {
		return err
	}
	vm, sb, err := s.lookup(r)
	if err != nil {
		return err
	}
	if vm.State != types.VMRunning {
		if vm.State == types.VMLost {
			return errStatus(http.StatusServiceUnavailable, "sandbox %s is lost: %s; wait for its worker to return, or kill it", vm.ID, vm.Error)
		}
		switch {
		case vm.State == types.VMPaused || vm.State == types.VMSuspended:
			if err := s.resumeVM(r.Context(), vm); err != nil {
				return err
			}
		case sandboxState(vm.State) == "paused":
			return errStatus(http.StatusConflict, "sandbox %s is %s; only a sandbox paused through the API can be resumed", vm.ID, vm.State)
		default:
			return errStatus(http.StatusConflict, "sandbox %s is %s, not running", vm.ID, vm.State)
		}
	}
	// A sandbox paused through this API (or on its timeout) has no
	// expiry and runs again with the timeout connect asks for; one with
	// a later expiry keeps it.
	if vm.ExpiresAt == nil || time.Now().Add(ttl).After(*vm.ExpiresAt) {
		if _, err := s.svc.SetVMTTL(r.Context(), uuid.MustParse(vm.ID), ttl); err != nil {
			return err
		}
	}
	tok, hash, err := newToken()
	if err != nil {
		return err
	}
	if err := s.store.AddSandboxToken(r.Context(), vm.ID, hash); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, s.sandboxJSON(vm.ID, sb.Template, tok))
	return nil
}

// listV1 answers GET /sandboxes: every running sandbox of the caller.
func (s *Server) listV1(w http.ResponseWriter, r *http.Request) error {
	md, err := metadataFilter(r.URL.Query().Get("metadata"))
	if err != nil {
		return err
	}
	out, _, err := s.list(r.Context(), listFilter{metadata: md, states: map[string]bool{"running": true}}, "", 0)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// listV2 answers GET /v2/sandboxes, paged by nextToken and X-Next-Token.
func (s *Server) listV2(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	md, err := metadataFilter(q.Get("metadata"))
	if err != nil {
		return err
	}
	f := listFilter{metadata: md, states: map[string]bool{"running": true, "paused": true}, template: q.Get("template")}
	if v := q.Get("state"); v != "" {
		f.states = map[string]bool{}
		for _, st := range strings.Split(v, ",") {
			if st != "running" && st != "paused" {
				return errStatus(http.StatusBadRequest, "state %q is unknown; use running, paused or both", st)
			}
			f.states[st] = true
		}
	}
	if v := q.Get("startedAfter"); v != "" {
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			return errStatus(http.StatusBadRequest, "startedAfter %q is not an RFC 3339 time", v)
		}
		f.startedAfter = t
	}
	if v := q.Get("order"); v != "" && v != "asc" {
		return errStatus(http.StatusNotImplemented, "order=%s is not supported by Aetherium's E2B API yet: sandboxes are listed oldest first (order=asc)", v)
	}
	limit := defaultListLimit
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxListLimit {
			return errStatus(http.StatusBadRequest, "limit %q must be a number from 1 to %d", v, maxListLimit)
		}
		limit = n
	}
	after := q.Get("nextToken")
	if after != "" {
		if _, err := uuid.Parse(after); err != nil {
			return errStatus(http.StatusBadRequest, "nextToken %q is not one this server gave", after)
		}
	}
	out, next, err := s.list(r.Context(), f, after, limit)
	if err != nil {
		return err
	}
	if next != "" {
		w.Header().Set("X-Next-Token", next)
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// listFilter narrows a list of sandboxes.
type listFilter struct {
	metadata     map[string]string // every one of these labels
	states       map[string]bool   // E2B states kept
	template     string            // "": any
	startedAfter time.Time         // zero: any
}

// keepsVM reports whether f keeps vm, template aside.
func (f listFilter) keepsVM(vm *types.VM) bool {
	return vm.State != types.VMDeleting && f.states[sandboxState(vm.State)] && vm.CreatedAt.After(f.startedAfter)
}

// list pages through the caller's VMs after `after`, oldest first,
// keeping the sandboxes f keeps, until it has limit of them (0: all).
// next is the token of the following page, "" at the end.
func (s *Server) list(ctx context.Context, f listFilter, after string, limit int) ([]listedSandbox, string, error) {
	out := []listedSandbox{}
	const page = 100
	for {
		vms, err := s.svc.ListVMsWithOptions(ctx, service.ListVMsOptions{Labels: f.metadata, After: after, Limit: page})
		if err != nil {
			return nil, "", err
		}
		for _, vm := range vms {
			after = vm.ID
			if !f.keepsVM(vm) {
				continue
			}
			sb, err := s.store.GetSandbox(ctx, vm.ID)
			if errors.Is(err, types.ErrNotFound) {
				continue // a VM made through the native API
			}
			if err != nil {
				return nil, "", err
			}
			if f.template != "" && sb.Template != f.template {
				continue
			}
			out = append(out, listed(vm, sb))
			if limit > 0 && len(out) == limit {
				return out, vm.ID, nil
			}
		}
		if len(vms) < page {
			return out, "", nil
		}
	}
}

// metadataFilter decodes E2B's metadata query value: k=v pairs joined by
// '&', each key and value URL-encoded, the whole URL-encoded once more
// (on top of the query's own encoding, which net/url removed).
func metadataFilter(v string) (map[string]string, error) {
	if v == "" {
		return nil, nil
	}
	dec, err := url.QueryUnescape(v)
	if err != nil {
		return nil, errStatus(http.StatusBadRequest, "metadata filter %q is not URL-encoded", v)
	}
	md := map[string]string{}
	for _, kv := range strings.Split(dec, "&") {
		if kv == "" {
			continue
		}
		k, val, _ := strings.Cut(kv, "=")
		k, err1 := url.QueryUnescape(k)
		val, err2 := url.QueryUnescape(val)
		if err1 != nil || err2 != nil {
			return nil, errStatus(http.StatusBadRequest, "metadata filter %q is not URL-encoded", kv)
		}
		md[k] = val
	}
	return md, nil
}
