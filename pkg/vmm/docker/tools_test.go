package docker_test

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm/docker"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

// toolSet makes a tool cache on the host as pkg/tools leaves one: under
// /var/cache, like the real cache outside /tmp, so the container's root
// (read-only, without that directory) must get the mount points. Each key
// gets bin/<key-name> printing "hello from <key>" and its marker file.
func toolSet(t *testing.T, keys ...string) *types.ToolSet {
	t.Helper()
	root, err := os.MkdirTemp("/var/cache", "aet-tools-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(root) })
	ts := &types.ToolSet{Root: root}
	for _, k := range keys {
		v := types.ToolVolume{Key: k, Spec: "http:" + k + "@1.0.0", Dir: filepath.Join(root, k)}
		v.BinPaths = []string{filepath.Join(v.Dir, "bin")}
		require.NoError(t, os.MkdirAll(v.BinPaths[0], 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(v.BinPaths[0], "hello"), []byte("#!/bin/sh\necho hello from "+k+"\n"), 0o755))
		marker, err := json.Marshal(v)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(v.Dir, types.ToolMarkerFile), marker, 0o644))
		ts.Volumes = append(ts.Volumes, v)
	}
	return ts
}

// TestTools: a tool set is delivered read-only at its host paths over a
// writable tmpfs at its root, named in the environment, and comes back
// after a stop and start; deleting the VM leaves the host's cache alone.
func TestTools(t *testing.T) {
	t.Parallel()
	o := newOrchestrator(t, config(t))
	ts := toolSet(t, "hello-1.0.0-1a2b3c4d", "other-2.0.0-5e6f7a8b")
	sp := vmmtest.NewSpec(t)
	sp.Tools = ts
	id := vmmtest.StartVM(t, o, sp)
	hello := filepath.Join(ts.Volumes[0].Dir, "bin", "hello")

	check := func(t *testing.T) {
		require.Equal(t, "hello from hello-1.0.0-1a2b3c4d\n", vmmtest.Sh(t, o, id, hello))
		require.Equal(t, "hello from other-2.0.0-5e6f7a8b\n", vmmtest.Sh(t, o, id, filepath.Join(ts.Volumes[1].Dir, "bin", "hello")))
		require.Equal(t, ts.Root+"\n", vmmtest.Sh(t, o, id, "echo $"+types.ToolsRootEnv))
		// By name: the backend leaves PATH to the agent, which puts the
		// volumes' bin directories first, in order.
		res := vmmtest.Exec(t, o, id, types.Command{Cmd: "hello"})
		require.Equal(t, "hello from hello-1.0.0-1a2b3c4d\n", string(res.Stdout), "%s", res.Stderr)
		marker := vmmtest.Sh(t, o, id, "cat "+filepath.Join(ts.Volumes[0].Dir, types.ToolMarkerFile))
		var v types.ToolVolume
		require.NoError(t, json.Unmarshal([]byte(marker), &v))
		require.Equal(t, ts.Volumes[0], v)

		// The volumes are read-only, for commands and for the agent.
		res = vmmtest.Exec(t, o, id, types.Command{Cmd: "sh", Args: []string{"-c", "echo x > " + filepath.Join(ts.Volumes[0].Dir, "x")}})
		require.NotEqual(t, 0, res.ExitCode)
		require.Contains(t, string(res.Stderr), "Read-only file system")
		res = vmmtest.Exec(t, o, id, types.Command{Cmd: "rm", Args: []string{hello}})
		require.NotEqual(t, 0, res.ExitCode, "a tool was removed")
		_, err := o.WriteFile(t.Context(), id, hello, strings.NewReader("#!/bin/sh\necho replaced\n"), types.FileOptions{})
		require.Error(t, err, "the agent overwrote a tool")

		// The root is a tmpfs where new tools can go, and run from.
		added := filepath.Join(ts.Root, "added-1.0.0-00000000", "bin")
		_, err = o.WriteFile(t.Context(), id, filepath.Join(added, "hi"), strings.NewReader("#!/bin/sh\necho added\n"), types.FileOptions{Mode: 0o755, MakeParents: true})
		require.NoError(t, err)
		require.Equal(t, "added\n", vmmtest.Sh(t, o, id, filepath.Join(added, "hi")))
		require.Equal(t, "tmpfs\n", vmmtest.Sh(t, o, id, "awk '$2 == \""+ts.Root+"\" {print $3}' /proc/mounts"))
	}
	t.Run("Running", check)
	require.NoError(t, o.StopVM(t.Context(), id, false))
	require.NoError(t, o.StartVM(t.Context(), id))
	t.Run("Restarted", check)

	// The host's cache is untouched: nothing was written into it and the
	// VM's deletion leaves it.
	require.NoError(t, o.DeleteVM(t.Context(), id))
	b, err := os.ReadFile(hello)
	require.NoError(t, err)
	require.Equal(t, "#!/bin/sh\necho hello from hello-1.0.0-1a2b3c4d\n", string(b))
	entries, err := os.ReadDir(ts.Root)
	require.NoError(t, err)
	require.Len(t, entries, 2, "the tool added in the guest reached the host")
}

