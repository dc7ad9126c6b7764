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
