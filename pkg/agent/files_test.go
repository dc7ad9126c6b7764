package agent

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
)

func TestFileRoundTrip(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	big := bytes.Repeat([]byte("0123456789abcdef"), 10_000) // several chunks
	tests := []struct {
		name    string
		path    string
		mode    os.FileMode
		content []byte
		want    os.FileMode
	}{
		{name: "multi-chunk", path: filepath.Join(dir, "big"), mode: 0o600, content: big, want: 0o600},
		{name: "empty", path: filepath.Join(dir, "empty"), mode: 0o640, want: 0o640},
		{name: "default mode", path: filepath.Join(dir, "default"), content: []byte("x"), want: 0o644},
		{name: "makes parents", path: filepath.Join(dir, "a", "b", "c"), mode: 0o755, content: []byte("#!/bin/sh\n"), want: 0o755},
		{name: "overwrites and re-modes", path: filepath.Join(dir, "big"), mode: 0o644, content: []byte("short"), want: 0o644},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n, err := c.WriteFile(t.Context(), tt.path, tt.mode, bytes.NewReader(tt.content))
			require.NoError(t, err)
			require.EqualValues(t, len(tt.content), n)
			fi, err := os.Stat(tt.path)
			require.NoError(t, err)
			require.Equal(t, tt.want, fi.Mode().Perm())

			got, err := c.ReadFile(t.Context(), tt.path, 0)
			require.NoError(t, err)
			require.Equal(t, len(tt.content), len(got))
			require.True(t, bytes.Equal(tt.content, got))
		})
	}
}

func TestFileErrors(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	file := filepath.Join(dir, "f")
	require.NoError(t, os.WriteFile(file, []byte("0123456789"), 0o644))

	t.Run("read", func(t *testing.T) {
		tests := []struct {
			name string
			path string
			max  int64
			kind error
			msg  string
		}{
			{name: "missing", path: filepath.Join(dir, "nosuch"), kind: types.ErrNotFound},
			{name: "too big", path: file, max: 5, kind: types.ErrInvalid, msg: "10 bytes"},
			{name: "unknown size too big", path: "/proc/self/status", max: 5, kind: types.ErrInvalid, msg: "more than 5"},
			{name: "directory", path: dir, kind: types.ErrInvalid, msg: "directory"},
			{name: "relative", path: "etc/passwd", kind: types.ErrInvalid, msg: "absolute"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				_, err := c.ReadFile(t.Context(), tt.path, tt.max)
				require.ErrorIs(t, err, tt.kind)
				require.ErrorContains(t, err, tt.msg)
			})
		}
		got, err := c.ReadFile(t.Context(), file, 10)
		require.NoError(t, err, "a file of exactly max_bytes is fine")
		require.Equal(t, "0123456789", string(got))
	})

	t.Run("write", func(t *testing.T) {
		tests := []struct {
			name string
			path string
			kind error
			msg  string
		}{
			{name: "relative", path: "tmp/x", kind: types.ErrInvalid, msg: "absolute"},
			{name: "onto a directory", path: dir, kind: types.ErrInvalid, msg: "is a directory"},
			{name: "below a file", path: filepath.Join(file, "x"), kind: types.ErrInvalid, msg: "not a directory"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				_, err := c.WriteFile(t.Context(), tt.path, 0o644, strings.NewReader("data"))
				require.ErrorIs(t, err, tt.kind)
				require.ErrorContains(t, err, tt.msg)
			})
		}
	})
}
