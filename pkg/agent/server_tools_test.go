package agent

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// hostVolume makes the host side of tool volume key: a cache entry dir
// holding an executable bin/hello, a symlink to it, a symlink out of the
// volume, data, an empty and a read-only directory, and a marker, as the
// worker's cache holds them. It returns the volume as the guest gets it
// (Dir under guestRoot) and the host dir.
func hostVolume(t *testing.T, guestRoot, key string) (types.ToolVolume, string) {
	t.Helper()
	host := filepath.Join(t.TempDir(), key)
	for _, d := range []string{"bin", "lib/data", "empty", "ro"} {
		require.NoError(t, os.MkdirAll(filepath.Join(host, d), 0o755))
	}
	require.NoError(t, os.WriteFile(filepath.Join(host, "bin", "hello"), []byte("#!/bin/sh\necho hello from "+key+"\n"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(host, "lib/data", "words"), []byte("a b c\n"), 0o640))
	require.NoError(t, os.Symlink("hello", filepath.Join(host, "bin", "hi")))
	require.NoError(t, os.Symlink("/etc/hostname", filepath.Join(host, "lib", "outside")))
	require.NoError(t, os.WriteFile(filepath.Join(host, "ro", "f"), []byte("x"), 0o444))
	require.NoError(t, os.Chmod(filepath.Join(host, "ro"), 0o555))
	vol := types.ToolVolume{Key: key, Spec: "http:hello@1.0.0", Dir: filepath.Join(guestRoot, key), BinPaths: []string{filepath.Join(guestRoot, key, "bin")}}
	// The host's marker names the host's dir; the agent writes its own.
	writeMarker(t, host, types.ToolVolume{Key: key, Dir: "/host/cache/" + key}, "")
	return vol, host
}

// requireOnlyVolumes checks that root holds exactly keys: no partial
// extraction, nothing else.
func requireOnlyVolumes(t *testing.T, root string, keys ...string) {
	t.Helper()
	entries, err := os.ReadDir(root)
	if errors.Is(err, fs.ErrNotExist) && len(keys) == 0 {
		return
	}
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	require.ElementsMatch(t, keys, names)
}

func TestAddTools(t *testing.T) {
	root := filepath.Join(t.TempDir(), "tools")
	c, _ := startAgent(t, ServerConfig{ToolsRoot: root})
	vol, host := hostVolume(t, root, "http-hello-1.0.0-abcd")

	res, err := c.Exec(t.Context(), types.Command{Cmd: "hello"}, nil, nil)
	require.NoError(t, err)
	require.Equal(t, 127, res.ExitCode, "not there yet: %s", res.Stderr)

	added, err := c.AddToolsDir(t.Context(), vol, root, host)
	require.NoError(t, err)
	require.False(t, added.AlreadyPresent)
	require.EqualValues(t, 10, added.Entries, "5 dirs, 3 files, 2 symlinks: everything but the marker")
	require.EqualValues(t, len("#!/bin/sh\necho hello from http-hello-1.0.0-abcd\n")+len("a b c\n")+1, added.Bytes)

	// On PATH at once, by name and through the symlink.
	for _, name := range []string{"hello", "hi"} {
		res, err := c.Exec(t.Context(), types.Command{Cmd: name}, nil, nil)
		require.NoError(t, err)
		require.Equal(t, "hello from "+vol.Key+"\n", string(res.Stdout))
	}
	res, err = c.Exec(t.Context(), sh(`echo "$PATH"`), nil, nil)
	require.NoError(t, err)
	require.Equal(t, vol.BinPaths[0]+":"+defaultPath+"\n", string(res.Stdout))

	// Modes, links and the marker as they should be.
	mode := func(p string) fs.FileMode {
		fi, err := os.Lstat(filepath.Join(vol.Dir, p))
		require.NoError(t, err, p)
		return fi.Mode()
	}
	require.Equal(t, fs.FileMode(0o755), mode("bin/hello"))
	require.Equal(t, fs.FileMode(0o640), mode("lib/data/words"))
	require.Equal(t, fs.ModeDir|0o555, mode("ro"))
	require.Equal(t, fs.ModeDir|0o755, mode("."))
	require.Equal(t, fs.ModeDir|0o755, mode("empty"))
	target, err := os.Readlink(filepath.Join(vol.Dir, "lib", "outside"))
	require.NoError(t, err)
	require.Equal(t, "/etc/hostname", target, "a symlink out of the volume stays a symlink")
	got, err := ReadToolMarker(vol.Dir, root)
	require.NoError(t, err)
	require.Equal(t, vol, got, "the marker is the agent's, not the host's")
	requireOnlyVolumes(t, root, vol.Key)

	vols, err := c.ListTools(t.Context())
	require.NoError(t, err)
	require.Equal(t, []types.ToolVolume{vol}, vols)

	// Again: already there, nothing read.
	added, err = c.AddTools(t.Context(), vol, root, strings.NewReader("not even a tar"))
	require.NoError(t, err)
	require.Equal(t, ToolsAdded{AlreadyPresent: true}, added)
	added, err = c.AddToolsDir(t.Context(), vol, root, host)
	require.NoError(t, err)
	require.True(t, added.AlreadyPresent)
	requireOnlyVolumes(t, root, vol.Key)
}

func TestAddToolsAdoptsRoot(t *testing.T) {
	// A guest booted without tools takes the root of its first volume.
	c, _ := startAgent(t, ServerConfig{})
	vols, err := c.ListTools(t.Context())
	require.NoError(t, err)
	require.Empty(t, vols)

	root := filepath.Join(t.TempDir(), "tools")
	vol, host := hostVolume(t, root, "k1")
	_, err = c.AddToolsDir(t.Context(), vol, root, host)
	require.NoError(t, err)
	res, err := c.Exec(t.Context(), types.Command{Cmd: "hello"}, nil, nil)
	require.NoError(t, err)
	require.Equal(t, "hello from k1\n", string(res.Stdout))

	// One guest, one root.
	other := filepath.Join(t.TempDir(), "other")
	vol2, host2 := hostVolume(t, other, "k2")
	_, err = c.AddToolsDir(t.Context(), vol2, other, host2)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "the guest's tools root is "+root)
	requireOnlyVolumes(t, other)
}

