package client

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/api/wire"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

var _ service.Snapshots = (*Client)(nil)

func (c *Client) PauseVMTask(ctx context.Context, vmID string) (uuid.UUID, error) {
	return c.taskCall(ctx, http.MethodPost, vmPath(vmID, "pause"), nil)
}

func (c *Client) ResumeVMTask(ctx context.Context, vmID string) (uuid.UUID, error) {
	return c.taskCall(ctx, http.MethodPost, vmPath(vmID, "resume"), nil)
}

func (c *Client) SuspendVMTask(ctx context.Context, vmID string) (uuid.UUID, error) {
	return c.taskCall(ctx, http.MethodPost, vmPath(vmID, "suspend"), nil)
}

func (c *Client) SnapshotVMTask(ctx context.Context, vmID, name string) (uuid.UUID, error) {
	return c.taskCall(ctx, http.MethodPost, vmPath(vmID, "snapshots"), wire.SnapshotRequest{Name: name})
}

// CreateTemplateTask: vcpus and memory left zero take the API's defaults.
func (c *Client) CreateTemplateTask(ctx context.Context, o service.TemplateOptions) (uuid.UUID, error) {
	return c.taskCall(ctx, http.MethodPost, "/v1/templates", wire.TemplateRequest{Name: o.Name, VCPUs: o.VCPUs,
		MemoryMB: o.MemoryMB, Network: o.Network, Tools: o.Tools, Setup: o.Setup, Env: o.Env})
}

// kindQuery is the ?kind= of kind ("" for none).
func kindQuery(kind types.SnapshotKind) url.Values {
	if kind == "" {
		return nil
	}
	return url.Values{"kind": {string(kind)}}
}

func (c *Client) ListSnapshots(ctx context.Context, kind types.SnapshotKind) ([]*types.Snapshot, error) {
	var out wire.SnapshotList
	if err := c.doJSON(ctx, http.MethodGet, "/v1/snapshots", kindQuery(kind), nil, &out); err != nil {
		return nil, err
	}
	return out.Snapshots, nil
}

// snapshotPath is the path of the snapshot or template nameOrID (the
// request escapes it). A name no snapshot can have, empty or holding a
// '/', is refused as the service refuses an unknown one.
func snapshotPath(kind types.SnapshotKind, nameOrID string) (string, error) {
	if nameOrID == "" || strings.Contains(nameOrID, "/") {
		kind = cmp.Or(kind, types.KindSnapshot)
		return "", fmt.Errorf("%w: no %s named %q; list them with `aether-cli %s list` (%w)", types.ErrInvalid, kind, nameOrID, kind, types.ErrNotFound)
	}
	return "/v1/snapshots/" + nameOrID, nil
}

// GetSnapshot: kind "" means a snapshot, as the API's default.
func (c *Client) GetSnapshot(ctx context.Context, kind types.SnapshotKind, nameOrID string) (*types.Snapshot, error) {
	path, err := snapshotPath(kind, nameOrID)
	if err != nil {
		return nil, err
	}
	var sn types.Snapshot
	if err := c.doJSON(ctx, http.MethodGet, path, kindQuery(kind), nil, &sn); err != nil {
		return nil, unknownSnapshot(err)
	}
	return &sn, nil
}

// DeleteSnapshotTask: kind "" means a snapshot, as the API's default.
func (c *Client) DeleteSnapshotTask(ctx context.Context, kind types.SnapshotKind, nameOrID string) (uuid.UUID, error) {
	path, err := snapshotPath(kind, nameOrID)
	if err != nil {
		return uuid.Nil, err
	}
	var t types.Task
	if err := c.doJSON(ctx, http.MethodDelete, path, kindQuery(kind), nil, &t); err != nil {
		return uuid.Nil, unknownSnapshot(err)
	}
	return parseUUID("task", t.ID)
}

// unknownSnapshot keeps the service.Snapshots contract: the API answers a
// snapshot its path names but that does not exist with 404, while the
// service reports it as invalid input that is also not found. The error
// wraps both, so errors.Is works for either as with the local service.
func unknownSnapshot(err error) error {
	var ae *Error
	if errors.As(err, &ae) && errors.Is(err, types.ErrNotFound) {
		return &invalidNotFound{ae}
	}
	return err
}

// invalidNotFound is an API not_found error that also wraps
// types.ErrInvalid.
type invalidNotFound struct{ api *Error }

func (e *invalidNotFound) Error() string   { return e.api.Error() }
func (e *invalidNotFound) Unwrap() []error { return []error{e.api, types.ErrInvalid} }
