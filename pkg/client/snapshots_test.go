package client_test

import (
	"context"
	"encoding/json"
	"net/http"
	"testing"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/api/wire"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// TestSnapshotRequests: the Snapshots methods send the routes, queries
// and bodies of openapi.yaml, and a clone's zero size is left to the
// server.
func TestSnapshotRequests(t *testing.T) {
	ctx := context.Background()
	taskID := uuid.NewString()
	var got []string
	var bodies []map[string]any
	c := serve(t, func(w http.ResponseWriter, r *http.Request) {
		got = append(got, r.Method+" "+r.URL.EscapedPath()+"?"+r.URL.RawQuery)
		var body map[string]any
		_ = json.NewDecoder(r.Body).Decode(&body)
		bodies = append(bodies, body)
		switch {
		case r.URL.Path == "/v1/snapshots/missing":
			writeError(w, http.StatusNotFound, wire.CodeNotFound, `no snapshot named "missing"`)
		case r.Method == http.MethodGet && r.URL.Path == "/v1/snapshots":
			writeJSON(w, http.StatusOK, wire.SnapshotList{Snapshots: []*types.Snapshot{{Name: "a", Kind: types.KindTemplate}}})
		case r.Method == http.MethodGet:
			writeJSON(w, http.StatusOK, types.Snapshot{Name: "a b", Kind: types.KindSnapshot})
		case r.URL.Path == "/v1/vms":
			writeJSON(w, http.StatusAccepted, types.VM{ID: taskID})
		default:
			writeJSON(w, http.StatusAccepted, types.Task{ID: taskID})
		}
	})
	vm := uuid.NewString()
	for _, call := range []func() (uuid.UUID, error){
		func() (uuid.UUID, error) { return c.PauseVMTask(ctx, vm) },
		func() (uuid.UUID, error) { return c.ResumeVMTask(ctx, vm) },
		func() (uuid.UUID, error) { return c.SuspendVMTask(ctx, vm) },
		func() (uuid.UUID, error) { return c.SnapshotVMTask(ctx, vm, "s1") },
		func() (uuid.UUID, error) {
			return c.CreateTemplateTask(ctx, service.TemplateOptions{Name: "t1", Setup: "make", Tools: []string{"node@22"}})
		},
		func() (uuid.UUID, error) { return c.DeleteSnapshotTask(ctx, types.KindTemplate, "t1") },
		func() (uuid.UUID, error) {
			return c.CreateVMTaskWithOptions(ctx, service.CreateVMOptions{Name: "clone", Template: "t1"})
		},
	} {
		id, err := call()
		require.NoError(t, err)
		require.Equal(t, taskID, id.String())
	}
	list, err := c.ListSnapshots(ctx, "")
	require.NoError(t, err)
	require.Len(t, list, 1)
	_, err = c.ListSnapshots(ctx, types.KindTemplate)
	require.NoError(t, err)
	sn, err := c.GetSnapshot(ctx, types.KindSnapshot, "a b")
	require.NoError(t, err)
	require.Equal(t, "a b", sn.Name)

	require.Equal(t, []string{
		"POST /v1/vms/" + vm + "/pause?",
		"POST /v1/vms/" + vm + "/resume?",
		"POST /v1/vms/" + vm + "/suspend?",
		"POST /v1/vms/" + vm + "/snapshots?",
		"POST /v1/templates?",
		"DELETE /v1/snapshots/t1?kind=template",
		"POST /v1/vms?",
		"GET /v1/snapshots?",
		"GET /v1/snapshots?kind=template",
		"GET /v1/snapshots/a%20b?kind=snapshot",
	}, got)
	require.Equal(t, map[string]any{"name": "s1"}, bodies[3])
	require.Equal(t, map[string]any{"name": "t1", "setup": "make", "tools": []any{"node@22"}}, bodies[4])
	require.Equal(t, map[string]any{"name": "clone", "template": "t1"}, bodies[6])

	// A missing snapshot is invalid input and not found, as from the
	// local service.
	_, err = c.GetSnapshot(ctx, types.KindSnapshot, "missing")
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorIs(t, err, types.ErrNotFound)
	require.EqualError(t, err, `no snapshot named "missing"`)
	_, err = c.DeleteSnapshotTask(ctx, types.KindSnapshot, "missing")
	require.ErrorIs(t, err, types.ErrInvalid)
	for _, bad := range []string{"", "a/b"} {
		_, err = c.GetSnapshot(ctx, types.KindTemplate, bad)
		require.ErrorIs(t, err, types.ErrInvalid)
		require.ErrorIs(t, err, types.ErrNotFound)
		require.Contains(t, err.Error(), "no template named")
	}
	require.Len(t, got, 12, "nothing sent for a name no snapshot can have")
}
