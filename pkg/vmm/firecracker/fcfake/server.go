package fcfake

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/getkin/kin-openapi/routers"
)

// Instance states, as InstanceInfo reports them.
const (
	StateNotStarted = "Not started"
	StateRunning    = "Running"
	StatePaused     = "Paused"
)

// Fault messages modelled on Firecracker's own wording.
const (
	faultPostBoot = "The requested operation is not supported after starting the microVM."
	faultPreBoot  = "The requested operation is not supported before starting the microVM."
)

// Options configure a fake.
type Options struct {
	// Spec validates every request. Required.
	Spec *Spec
	// ID is the instance id GET / reports. Default "anonymous-instance".
	ID string
	// Root emulates the jailer's chroot: absolute paths in requests are
	// looked up under it. Empty: the host's root.
	Root string
	// Fail makes the fake answer "METHOD /path" with 400 and this
	// fault_message once the request passed validation, to test error
	// paths.
	Fail map[string]string
	// OnStart is called when the guest would start running (InstanceStart,
	// or a snapshot load that resumes), with the VM's configuration. An
	// error becomes a 400.
	OnStart func(VMConfig) error
	// OnPause is called with true when the VM pauses and false when it
	// resumes.
	OnPause func(paused bool)
	// OnCtrlAltDel is called on SendCtrlAltDel, after the answer is sent.
	OnCtrlAltDel func()
	// OnVsockReset is called when Firecracker resets the vsock device:
	// when it creates a snapshot (the guest then closes every open vsock
	// connection; its listeners stay).
	OnVsockReset func()
	// RequestLog, when set, receives one JSON Request per line.
	RequestLog io.Writer
}

// VMConfig is what the fake was configured with, in the spec's JSON shapes.
type VMConfig struct {
	MachineConfig map[string]any            `json:"machine-config"`
	BootSource    map[string]any            `json:"boot-source,omitempty"`
	Drives        map[string]map[string]any `json:"drives,omitempty"`
	Vsock         map[string]any            `json:"vsock,omitempty"`
	Net           map[string]map[string]any `json:"network-interfaces,omitempty"`
	Logger        map[string]any            `json:"logger,omitempty"`
	Metrics       map[string]any            `json:"metrics,omitempty"`
}

// VsockPath is the host path of the vsock device's socket, or "".
func (c VMConfig) VsockPath() string {
	s, _ := c.Vsock["uds_path"].(string)
	return s
}

// Request is one request the fake received and how it answered.
type Request struct {
	Method string          `json:"method"`
	Path   string          `json:"path"`
	Body   json.RawMessage `json:"body,omitempty"`
	Status int             `json:"status"`
	Fault  string          `json:"fault,omitempty"`
}

// Server is the fake API. It is an http.Handler.
type Server struct {
	opts Options

	mu       sync.Mutex
	state    string
	cfg      VMConfig
	touched  bool           // something other than logger/metrics was configured
	mmds     map[string]any // the MMDS data store; nil until a PUT /mmds
	requests []Request
}

// New returns a fake in the "Not started" state.
func New(opts Options) (*Server, error) {
	if opts.Spec == nil {
		return nil, errors.New("fcfake: Options.Spec is required")
	}
	if opts.ID == "" {
		opts.ID = "anonymous-instance"
	}
	return &Server{opts: opts, state: StateNotStarted, cfg: defaultConfig()}, nil
}

func defaultConfig() VMConfig {
	return VMConfig{
		MachineConfig: map[string]any{"vcpu_count": 1, "mem_size_mib": 128, "smt": false, "track_dirty_pages": false},
		Drives:        map[string]map[string]any{},
		Net:           map[string]map[string]any{},
	}
}

// State returns the instance state.
func (s *Server) State() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state
}

// Config returns a copy of the configuration.
func (s *Server) Config() VMConfig {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cfg
}

// Requests returns every request so far.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.requests)
}