// TestToolsInvalid: a tool set the backend cannot deliver is refused
// before anything is created, with what is wrong.
func TestToolsInvalid(t *testing.T) {
	t.Parallel()
	cfg := config(t)
	o := newOrchestrator(t, cfg)
	for _, tc := range []struct {
		name string
		edit func(ts *types.ToolSet)
		msg  string
	}{
		{"missing on the host", func(ts *types.ToolSet) { os.RemoveAll(ts.Volumes[0].Dir) }, "install the tool"},
		{"no marker", func(ts *types.ToolSet) { os.Remove(filepath.Join(ts.Volumes[0].Dir, types.ToolMarkerFile)) }, types.ToolMarkerFile},
		{"dir outside root", func(ts *types.ToolSet) { ts.Volumes[0].Dir = "/elsewhere/k" }, "it must be"},
		{"root hides the agent's sockets", func(ts *types.ToolSet) {
			ts.Root = "/run"
			ts.Volumes[0].Dir, ts.Volumes[0].BinPaths = "/run/k", nil
		}, "would hide /run"},
		{"root hides the agent", func(ts *types.ToolSet) {
			ts.Root = "/usr"
			ts.Volumes[0].Dir, ts.Volumes[0].BinPaths = "/usr/k", nil
		}, "would hide /usr/local/bin"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := toolSet(t, "k")
			tc.edit(ts)
			sp := vmmtest.NewSpec(t)
			sp.Tools = ts
			_, err := o.CreateVM(t.Context(), sp)
			require.ErrorIs(t, err, types.ErrInvalid)
			require.Contains(t, err.Error(), tc.msg)
			_, err = o.GetVMStatus(t.Context(), sp.ID)
			require.ErrorIs(t, err, types.ErrNotFound)
			require.NoDirExists(t, filepath.Join(cfg.SocketDir, sp.ID))
		})
	}
}

// TestToolsAddedLater: with the backend's tools root set, a VM created
// without tools still has a writable tmpfs there, so tools:install can
// stream tools into it through the agent despite the read-only root; a
// VM of a backend without one refuses with the reason.
func TestToolsAddedLater(t *testing.T) {
	t.Parallel()
	ts := toolSet(t, "late-1.0.0-0a0b0c0d")
	v := ts.Volumes[0]
	addTools := func(o *docker.Orchestrator, id string) error {
		c, err := agent.NewClient(func(ctx context.Context) (net.Conn, error) { return o.DialAgent(ctx, id) })
		require.NoError(t, err)
		defer c.Close()
		_, err = c.AddToolsDir(t.Context(), v, ts.Root, v.Dir)
		return err
	}

	cfg := config(t)
	cfg.ToolsRoot = ts.Root
	o := newOrchestrator(t, cfg)
	id := vmmtest.StartVM(t, o, vmmtest.NewSpec(t))
	require.Equal(t, ts.Root+"\n", vmmtest.Sh(t, o, id, "echo $"+types.ToolsRootEnv))
	require.NoError(t, addTools(o, id))
	require.Equal(t, "hello from late-1.0.0-0a0b0c0d\n", vmmtest.Sh(t, o, id, filepath.Join(v.Dir, "bin", "hello")))

	cfg.ToolsRoot = ""
	bare := newOrchestrator(t, cfg)
	id = vmmtest.StartVM(t, bare, vmmtest.NewSpec(t))
	err := addTools(bare, id)
	require.Error(t, err)
	require.Contains(t, err.Error(), "read-only file system")

	cfg.ToolsRoot = "/usr/local"
	_, err = docker.New(t.Context(), cfg)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.Contains(t, err.Error(), "would hide /usr/local/bin")
}
