package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// The request and response bodies of the Firecracker v1.16 API that the
// backend uses, named after the spec's definitions. Optional fields are
// pointers or omitempty so that what is not set is not sent; required ones
// are always sent, even when zero, so that the VMM (or the spec-validating
// fake) judges them.

// MachineConfig is the spec's MachineConfiguration.
type MachineConfig struct {
	VCPUCount       int    `json:"vcpu_count"`
	MemSizeMiB      int    `json:"mem_size_mib"`
	SMT             *bool  `json:"smt,omitempty"`
	TrackDirtyPages bool   `json:"track_dirty_pages,omitempty"`
	HugePages       string `json:"huge_pages,omitempty"`
}

// BootSource is the spec's BootSource.
type BootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	InitrdPath      string `json:"initrd_path,omitempty"`
	BootArgs        string `json:"boot_args,omitempty"`
}

// Drive is the spec's Drive (virtio-block only).
type Drive struct {
	DriveID      string `json:"drive_id"`
	PathOnHost   string `json:"path_on_host"`
	IsRootDevice bool   `json:"is_root_device"`
	IsReadOnly   bool   `json:"is_read_only"`
	CacheType    string `json:"cache_type,omitempty"`
	IOEngine     string `json:"io_engine,omitempty"`
}

// Vsock is the spec's Vsock.
type Vsock struct {
	GuestCID int    `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

// NetworkInterface is the spec's NetworkInterface.
type NetworkInterface struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
	GuestMAC    string `json:"guest_mac,omitempty"`
}

// Logger is the spec's Logger.
type Logger struct {
	LogPath   string `json:"log_path,omitempty"`
	Level     string `json:"level,omitempty"`
	ShowLevel bool   `json:"show_level,omitempty"`
}

// Metrics is the spec's Metrics.
type Metrics struct {
	MetricsPath string `json:"metrics_path"`
}

// InstanceActionInfo is the spec's InstanceActionInfo.
type InstanceActionInfo struct {
	ActionType string `json:"action_type"`
}

// Actions the backend sends.
const (
	ActionInstanceStart  = "InstanceStart"
	ActionSendCtrlAltDel = "SendCtrlAltDel"
	ActionFlushMetrics   = "FlushMetrics"
)

// VMState is the spec's Vm.
type VMState struct {
	State string `json:"state"`
}

// SnapshotCreateParams is the spec's SnapshotCreateParams.
type SnapshotCreateParams struct {
	MemFilePath  string `json:"mem_file_path"`
	SnapshotPath string `json:"snapshot_path"`
	SnapshotType string `json:"snapshot_type,omitempty"`
}

// MemoryBackend is the spec's MemoryBackend.
type MemoryBackend struct {
	BackendType string `json:"backend_type"`
	BackendPath string `json:"backend_path"`
}

// VsockOverride is the spec's VsockOverride.
type VsockOverride struct {
	UDSPath string `json:"uds_path"`
}

// NetworkOverride is the spec's NetworkOverride: the TAP a restored
// interface uses instead of the one it had when the snapshot was taken.
type NetworkOverride struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
}

// SnapshotLoadParams is the spec's SnapshotLoadParams.
type SnapshotLoadParams struct {
	SnapshotPath     string            `json:"snapshot_path"`
	MemBackend       *MemoryBackend    `json:"mem_backend,omitempty"`
	ResumeVM         bool              `json:"resume_vm,omitempty"`
	NetworkOverrides []NetworkOverride `json:"network_overrides,omitempty"`
	VsockOverride    *VsockOverride    `json:"vsock_override,omitempty"`
}

// PartialDrive is the spec's PartialDrive: a post-boot change of a
// drive's backing file.
type PartialDrive struct {
	DriveID    string `json:"drive_id"`
	PathOnHost string `json:"path_on_host,omitempty"`
}

// InstanceInfo is the spec's InstanceInfo, the answer to GET /.
type InstanceInfo struct {
	AppName    string `json:"app_name"`
	ID         string `json:"id"`
	State      string `json:"state"`
	VMMVersion string `json:"vmm_version"`
}

// Instance states of InstanceInfo.
const (
	InstanceNotStarted = "Not started"
	InstanceRunning    = "Running"
	InstancePaused     = "Paused"
)

// APIError is a response of the Firecracker API other than 2xx. A 400 (bad
// input, or an operation in the wrong boot phase) wraps types.ErrInvalid.
type APIError struct {
	Method, Path string
	StatusCode   int
	// FaultMessage is Firecracker's own explanation (the Error definition's
	// fault_message), or the raw body when it sent none.
	FaultMessage string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("firecracker %s %s: %d %s: %s", e.Method, e.Path, e.StatusCode, http.StatusText(e.StatusCode), e.FaultMessage)
}

// Unwrap gives the error its kind.
func (e *APIError) Unwrap() error {
	if e.StatusCode == http.StatusBadRequest {
		return types.ErrInvalid
	}
	return nil
}

// Client is a typed client of one Firecracker process's API socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client of the API served on the unix socket at path.
// It does no I/O.
func NewClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		// Firecracker serves one request at a time; a kept-alive connection
		// saves nothing worth the risk of reusing one it closed.
		DisableKeepAlives: true,
	}
	return &Client{socket: path, http: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

// Do sends one request. body, when not nil, is sent as JSON; out, when not
// nil, receives the JSON answer. Any status other than 2xx is an *APIError.
// Connection errors wrap types.ErrUnavailable.
func (c *Client) Do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return fmt.Errorf("encoding firecracker %s %s: %w", method, path, err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, rd)
	if err != nil {
		return fmt.Errorf("firecracker %s %s: %w", method, path, err)
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("firecracker %s %s: %w", method, path, ctx.Err())
		}
		return fmt.Errorf("%w: firecracker %s %s via %s: %v", types.ErrUnavailable, method, path, c.socket, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("%w: firecracker %s %s: reading the answer: %v", types.ErrUnavailable, method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		apiErr := &APIError{Method: method, Path: path, StatusCode: resp.StatusCode}
		var fault struct {
			FaultMessage string `json:"fault_message"`
		}
		if json.Unmarshal(raw, &fault) == nil && fault.FaultMessage != "" {
			apiErr.FaultMessage = fault.FaultMessage
		} else {
			apiErr.FaultMessage = strings.TrimSpace(string(raw))
		}
		return apiErr
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			return fmt.Errorf("firecracker %s %s: decoding %q: %w", method, path, raw, err)
		}
	}
	return nil
}

// Describe is GET /.
func (c *Client) Describe(ctx context.Context) (*InstanceInfo, error) {
	var info InstanceInfo
	if err := c.Do(ctx, http.MethodGet, "/", nil, &info); err != nil {
		return nil, err
	}
	return &info, nil
}

// Version is GET /version.
func (c *Client) Version(ctx context.Context) (string, error) {
	var v struct {
		Version string `json:"firecracker_version"`
	}
	err := c.Do(ctx, http.MethodGet, "/version", nil, &v)
	return v.Version, err
}

// PutMachineConfig is PUT /machine-config (pre-boot).
func (c *Client) PutMachineConfig(ctx context.Context, m MachineConfig) error {
	return c.Do(ctx, http.MethodPut, "/machine-config", m, nil)
}

// GetMachineConfig is GET /machine-config.
func (c *Client) GetMachineConfig(ctx context.Context) (*MachineConfig, error) {
	var m MachineConfig
	if err := c.Do(ctx, http.MethodGet, "/machine-config", nil, &m); err != nil {
		return nil, err
	}
	return &m, nil
}

// PutBootSource is PUT /boot-source (pre-boot).
func (c *Client) PutBootSource(ctx context.Context, b BootSource) error {
	return c.Do(ctx, http.MethodPut, "/boot-source", b, nil)
}

// PutDrive is PUT /drives/{drive_id} (pre-boot).
func (c *Client) PutDrive(ctx context.Context, d Drive) error {
	return c.Do(ctx, http.MethodPut, "/drives/"+d.DriveID, d, nil)
}

// PatchDrive is PATCH /drives/{drive_id} (post-boot): the drive is
// re-opened on a new backing file.
func (c *Client) PatchDrive(ctx context.Context, d PartialDrive) error {
	return c.Do(ctx, http.MethodPatch, "/drives/"+d.DriveID, d, nil)
}

// PutVsock is PUT /vsock (pre-boot).
func (c *Client) PutVsock(ctx context.Context, v Vsock) error {
	return c.Do(ctx, http.MethodPut, "/vsock", v, nil)
}

// PutNetworkInterface is PUT /network-interfaces/{iface_id} (pre-boot).
func (c *Client) PutNetworkInterface(ctx context.Context, n NetworkInterface) error {
	return c.Do(ctx, http.MethodPut, "/network-interfaces/"+n.IfaceID, n, nil)
}

// PutLogger is PUT /logger.
func (c *Client) PutLogger(ctx context.Context, l Logger) error {
	return c.Do(ctx, http.MethodPut, "/logger", l, nil)
}

// PutMetrics is PUT /metrics.
func (c *Client) PutMetrics(ctx context.Context, m Metrics) error {
	return c.Do(ctx, http.MethodPut, "/metrics", m, nil)
}

// Action is PUT /actions.
func (c *Client) Action(ctx context.Context, actionType string) error {
	return c.Do(ctx, http.MethodPut, "/actions", InstanceActionInfo{ActionType: actionType}, nil)
}

// PatchVM is PATCH /vm: "Paused" or "Resumed" (post-boot).
func (c *Client) PatchVM(ctx context.Context, state string) error {
	return c.Do(ctx, http.MethodPatch, "/vm", VMState{State: state}, nil)
}

// CreateSnapshot is PUT /snapshot/create (post-boot, paused).
func (c *Client) CreateSnapshot(ctx context.Context, p SnapshotCreateParams) error {
	return c.Do(ctx, http.MethodPut, "/snapshot/create", p, nil)
}

// LoadSnapshot is PUT /snapshot/load (on a fresh process only).
func (c *Client) LoadSnapshot(ctx context.Context, p SnapshotLoadParams) error {
	return c.Do(ctx, http.MethodPut, "/snapshot/load", p, nil)
}
