package agent

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// writeMarker writes v (or raw, when not empty) as dir's tool marker.
func writeMarker(t *testing.T, dir string, v types.ToolVolume, raw string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	b := []byte(raw)
	if raw == "" {
		var err error
		b, err = json.Marshal(v)
		require.NoError(t, err)
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, types.ToolMarkerFile), b, 0o644))
}

func TestReadToolMarker(t *testing.T) {
	const root = "/opt/aetherium/tools"
	good := types.ToolVolume{
		Key: "http-hello-1.0.0-1a2b3c4d", Spec: "http:hello@1.0.0", Dir: root + "/http-hello-1.0.0-1a2b3c4d",
		Image: "/host/cache/images/x.ext4", BinPaths: []string{root + "/http-hello-1.0.0-1a2b3c4d/bin"},
	}
	with := func(f func(*types.ToolVolume)) types.ToolVolume {
		v := good
		v.BinPaths = append([]string(nil), good.BinPaths...)
		f(&v)
		return v
	}
	tests := []struct {
		name    string
		vol     types.ToolVolume
		raw     string
		wantErr string
	}{
		{name: "good", vol: good},
		{name: "dir elsewhere", vol: with(func(v *types.ToolVolume) { v.Dir = "/usr/local/x" }), wantErr: "must be " + good.Dir},
		{name: "key with slash", vol: with(func(v *types.ToolVolume) { v.Key = "a/b"; v.Dir = root + "/a/b" }), wantErr: "not a valid directory name"},
		{name: "dot key", vol: with(func(v *types.ToolVolume) { v.Key = ".."; v.Dir = root }), wantErr: "not a valid directory name"},
		{name: "bin path outside", vol: with(func(v *types.ToolVolume) { v.BinPaths = []string{"/usr/bin"} }), wantErr: "outside"},
		{name: "bin path escaping", vol: with(func(v *types.ToolVolume) { v.BinPaths = []string{good.Dir + "/../other/bin"} }), wantErr: "outside"},
		{name: "not json", raw: "#!/bin/sh\n", wantErr: "not JSON"},
		{name: "too large", raw: `{"key":"` + strings.Repeat("x", maxMarkerBytes) + `"}`, wantErr: "larger than"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The marker is read from a staging directory, not from Dir.
			dir := t.TempDir()
			writeMarker(t, dir, tt.vol, tt.raw)
			got, err := ReadToolMarker(dir, root)
			if tt.wantErr != "" {
				require.ErrorIs(t, err, types.ErrInvalid)
				require.ErrorContains(t, err, tt.wantErr)
				require.ErrorContains(t, err, filepath.Join(dir, types.ToolMarkerFile), "the error names the marker")
				return
			}
			require.NoError(t, err)
			want := good
			want.Image = "" // a host path means nothing in the guest
			require.Equal(t, want, got)
		})
	}

	_, err := ReadToolMarker(t.TempDir(), root)
	require.ErrorIs(t, err, os.ErrNotExist)
	dir := t.TempDir()
	writeMarker(t, dir, good, "")
	_, err = ReadToolMarker(dir, "")
	require.ErrorIs(t, err, types.ErrInvalid, "no root, nothing is valid")
}

// makeToolVolume creates volume key under root, holding an executable
// bin/<tool> that prints "<tool> from <key>", and returns it.
func makeToolVolume(t *testing.T, root, key, tool string) types.ToolVolume {
	t.Helper()
	dir := filepath.Join(root, key)
	v := types.ToolVolume{Key: key, Spec: tool + "@1", Dir: dir, BinPaths: []string{filepath.Join(dir, "bin")}}
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "bin"), 0o755))
	script := "#!/bin/sh\necho " + tool + " from " + key + "\n"
	require.NoError(t, os.WriteFile(filepath.Join(dir, "bin", tool), []byte(script), 0o755))
	writeMarker(t, dir, v, "")
	return v
}

func TestToolsOnPath(t *testing.T) {
	root := filepath.Join(t.TempDir(), "tools")
	b := makeToolVolume(t, root, "b-tool-2", "hello")
	a := makeToolVolume(t, root, "a-tool-1", "hello")
	// Not volumes: a marker naming another dir, work in progress, a file.
	writeMarker(t, filepath.Join(root, "c-wrong"), types.ToolVolume{Key: "other", Dir: root + "/other"}, "")
	makeToolVolume(t, filepath.Join(t.TempDir(), "elsewhere"), "x", "x")
	require.NoError(t, os.MkdirAll(filepath.Join(root, ".partial-1"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(root, "stray"), nil, 0o644))

	c, _ := startAgent(t, ServerConfig{ToolsRoot: root})
	want := a.BinPaths[0] + ":" + b.BinPaths[0] + ":" + defaultPath + "\n"

	res, err := c.Exec(t.Context(), sh(`echo "$PATH"`), nil, nil)
	require.NoError(t, err)
	require.Equal(t, want, string(res.Stdout), "volumes in key order, then the default PATH")

	// The first volume by key wins a name both have.
	res, err = c.Exec(t.Context(), types.Command{Cmd: "hello"}, nil, nil)
	require.NoError(t, err)
	require.Equal(t, "hello from a-tool-1\n", string(res.Stdout))

	// Table processes get the same PATH.
	s, err := c.StartProcess(t.Context(), ProcessSpec{Cmd: "sh", Args: []string{"-c", `echo "$PATH"`}})
	require.NoError(t, err)
	require.Equal(t, want, follow(t, s).stdout.String())

	// A request's PATH wins, as it always has.
	res, err = c.Exec(t.Context(), types.Command{Cmd: "sh", Args: []string{"-c", `echo "$PATH"`}, Env: map[string]string{"PATH": "/bin"}}, nil, nil)
	require.NoError(t, err)
	require.Equal(t, "/bin\n", string(res.Stdout))

	// A volume that appears later (the root's mtime changes) is found
	// without being told.
	makeToolVolume(t, root, "0-first", "hello")
	res, err = c.Exec(t.Context(), types.Command{Cmd: "hello"}, nil, nil)
	require.NoError(t, err)
	require.Equal(t, "hello from 0-first\n", string(res.Stdout))
}

func TestToolsRootMissingOrInvalid(t *testing.T) {
	root := filepath.Join(t.TempDir(), "tools")
	c, _ := startAgent(t, ServerConfig{ToolsRoot: root})
	res, err := c.Exec(t.Context(), sh(`echo "$PATH"`), nil, nil)
	require.NoError(t, err)
	require.Equal(t, defaultPath+"\n", string(res.Stdout), "no root yet: the default PATH")

	// The root appears with a volume in it.
	v := makeToolVolume(t, root, "k", "hello")
	res, err = c.Exec(t.Context(), sh(`echo "$PATH"`), nil, nil)
	require.NoError(t, err)
	require.Equal(t, v.BinPaths[0]+":"+defaultPath+"\n", string(res.Stdout))

	for _, bad := range []string{"/", "tools", root + "/../tools"} {
		c, _ := startAgent(t, ServerConfig{ToolsRoot: bad})
		res, err := c.Exec(t.Context(), sh(`echo "$PATH"`), nil, nil)
		require.NoError(t, err)
		require.Equal(t, defaultPath+"\n", string(res.Stdout), "root %q is ignored", bad)
	}
}
