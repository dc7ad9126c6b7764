package firecracker_test

import (
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm/firecracker"
	"github.com/aetherium/aetherium-core/pkg/vmm/firecracker/fcfake"
)

// requireFault checks that err is Firecracker's 400 carrying a
// fault_message that contains want.
func requireFault(t *testing.T, err error, want string) {
	t.Helper()
	require.Error(t, err)
	var apiErr *firecracker.APIError
	require.ErrorAs(t, err, &apiErr)
	require.Equal(t, http.StatusBadRequest, apiErr.StatusCode, err.Error())
	require.Contains(t, apiErr.FaultMessage, want)
	require.Contains(t, err.Error(), apiErr.FaultMessage, "the fault_message must be part of our error")
	require.ErrorIs(t, err, types.ErrInvalid)
}

// TestSpecRejects: the fake turns requests the spec forbids into 400s with
// a fault_message, because of the spec's schemas (nothing is hand-coded
// for these cases).
func TestSpecRejects(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name         string
		method, path string
		body         any
		want         string
	}{
		{"vcpu_count 0", http.MethodPut, "/machine-config", firecracker.MachineConfig{VCPUCount: 0, MemSizeMiB: 128}, "vcpu_count"},
		{"vcpu_count 33", http.MethodPut, "/machine-config", firecracker.MachineConfig{VCPUCount: 33, MemSizeMiB: 128}, "vcpu_count"},
		{"vcpu_count a string", http.MethodPut, "/machine-config", map[string]any{"vcpu_count": "two", "mem_size_mib": 128}, "vcpu_count"},
		{"mem_size_mib missing", http.MethodPut, "/machine-config", map[string]any{"vcpu_count": 1}, "mem_size_mib"},
		{"kernel path missing", http.MethodPut, "/boot-source", map[string]any{"boot_args": "x"}, "kernel_image_path"},
		{"unknown action", http.MethodPut, "/actions", map[string]any{"action_type": "Reboot"}, "action_type"},
		{"guest cid 2", http.MethodPut, "/vsock", firecracker.Vsock{GuestCID: 2, UDSPath: "/tmp/v.sock"}, "guest_cid"},
		{"bad vm state", http.MethodPatch, "/vm", map[string]any{"state": "Stopped"}, "state"},
		{"drive without is_root_device", http.MethodPut, "/drives/rootfs", map[string]any{"drive_id": "rootfs", "path_on_host": "/x"}, "is_root_device"},
		{"unknown path", http.MethodPut, "/reboot", map[string]any{}, "Invalid request method and/or path"},
		// Firecracker decodes bodies with deny_unknown_fields: a misspelt
		// field is refused, also inside a nested object.
		{"misspelt field", http.MethodPut, "/machine-config", map[string]any{"vcpu_cout": 2, "vcpu_count": 1, "mem_size_mib": 128}, "vcpu_cout"},
		{"unknown nested field", http.MethodPut, "/drives/rootfs", map[string]any{"drive_id": "rootfs", "path_on_host": "/x", "is_root_device": true, "rate_limiter": map[string]any{"bandwidth": map[string]any{"size": 1, "refill_time": 1, "burst": 1}}}, "burst"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv, c := serveFake(t, fcfake.Options{})
			err := c.Do(t.Context(), tc.method, tc.path, tc.body, nil)
			requireFault(t, err, tc.want)
			t.Log(err)
			reqs := srv.Requests()
			require.Len(t, reqs, 1)
			require.Equal(t, http.StatusBadRequest, reqs[0].Status)
		})
	}
}

// TestMMDSTakesArbitraryJSON: MMDS is the one body Firecracker does not
// decode into a fixed shape, so unknown keys pass there.
func TestMMDSTakesArbitraryJSON(t *testing.T) {
	t.Parallel()
	srv, c := serveFake(t, fcfake.Options{})
	body := map[string]any{"latest": map[string]any{"meta-data": map[string]any{"anything": "goes", "n": 1}}}
	require.NoError(t, c.Do(t.Context(), http.MethodPut, "/mmds", body, nil))
	require.NoError(t, c.Do(t.Context(), http.MethodPatch, "/mmds", map[string]any{"other": []any{1, "x"}}, nil))
	var got map[string]any
	require.NoError(t, c.Do(t.Context(), http.MethodGet, "/mmds", nil, &got))
	require.Equal(t, "goes", got["latest"].(map[string]any)["meta-data"].(map[string]any)["anything"])
	require.Equal(t, []any{float64(1), "x"}, got["other"])
	for _, r := range srv.Requests() {
		require.Less(t, r.Status, 300, "%s %s", r.Method, r.Path)
	}
}

// TestVCPUZeroRejected is the named case, through the typed client.
func TestVCPUZeroRejected(t *testing.T) {
	t.Parallel()
	srv, c := serveFake(t, fcfake.Options{})
	err := c.PutMachineConfig(t.Context(), firecracker.MachineConfig{VCPUCount: 0, MemSizeMiB: 256})
	requireFault(t, err, "vcpu_count")
	require.Contains(t, err.Error(), "must be at least 1", "the spec's constraint should be named")
	mc, err := c.GetMachineConfig(t.Context())
	require.NoError(t, err)
	require.Equal(t, 1, mc.VCPUCount, "a rejected PUT must not change the configuration")
	require.Equal(t, 128, mc.MemSizeMiB)
	require.Equal(t, fcfake.StateNotStarted, srv.State())
}