// tarOf builds a tar stream from headers, each followed by body when it is
// a regular file.
func tarOf(t *testing.T, entries ...tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.h
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if h.Mode == 0 {
			h.Mode = 0o755
		}
		require.NoError(t, tw.WriteHeader(&h))
		if h.Typeflag == tar.TypeReg {
			_, err := tw.Write([]byte(e.body))
			require.NoError(t, err)
		}
	}
	require.NoError(t, tw.Close())
	return buf.Bytes()
}

type tarEntry struct {
	h    tar.Header
	body string
}

func file(name, body string) tarEntry {
	return tarEntry{h: tar.Header{Name: name, Typeflag: tar.TypeReg}, body: body}
}
func dir(name string) tarEntry { return tarEntry{h: tar.Header{Name: name, Typeflag: tar.TypeDir}} }
func symlink(name, target string) tarEntry {
	return tarEntry{h: tar.Header{Name: name, Typeflag: tar.TypeSymlink, Linkname: target}}
}

func TestAddToolsRejectsBadArchives(t *testing.T) {
	root := filepath.Join(t.TempDir(), "tools")
	outside := t.TempDir()
	c, _ := startAgent(t, ServerConfig{ToolsRoot: root, MaxToolBytes: 1000})
	vol := types.ToolVolume{Key: "bad", Dir: root + "/bad", BinPaths: []string{root + "/bad/bin"}}
	tests := []struct {
		name    string
		tar     []byte
		wantErr string
	}{
		{name: "parent escape", tar: tarOf(t, dir("bin"), file("bin/../../escaped", "x")), wantErr: `"bin/../../escaped" has ".."`},
		{name: "absolute", tar: tarOf(t, file(outside+"/abs", "x")), wantErr: "absolute name"},
		{name: "through a symlink out", tar: tarOf(t, symlink("lib", outside), file("lib/evil", "x")), wantErr: `"lib/evil" lies under "lib", which is not a directory`},
		{name: "through a symlink in", tar: tarOf(t, dir("bin"), symlink("b", "bin"), file("b/x", "x")), wantErr: "a symlink is never followed"},
		{name: "over a symlink", tar: tarOf(t, symlink("x", outside+"/over"), file("x", "x")), wantErr: `"x" is given twice`},
		{name: "hard link", tar: tarOf(t, file("a", "x"), tarEntry{h: tar.Header{Name: "b", Typeflag: tar.TypeLink, Linkname: "a"}}), wantErr: `"b" is a hard link; a tool volume holds only regular files, directories and symlinks`},
		{name: "device", tar: tarOf(t, tarEntry{h: tar.Header{Name: "null", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 3}}), wantErr: `"null" is a character device`},
		{name: "fifo", tar: tarOf(t, tarEntry{h: tar.Header{Name: "p", Typeflag: tar.TypeFifo}}), wantErr: `"p" is a named pipe`},
		{name: "too large", tar: tarOf(t, file("a", strings.Repeat("x", 600)), file("b", strings.Repeat("y", 600))), wantErr: "larger than 1000 bytes"},
		{name: "not a tar", tar: bytes.Repeat([]byte("garbage!"), 200), wantErr: "tar stream"},
		{name: "truncated", tar: tarOf(t, file("a", strings.Repeat("x", 900)))[:700], wantErr: `ends in the middle of entry "a"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := c.AddTools(t.Context(), vol, root, bytes.NewReader(tt.tar))
			require.ErrorIs(t, err, types.ErrInvalid)
			require.ErrorContains(t, err, "adding tool volume bad to the guest: invalid input: tar stream: ")
			require.ErrorContains(t, err, tt.wantErr)
			requireOnlyVolumes(t, root)
			entries, err := os.ReadDir(outside)
			require.NoError(t, err)
			require.Empty(t, entries, "nothing was written outside the volume")
		})
	}

	// Bad headers are refused before anything is sent.
	for _, bad := range []types.ToolVolume{
		{Key: "x", Dir: "/elsewhere/x"},
		{Key: "../x", Dir: root + "/../x"},
		{Key: "x", Dir: root + "/x", BinPaths: []string{"/usr/bin"}},
	} {
		_, err := c.AddTools(t.Context(), bad, root, bytes.NewReader(nil))
		require.ErrorIs(t, err, types.ErrInvalid, "%+v", bad)
	}
	_, err := c.AddTools(t.Context(), vol, "relative", bytes.NewReader(nil))
	require.ErrorIs(t, err, types.ErrInvalid)

	// Something at Dir that AddTools did not make is not replaced.
	require.NoError(t, os.MkdirAll(vol.Dir, 0o755))
	_, err = c.AddTools(t.Context(), vol, root, bytes.NewReader(tarOf(t, file("a", "x"))))
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "exists and is not tool volume bad")
}

// stallingReader yields its data, then blocks until its context ends.
type stallingReader struct {
	data    []byte
	ctx     context.Context
	stalled chan struct{}
}

func (r *stallingReader) Read(p []byte) (int, error) {
	if len(r.data) > 0 {
		n := copy(p, r.data)
		r.data = r.data[n:]
		return n, nil
	}
	close(r.stalled)
	<-r.ctx.Done()
	return 0, r.ctx.Err()
}

func TestAddToolsCancelledLeavesNothing(t *testing.T) {
	root := filepath.Join(t.TempDir(), "tools")
	c, _ := startAgent(t, ServerConfig{ToolsRoot: root})
	vol := types.ToolVolume{Key: "slow", Dir: root + "/slow", BinPaths: []string{root + "/slow/bin"}}
	full := tarOf(t, dir("bin"), file("bin/one", strings.Repeat("1", 100_000)), file("bin/two", strings.Repeat("2", 100_000)))

	ctx, cancel := context.WithCancel(t.Context())
	r := &stallingReader{data: full[:150_000], ctx: ctx, stalled: make(chan struct{})}
	done := make(chan error, 1)
	go func() {
		_, err := c.AddTools(ctx, vol, root, r)
		done <- err
	}()
	<-r.stalled
	// The agent has started extracting.
	require.Eventually(t, func() bool {
		entries, _ := os.ReadDir(root)
		return len(entries) == 1 && strings.HasPrefix(entries[0].Name(), toolWorkPrefix)
	}, 5*time.Second, 10*time.Millisecond)
	cancel()
	require.ErrorIs(t, <-done, context.Canceled)
	require.Eventually(t, func() bool {
		entries, err := os.ReadDir(root)
		return err == nil && len(entries) == 0
	}, 5*time.Second, 10*time.Millisecond, "the partial extraction is removed")

	// A failing content reader cancels the same way.
	r2 := io.MultiReader(bytes.NewReader(full[:150_000]), iotestErrReader{})
	_, err := c.AddTools(t.Context(), vol, root, r2)
	require.ErrorContains(t, err, "reading the content: disk on fire")
	require.Eventually(t, func() bool {
		entries, err := os.ReadDir(root)
		return err == nil && len(entries) == 0
	}, 5*time.Second, 10*time.Millisecond)

	// And the whole stream works afterwards.
	added, err := c.AddTools(t.Context(), vol, root, bytes.NewReader(full))
	require.NoError(t, err)
	require.EqualValues(t, 200_000, added.Bytes)
	requireOnlyVolumes(t, root, "slow")
}

type iotestErrReader struct{}

func (iotestErrReader) Read([]byte) (int, error) { return 0, errors.New("disk on fire") }

func TestToolLeftoversRemovedAtStart(t *testing.T) {
	root := t.TempDir()
	vol := makeToolVolume(t, root, "kept", "hello")
	left := filepath.Join(root, toolWorkPrefix+"crashed-123")
	require.NoError(t, os.MkdirAll(filepath.Join(left, "bin"), 0o755))
	startAgent(t, ServerConfig{ToolsRoot: root})
	requireOnlyVolumes(t, root, vol.Key)
}

func TestToolCallsOnOldAgent(t *testing.T) {
	c := oldAgentClient(t)
	_, err := c.ListTools(t.Context())
	require.ErrorIs(t, err, types.ErrNotSupported)
	require.ErrorContains(t, err, "speaks protocol 2; this call needs 4")
	vol := types.ToolVolume{Key: "k", Dir: "/opt/tools/k"}
	_, err = c.AddTools(t.Context(), vol, "/opt/tools", bytes.NewReader(tarOf(t, file("a", "x"))))
	require.ErrorIs(t, err, types.ErrNotSupported)
	require.ErrorContains(t, err, "this call needs 4")
}

// The marker the agent writes is the JSON the backends read.
func TestToolMarkerIsJSONOfTheVolume(t *testing.T) {
	work := t.TempDir()
	vol := types.ToolVolume{Key: "k", Spec: "node@22", Dir: "/r/k", BinPaths: []string{"/r/k/bin"}}
	require.NoError(t, finishToolVolume(work, vol))
	b, err := os.ReadFile(filepath.Join(work, types.ToolMarkerFile))
	require.NoError(t, err)
	var got types.ToolVolume
	require.NoError(t, json.Unmarshal(b, &got))
	require.Equal(t, vol, got)
}

func TestAddToolsConcurrentSameVolume(t *testing.T) {
	root := filepath.Join(t.TempDir(), "tools")
	c, _ := startAgent(t, ServerConfig{ToolsRoot: root})
	vol, host := hostVolume(t, root, "shared")
	const n = 4
	results := make(chan ToolsAdded, n)
	errs := make(chan error, n)
	for range n {
		go func() {
			added, err := c.AddToolsDir(t.Context(), vol, root, host)
			results <- added
			errs <- err
		}()
	}
	fresh := 0
	for range n {
		require.NoError(t, <-errs)
		if !(<-results).AlreadyPresent {
			fresh++
		}
	}
	require.Equal(t, 1, fresh, "one call placed it; the others found it there")
	requireOnlyVolumes(t, root, vol.Key)
	res, err := c.Exec(t.Context(), types.Command{Cmd: "hello"}, nil, nil)
	require.NoError(t, err)
	require.Equal(t, "hello from shared\n", string(res.Stdout))
}