// host maps a path the VMM was given to the host's view.
func (s *Server) host(p string) string {
	if s.opts.Root != "" && filepath.IsAbs(p) {
		return filepath.Join(s.opts.Root, p)
	}
	return p
}

// fault is a 400 answer.
type fault struct{ msg string }

func (f fault) Error() string { return f.msg }

func faultf(format string, args ...any) error { return fault{fmt.Sprintf(format, args...)} }

// ServeHTTP validates, applies and records one request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	rec := Request{Method: r.Method, Path: r.URL.Path}
	if json.Valid(body) {
		rec.Body = body
	}
	status, out, after := s.handle(r, body)
	rec.Status = status
	if f, ok := out.(map[string]string); ok {
		rec.Fault = f["fault_message"]
	}
	s.mu.Lock()
	s.requests = append(s.requests, rec)
	s.mu.Unlock()
	if s.opts.RequestLog != nil {
		line, _ := json.Marshal(rec)
		s.opts.RequestLog.Write(append(line, '\n'))
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	if out != nil {
		json.NewEncoder(w).Encode(out)
	}
	if after != nil {
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		go after()
	}
}

// handle returns the status, the body to send and an optional action to
// run once the answer is out.
func (s *Server) handle(r *http.Request, body []byte) (int, any, func()) {
	route, params, err := s.opts.Spec.Validate(r, body)
	if err != nil {
		return http.StatusBadRequest, faultBody(err.Error()), nil
	}
	key := r.Method + " " + r.URL.Path
	if msg, ok := s.opts.Fail[key]; ok {
		return http.StatusBadRequest, faultBody(msg), nil
	}
	var in map[string]any
	if len(body) > 0 {
		if err := json.Unmarshal(body, &in); err != nil {
			return http.StatusBadRequest, faultBody(err.Error()), nil
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.Method == http.MethodGet {
		out := s.get(route.Path)
		// The fake's answers must match the spec too.
		b, _ := json.Marshal(out)
		if err := s.opts.Spec.ValidateResponse(r, route, params, http.StatusOK, b); err != nil {
			return http.StatusInternalServerError, faultBody("fcfake answered against the spec: " + oneLine(err.Error())), nil
		}
		return http.StatusOK, out, nil
	}
	after, err := s.apply(r.Method, route, params, in)
	if err != nil {
		var f fault
		if errors.As(err, &f) {
			return http.StatusBadRequest, faultBody(f.msg), nil
		}
		return http.StatusInternalServerError, faultBody(err.Error()), nil
	}
	return http.StatusNoContent, nil, after
}

// mergePatch applies an RFC 7396 JSON merge patch, as Firecracker does
// for PATCH /mmds: null removes a key, objects merge, anything else
// replaces.
func mergePatch(dst, patch map[string]any) {
	for k, v := range patch {
		switch pv := v.(type) {
		case nil:
			delete(dst, k)
		case map[string]any:
			d, ok := dst[k].(map[string]any)
			if !ok {
				d = map[string]any{}
				dst[k] = d
			}
			mergePatch(d, pv)
		default:
			dst[k] = v
		}
	}
}

func faultBody(msg string) map[string]string { return map[string]string{"fault_message": msg} }

func (s *Server) get(path string) any {
	switch path {
	case "/":
		return map[string]any{"app_name": "Firecracker", "id": s.opts.ID, "state": s.state, "vmm_version": s.opts.Spec.Version}
	case "/version":
		return map[string]any{"firecracker_version": s.opts.Spec.Version}
	case "/machine-config":
		return s.cfg.MachineConfig
	case "/mmds":
		if s.mmds == nil {
			return map[string]any{}
		}
		return s.mmds
	case "/vm/config":
		full := map[string]any{"machine-config": s.cfg.MachineConfig}
		if s.cfg.BootSource != nil {
			full["boot-source"] = s.cfg.BootSource
		}
		drives := []any{}
		for _, k := range slices.Sorted(maps.Keys(s.cfg.Drives)) {
			drives = append(drives, s.cfg.Drives[k])
		}
		full["drives"] = drives
		nets := []any{}
		for _, k := range slices.Sorted(maps.Keys(s.cfg.Net)) {
			nets = append(nets, s.cfg.Net[k])
		}
		full["network-interfaces"] = nets
		if s.cfg.Vsock != nil {
			full["vsock"] = s.cfg.Vsock
		}
		if s.cfg.Logger != nil {
			full["logger"] = s.cfg.Logger
		}
		if s.cfg.Metrics != nil {
			full["metrics"] = s.cfg.Metrics
		}
		return full
	}
	return faultBody("fcfake does not implement GET " + path)
}

// Which operations may run in which phase (Firecracker's docs/api_requests
// and the "Pre-boot only"/"Post-boot only" notes of the spec).
var (
	preBootOnly = map[string]bool{
		"PUT /boot-source": true, "PUT /machine-config": true, "PATCH /machine-config": true,
		"PUT /drives/{drive_id}": true, "PUT /network-interfaces/{iface_id}": true, "PUT /vsock": true,
		"PUT /cpu-config": true, "PUT /balloon": true, "PUT /entropy": true, "PUT /serial": true,
		"PUT /pmem/{id}": true, "PUT /mmds/config": true, "PUT /snapshot/load": true, "PUT /logger": true,
		"PUT /metrics": true, "PUT /hotplug/memory": true,
	}
	postBootOnly = map[string]bool{
		"PATCH /vm": true, "PUT /snapshot/create": true, "PATCH /drives/{drive_id}": true,
		"PATCH /network-interfaces/{iface_id}": true, "PATCH /balloon": true,
		"PATCH /balloon/statistics": true, "PATCH /hotplug/memory": true,
	}
)

func (s *Server) apply(method string, route *routers.Route, params map[string]string, in map[string]any) (func(), error) {
	op := method + " " + route.Path
	started := s.state != StateNotStarted
	if started && preBootOnly[op] {
		return nil, fault{faultPostBoot}
	}
	if !started && postBootOnly[op] {
		return nil, fault{faultPreBoot}
	}
	if op != "PUT /logger" && op != "PUT /metrics" && op != "PUT /actions" && op != "PUT /mmds" && op != "PATCH /mmds" && !strings.HasPrefix(op, "GET") {
		defer func() { s.touched = true }()
	}
	switch op {
	case "PUT /logger":
		if p, ok := in["log_path"].(string); ok {
			if err := s.mustExist(p, "log"); err != nil {
				return nil, err
			}
		}
		s.cfg.Logger = in
	case "PUT /metrics":
		if s.cfg.Metrics != nil {
			return nil, fault{"Reinitialization of metrics not allowed."}
		}
		if err := s.mustExist(in["metrics_path"].(string), "metrics"); err != nil {
			return nil, err
		}
		s.cfg.Metrics = in
	case "PUT /machine-config":
		if in == nil {
			return nil, fault{"Missing machine configuration."}
		}
		mc := map[string]any{"smt": false, "track_dirty_pages": false}
		maps.Copy(mc, in)
		s.cfg.MachineConfig = mc
	case "PATCH /machine-config":
		maps.Copy(s.cfg.MachineConfig, in)
	case "PUT /boot-source":
		if err := s.mustExist(in["kernel_image_path"].(string), "kernel"); err != nil {
			return nil, err
		}
		if p, ok := in["initrd_path"].(string); ok {
			if err := s.mustExist(p, "initrd"); err != nil {
				return nil, err
			}
		}
		s.cfg.BootSource = in
	case "PUT /drives/{drive_id}":
		if in["drive_id"] != params["drive_id"] {
			return nil, fault{"The id from the path does not match the id from the body!"}
		}
		p, ok := in["path_on_host"].(string)
		if !ok {
			return nil, fault{"Unable to create the block device: path_on_host is required for a virtio-block drive"}
		}
		if err := s.mustExist(p, "block device"); err != nil {
			return nil, err
		}
		if root, _ := in["is_root_device"].(bool); root {
			for id, d := range s.cfg.Drives {
				if r, _ := d["is_root_device"].(bool); r && id != params["drive_id"] {
					return nil, fault{"A root block device already exists!"}
				}
			}
		}
		s.cfg.Drives[params["drive_id"]] = in
	case "PUT /network-interfaces/{iface_id}":
		if in["iface_id"] != params["iface_id"] {
			return nil, fault{"The id from the path does not match the id from the body!"}
		}
		s.cfg.Net[params["iface_id"]] = in
	case "PUT /vsock":
		s.cfg.Vsock = in
	case "PATCH /vm":
		paused := in["state"] == "Paused"
		s.state = StateRunning
		if paused {
			s.state = StatePaused
		}
		if s.opts.OnPause != nil {
			s.opts.OnPause(paused)
		}
	case "PUT /snapshot/create":
		if s.state != StatePaused {
			return nil, fault{"Cannot create a snapshot: the microVM must be paused first."}
		}
		if err := s.writeSnapshot(in); err != nil {
			return nil, err
		}
		if s.cfg.Vsock != nil && s.opts.OnVsockReset != nil {
			s.opts.OnVsockReset()
		}
		return nil, nil
	case "PATCH /drives/{drive_id}":
		d, ok := s.cfg.Drives[params["drive_id"]]
		if !ok {
			return nil, faultf("Unable to patch the block device: drive %s does not exist", params["drive_id"])
		}
		if in["drive_id"] != params["drive_id"] {
			return nil, fault{"The id from the path does not match the id from the body!"}
		}
		if p, ok := in["path_on_host"].(string); ok {
			if err := s.mustExist(p, "block device"); err != nil {
				return nil, err
			}
			d = maps.Clone(d)
			d["path_on_host"] = p
			s.cfg.Drives[params["drive_id"]] = d
		}
	case "PUT /snapshot/load":
		if s.touched {
			return nil, fault{"Loading a microVM snapshot not allowed after configuring boot-specific resources."}
		}
		return s.loadSnapshot(in)
	case "PUT /actions":
		return s.action(in["action_type"].(string))
	case "PUT /mmds":
		// MMDS holds whatever JSON object the guest's user wants, before
		// or after boot.
		s.mmds = in
		if s.mmds == nil {
			s.mmds = map[string]any{}
		}
	case "PATCH /mmds":
		if s.mmds == nil {
			return nil, fault{"The MMDS data store is not initialized."}
		}
		mergePatch(s.mmds, in)
	default:
		return nil, fault{"fcfake does not implement " + op}
	}
	return nil, nil
}

func (s *Server) mustExist(p, what string) error {
	if _, err := os.Stat(s.host(p)); err != nil {
		return faultf("Cannot open the %s file %s: No such file or directory (os error 2)", what, p)
	}
	return nil
}

func (s *Server) action(kind string) (func(), error) {
	switch kind {
	case "InstanceStart":
		if s.state != StateNotStarted {
			return nil, fault{faultPostBoot}
		}
		if s.cfg.BootSource == nil {
			return nil, fault{"Cannot start microvm without kernel configuration."}
		}
		if err := s.startGuest(); err != nil {
			return nil, err
		}
	case "SendCtrlAltDel":
		if s.state == StateNotStarted {
			return nil, fault{faultPreBoot}
		}
		return s.opts.OnCtrlAltDel, nil
	case "FlushMetrics":
		if s.cfg.Metrics == nil {
			return nil, fault{"The metrics system is not initialized."}
		}
	}
	return nil, nil
}

func (s *Server) startGuest() error {
	if s.opts.OnStart != nil {
		cfg := s.cfg
		if p := cfg.VsockPath(); p != "" {
			cfg.Vsock = maps.Clone(cfg.Vsock)
			cfg.Vsock["uds_path"] = s.host(p)
		}
		if err := s.opts.OnStart(cfg); err != nil {
			return faultf("Cannot start the microVM: %v", err)
		}
	}
	s.state = StateRunning
	return nil
}

// snapshotFile is what the fake writes as "microVM state".
type snapshotFile struct {
	Fake    string   `json:"fcfake_snapshot"`
	Version string   `json:"version"`
	Config  VMConfig `json:"config"`
	Taken   string   `json:"taken"`
}

func (s *Server) writeSnapshot(in map[string]any) error {
	b, _ := json.Marshal(snapshotFile{Fake: s.opts.ID, Version: s.opts.Spec.Version, Config: s.cfg, Taken: time.Now().UTC().Format(time.RFC3339Nano)})
	if err := os.WriteFile(s.host(in["snapshot_path"].(string)), b, 0o600); err != nil {
		return faultf("Cannot create the snapshot file: %v", err)
	}
	// The guest memory, as large as the VM's, sparse.
	mem, err := os.Create(s.host(in["mem_file_path"].(string)))
	if err != nil {
		return faultf("Cannot create the memory file: %v", err)
	}
	defer mem.Close()
	mib, _ := s.cfg.MachineConfig["mem_size_mib"].(float64)
	if mib == 0 {
		mib = 128
	}
	return mem.Truncate(int64(mib) << 20)
}

func (s *Server) loadSnapshot(in map[string]any) (func(), error) {
	_, hasFile := in["mem_file_path"]
	_, hasBackend := in["mem_backend"]
	if hasFile == hasBackend {
		return nil, fault{"Exactly one of mem_file_path and mem_backend must be present."}
	}
	memPath, _ := in["mem_file_path"].(string)
	if hasBackend {
		mb := in["mem_backend"].(map[string]any)
		if mb["backend_type"] != "File" {
			return nil, fault{"fcfake only loads File memory backends"}
		}
		memPath = mb["backend_path"].(string)
	}
	if err := s.mustExist(memPath, "memory"); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(s.host(in["snapshot_path"].(string)))
	if err != nil {
		return nil, faultf("Load snapshot error: Cannot open the snapshot file: %v", err)
	}
	var snap snapshotFile
	if err := json.Unmarshal(b, &snap); err != nil || snap.Fake == "" {
		return nil, faultf("Load snapshot error: the snapshot file is not a microVM state")
	}
	// Firecracker re-opens every drive at the path it had when the
	// snapshot was taken.
	for id, d := range snap.Config.Drives {
		if p, ok := d["path_on_host"].(string); ok {
			if err := s.mustExist(p, "block device "+id); err != nil {
				return nil, faultf("Load snapshot error: %v", err)
			}
		}
	}
	logger, metrics := s.cfg.Logger, s.cfg.Metrics
	s.cfg = snap.Config
	s.cfg.Logger, s.cfg.Metrics = logger, metrics
	if s.cfg.Net == nil {
		s.cfg.Net = map[string]map[string]any{}
	}
	if s.cfg.Drives == nil {
		s.cfg.Drives = map[string]map[string]any{}
	}
	if ovs, ok := in["network_overrides"].([]any); ok {
		for _, ov := range ovs {
			o := ov.(map[string]any)
			iface, _ := o["iface_id"].(string)
			n, ok := s.cfg.Net[iface]
			if !ok {
				return nil, faultf("Load snapshot error: the snapshot has no network interface %s to override", iface)
			}
			n = maps.Clone(n)
			n["host_dev_name"] = o["host_dev_name"]
			s.cfg.Net[iface] = n
		}
	}
	if vo, ok := in["vsock_override"].(map[string]any); ok {
		if s.cfg.Vsock == nil {
			return nil, fault{"Cannot override the vsock: the snapshot has no vsock device."}
		}
		s.cfg.Vsock = maps.Clone(s.cfg.Vsock)
		s.cfg.Vsock["uds_path"] = vo["uds_path"]
	}
	if err := s.startGuest(); err != nil {
		return nil, err
	}
	s.state = StatePaused
	if resume, _ := in["resume_vm"].(bool); resume {
		s.state = StateRunning
	}
	if s.opts.OnPause != nil {
		s.opts.OnPause(s.state == StatePaused)
	}
	return nil, nil
}