// TestBootOrdering: pre-boot-only calls fail after InstanceStart, post-boot
// ones before it, as Firecracker's docs say.
func TestBootOrdering(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinux")
	require.NoError(t, os.WriteFile(kernel, []byte("k"), 0o644))
	_, c := serveFake(t, fcfake.Options{})
	ctx := t.Context()

	requireFault(t, c.PatchVM(ctx, "Paused"), "not supported before starting")
	requireFault(t, c.Action(ctx, firecracker.ActionSendCtrlAltDel), "not supported before starting")
	requireFault(t, c.Action(ctx, firecracker.ActionInstanceStart), "without kernel configuration")
	requireFault(t, c.PutBootSource(ctx, firecracker.BootSource{KernelImagePath: filepath.Join(dir, "missing")}), "No such file")
	requireFault(t, c.PutDrive(ctx, firecracker.Drive{DriveID: "rootfs", PathOnHost: filepath.Join(dir, "missing"), IsRootDevice: true}), "No such file")
	requireFault(t, c.Do(ctx, http.MethodPut, "/drives/a", firecracker.Drive{DriveID: "b", PathOnHost: kernel}, nil), "does not match")

	require.NoError(t, c.PutMachineConfig(ctx, firecracker.MachineConfig{VCPUCount: 2, MemSizeMiB: 256}))
	require.NoError(t, c.PutBootSource(ctx, firecracker.BootSource{KernelImagePath: kernel, BootArgs: "console=ttyS0"}))
	require.NoError(t, c.Action(ctx, firecracker.ActionInstanceStart))
	info, err := c.Describe(ctx)
	require.NoError(t, err)
	require.Equal(t, firecracker.InstanceRunning, info.State)

	requireFault(t, c.PutBootSource(ctx, firecracker.BootSource{KernelImagePath: kernel}), "not supported after starting")
	requireFault(t, c.PutMachineConfig(ctx, firecracker.MachineConfig{VCPUCount: 1, MemSizeMiB: 128}), "not supported after starting")
	requireFault(t, c.Action(ctx, firecracker.ActionInstanceStart), "not supported after starting")
	requireFault(t, c.LoadSnapshot(ctx, firecracker.SnapshotLoadParams{SnapshotPath: "/x", MemBackend: &firecracker.MemoryBackend{BackendType: "File", BackendPath: "/y"}}), "not supported after starting")
	mc, err := c.GetMachineConfig(ctx)
	require.NoError(t, err)
	require.Equal(t, 2, mc.VCPUCount)
	v, err := c.Version(ctx)
	require.NoError(t, err)
	require.Equal(t, "1.16.1", v)
}

// TestPauseSnapshotAPI: pause, resume, snapshot create and load go through
// the spec and the fake's state rules.
func TestPauseSnapshotAPI(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinux")
	require.NoError(t, os.WriteFile(kernel, []byte("k"), 0o644))
	srv, c := serveFake(t, fcfake.Options{})
	ctx := t.Context()
	require.NoError(t, c.PutMachineConfig(ctx, firecracker.MachineConfig{VCPUCount: 1, MemSizeMiB: 64}))
	require.NoError(t, c.PutBootSource(ctx, firecracker.BootSource{KernelImagePath: kernel}))
	require.NoError(t, c.PutVsock(ctx, firecracker.Vsock{GuestCID: 3, UDSPath: filepath.Join(dir, "v.sock")}))
	require.NoError(t, c.Action(ctx, firecracker.ActionInstanceStart))

	snap := firecracker.SnapshotCreateParams{SnapshotPath: filepath.Join(dir, "vm.state"), MemFilePath: filepath.Join(dir, "vm.mem"), SnapshotType: "Full"}
	requireFault(t, c.CreateSnapshot(ctx, snap), "paused")
	requireFault(t, c.Do(ctx, http.MethodPut, "/snapshot/create", map[string]any{"snapshot_path": "/x", "snapshot_type": "Full"}, nil), "mem_file_path")
	require.NoError(t, c.PatchVM(ctx, "Paused"))
	require.Equal(t, fcfake.StatePaused, srv.State())
	require.NoError(t, c.CreateSnapshot(ctx, snap))
	fi, err := os.Stat(snap.MemFilePath)
	require.NoError(t, err)
	require.Equal(t, int64(64<<20), fi.Size(), "the memory file holds the guest's memory")
	require.NoError(t, c.PatchVM(ctx, "Resumed"))
	require.Equal(t, fcfake.StateRunning, srv.State())

	// A fresh process loads it; one that was configured refuses.
	fresh, c2 := serveFake(t, fcfake.Options{})
	load := firecracker.SnapshotLoadParams{
		SnapshotPath:  snap.SnapshotPath,
		MemBackend:    &firecracker.MemoryBackend{BackendType: "File", BackendPath: snap.MemFilePath},
		VsockOverride: &firecracker.VsockOverride{UDSPath: filepath.Join(dir, "v2.sock")},
	}
	requireFault(t, c2.Do(ctx, http.MethodPut, "/snapshot/load", map[string]any{"snapshot_path": snap.SnapshotPath, "mem_backend": map[string]any{"backend_type": "Disk", "backend_path": "/x"}}, nil), "backend_type")
	require.NoError(t, c2.LoadSnapshot(ctx, load))
	require.Equal(t, fcfake.StatePaused, fresh.State())
	require.Equal(t, filepath.Join(dir, "v2.sock"), fresh.Config().VsockPath())
	require.Equal(t, 64.0, fresh.Config().MachineConfig["mem_size_mib"])

	_, c3 := serveFake(t, fcfake.Options{})
	require.NoError(t, c3.PutMachineConfig(ctx, firecracker.MachineConfig{VCPUCount: 1, MemSizeMiB: 64}))
	requireFault(t, c3.LoadSnapshot(ctx, load), "not allowed after configuring")
}
