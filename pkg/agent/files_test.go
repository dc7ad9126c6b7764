package agent

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
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
			n, err := c.WriteFile(t.Context(), tt.path, bytes.NewReader(tt.content), types.FileOptions{Mode: uint32(tt.mode), MakeParents: true})
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
			name    string
			path    string
			parents bool
			user    string
			kind    error
			msg     string
		}{
			{name: "relative", path: "tmp/x", kind: types.ErrInvalid, msg: "absolute"},
			{name: "onto a directory", path: dir, kind: types.ErrInvalid, msg: "is a directory"},
			{name: "below a file", path: filepath.Join(file, "x"), kind: types.ErrInvalid, msg: "not a directory"},
			{name: "below a file with parents", path: filepath.Join(file, "x", "y"), parents: true, kind: types.ErrInvalid, msg: "not a directory"},
			{name: "missing directory", path: filepath.Join(dir, "nodir", "x"), kind: types.ErrNotFound, msg: "directory " + filepath.Join(dir, "nodir") + " does not exist"},
			{name: "unknown user", path: filepath.Join(dir, "u"), user: "no-such-user-here", kind: types.ErrInvalid, msg: `user "no-such-user-here"`},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				_, err := c.WriteFile(t.Context(), tt.path, strings.NewReader("data"), types.FileOptions{Mode: 0o644, MakeParents: tt.parents, User: tt.user})
				require.ErrorIs(t, err, tt.kind)
				require.ErrorContains(t, err, tt.msg)
			})
		}
	})
}

func TestWriteFileOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Skip(t, "chown in the guest needs root; run the tests as root")
	}
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	tests := []struct {
		name     string
		user     string
		path     string
		made     []string // directories the call creates
		uid, gid uint32
	}{
		{name: "by name", user: "nobody", path: filepath.Join(dir, "a", "b", "f"), made: []string{filepath.Join(dir, "a"), filepath.Join(dir, "a", "b")}, uid: 65534, gid: 65534},
		{name: "by uid without passwd entry", user: "4321", path: filepath.Join(dir, "c", "f"), made: []string{filepath.Join(dir, "c")}, uid: 4321, gid: 0},
		{name: "default is the agent's user", path: filepath.Join(dir, "d", "f"), made: []string{filepath.Join(dir, "d")}, uid: 0, gid: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := c.WriteFile(t.Context(), tt.path, strings.NewReader("x"), types.FileOptions{User: tt.user, MakeParents: true})
			require.NoError(t, err)
			for _, p := range append(tt.made, tt.path) {
				fi, err := os.Stat(p)
				require.NoError(t, err)
				st := fi.Sys().(*syscall.Stat_t)
				require.Equal(t, [2]uint32{tt.uid, tt.gid}, [2]uint32{st.Uid, st.Gid}, p)
			}
			fi, err := os.Stat(dir)
			require.NoError(t, err)
			require.Zero(t, fi.Sys().(*syscall.Stat_t).Uid, "directories that existed keep their owner")
		})
	}
}

// countingWriter records how many writes reached it.
type countingWriter struct {
	writes int
	bytes.Buffer
}

func (w *countingWriter) Write(p []byte) (int, error) {
	w.writes++
	return w.Buffer.Write(p)
}

func TestReadFileTo(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	big := bytes.Repeat([]byte{0, 1, 2, 0xff}, 200_000) // several chunks, NUL bytes
	file := filepath.Join(dir, "big")
	require.NoError(t, os.WriteFile(file, big, 0o644))
	tests := []struct {
		name   string
		path   string
		max    int64
		want   []byte
		kind   error
		writes bool // whether w may have been written to
	}{
		{name: "whole file", path: file, want: big},
		{name: "exactly max", path: file, max: int64(len(big)), want: big},
		{name: "missing", path: filepath.Join(dir, "nosuch"), kind: types.ErrNotFound},
		{name: "too big", path: file, max: 10, kind: types.ErrInvalid},
		{name: "directory", path: dir, kind: types.ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var w countingWriter
			n, err := c.ReadFileTo(t.Context(), tt.path, &w, tt.max)
			if tt.kind != nil {
				require.ErrorIs(t, err, tt.kind)
				require.Zero(t, w.writes, "nothing is written when the file cannot be read")
				return
			}
			require.NoError(t, err)
			require.EqualValues(t, len(tt.want), n)
			require.Greater(t, w.writes, 1, "the content arrives in chunks")
			require.True(t, bytes.Equal(tt.want, w.Bytes()))
		})
	}
}
