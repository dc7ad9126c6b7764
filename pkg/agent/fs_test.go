package agent

import (
	"os"
	"os/user"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// A numeric uid without a passwd entry: its home is "/", and its files
// show numeric owners.
const (
	fsTestUID  = 4321
	fsTestUser = "4321"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		testenv.Skip(t, "owners and other users' homes need an agent running as root; run the tests as root")
	}
}

// rel is p relative to "/", the home of fsTestUser.
func rel(t *testing.T, p string) string {
	t.Helper()
	r, err := filepath.Rel("/", p)
	require.NoError(t, err)
	return r
}

func requireOwner(t *testing.T, path string, uid, gid uint32) {
	t.Helper()
	fi, err := os.Lstat(path)
	require.NoError(t, err)
	st := fi.Sys().(*syscall.Stat_t)
	require.Equal(t, [2]uint32{uid, gid}, [2]uint32{st.Uid, st.Gid}, path)
}

func TestStat(t *testing.T) {
	requireRoot(t)
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	file := filepath.Join(dir, "script")
	require.NoError(t, os.WriteFile(file, []byte("#!/bin/sh\n"), 0o755))
	require.NoError(t, os.Chmod(file, 0o755))
	mtime := time.Unix(1700000000, 123456789)
	require.NoError(t, os.Chtimes(file, mtime, mtime))
	sub := filepath.Join(dir, "sub")
	require.NoError(t, os.Mkdir(sub, 0o750))
	require.NoError(t, os.Chmod(sub, 0o750|os.ModeSetgid))
	subInfo, err := os.Lstat(sub)
	require.NoError(t, err)
	link := filepath.Join(dir, "link")
	require.NoError(t, os.Symlink("script", link))
	owned := filepath.Join(dir, "owned")
	require.NoError(t, os.WriteFile(owned, []byte("x"), 0o600))
	require.NoError(t, os.Chown(owned, fsTestUID, fsTestUID))
	root, err := user.LookupId("0")
	require.NoError(t, err)
	rootGroup, err := user.LookupGroupId("0")
	require.NoError(t, err)
	me, err := user.Current()
	require.NoError(t, err)

	tests := []struct {
		name   string
		path   string
		user   string
		want   EntryInfo
		noTime bool
	}{
		{name: "file", path: file, want: EntryInfo{Name: "script", Path: file, Type: FileTypeFile, Size: 10, Mode: 0o755, Permissions: "-rwxr-xr-x", Owner: root.Username, Group: rootGroup.Name, ModTime: mtime}},
		{name: "unclean path", path: dir + "//./sub/../script", want: EntryInfo{Name: "script", Path: file, Type: FileTypeFile, Size: 10, Mode: 0o755, Permissions: "-rwxr-xr-x", Owner: root.Username, Group: rootGroup.Name, ModTime: mtime}},
		{name: "directory", path: sub, noTime: true, want: EntryInfo{Name: "sub", Path: sub, Type: FileTypeDirectory, Size: subInfo.Size(), Mode: os.ModeDir | os.ModeSetgid | 0o750, Permissions: "drwxr-s---", Owner: root.Username, Group: rootGroup.Name}},
		{name: "symlink is not followed", path: link, noTime: true, want: EntryInfo{Name: "link", Path: link, Type: FileTypeSymlink, Size: 6, Mode: os.ModeSymlink | 0o777, Permissions: "lrwxrwxrwx", Owner: root.Username, Group: rootGroup.Name, SymlinkTarget: "script"}},
		{name: "numeric owner", path: owned, noTime: true, want: EntryInfo{Name: "owned", Path: owned, Type: FileTypeFile, Size: 1, Mode: 0o600, Permissions: "-rw-------", Owner: fsTestUser, Group: fsTestUser}},
		{name: "relative to the user's home", path: rel(t, file), user: fsTestUser, want: EntryInfo{Name: "script", Path: file, Type: FileTypeFile, Size: 10, Mode: 0o755, Permissions: "-rwxr-xr-x", Owner: root.Username, Group: rootGroup.Name, ModTime: mtime}},
		{name: "tilde", path: "~/" + rel(t, file), user: fsTestUser, want: EntryInfo{Name: "script", Path: file, Type: FileTypeFile, Size: 10, Mode: 0o755, Permissions: "-rwxr-xr-x", Owner: root.Username, Group: rootGroup.Name, ModTime: mtime}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := c.Stat(t.Context(), tt.path, tt.user)
			require.NoError(t, err)
			if tt.noTime {
				require.False(t, got.ModTime.IsZero())
				got.ModTime = time.Time{}
			}
			require.True(t, tt.want.ModTime.Equal(got.ModTime), "modified %s, want %s", got.ModTime, tt.want.ModTime)
			got.ModTime, tt.want.ModTime = time.Time{}, time.Time{}
			require.Equal(t, tt.want, *got)
		})
	}

	home, err := c.Stat(t.Context(), "~", "")
	require.NoError(t, err)
	require.Equal(t, filepath.Clean(me.HomeDir), home.Path, "~ is the agent user's home")
	rootEntry, err := c.Stat(t.Context(), "", fsTestUser)
	require.NoError(t, err)
	require.Equal(t, "/", rootEntry.Path, "an empty path is the user's home")
	require.Equal(t, "/", rootEntry.Name)

	_, err = c.Stat(t.Context(), filepath.Join(dir, "nosuch"), "")
	require.ErrorIs(t, err, types.ErrNotFound)
	_, err = c.Stat(t.Context(), "x", "no-such-user")
	require.ErrorIs(t, err, types.ErrInvalid)
}

func TestListDir(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	for _, d := range []string{"a/b/c", "d"} {
		require.NoError(t, os.MkdirAll(filepath.Join(dir, d), 0o755))
	}
	for _, f := range []string{"a/f1", "a/b/f2", "a/b/c/f3", "z"} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o644))
	}
	require.NoError(t, os.Symlink("a", filepath.Join(dir, "link")))

	paths := func(entries []EntryInfo) []string {
		var ps []string
		for _, e := range entries {
			r, err := filepath.Rel(dir, e.Path)
			require.NoError(t, err)
			ps = append(ps, r)
		}
		return ps
	}
	tests := []struct {
		name  string
		path  string
		depth int
		want  []string
	}{
		{name: "depth 0 is direct children", path: dir, depth: 0, want: []string{"a", "d", "link", "z"}},
		{name: "depth 1", path: dir, depth: 1, want: []string{"a", "d", "link", "z"}},
		{name: "depth 2", path: dir, depth: 2, want: []string{"a", "a/b", "a/f1", "d", "link", "z"}},
		{name: "depth 3", path: dir, depth: 3, want: []string{"a", "a/b", "a/b/c", "a/b/f2", "a/f1", "d", "link", "z"}},
		{name: "deeper than the tree", path: dir, depth: 100, want: []string{"a", "a/b", "a/b/c", "a/b/c/f3", "a/b/f2", "a/f1", "d", "link", "z"}},
		{name: "empty directory", path: filepath.Join(dir, "d"), depth: 5},
		{name: "through a symlinked root", path: filepath.Join(dir, "link"), depth: 1, want: []string{"link/b", "link/f1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			entries, err := c.ListDir(t.Context(), tt.path, "", tt.depth)
			require.NoError(t, err)
			require.Equal(t, tt.want, paths(entries))
		})
	}

	entries, err := c.ListDir(t.Context(), dir, "", 1)
	require.NoError(t, err)
	kinds := map[string]FileType{}
	for _, e := range entries {
		kinds[e.Name] = e.Type
	}
	require.Equal(t, map[string]FileType{"a": FileTypeDirectory, "d": FileTypeDirectory, "link": FileTypeSymlink, "z": FileTypeFile}, kinds)
	require.Equal(t, "a", entries[2].SymlinkTarget)

	if os.Geteuid() == 0 {
		entries, err := c.ListDir(t.Context(), rel(t, dir), fsTestUser, 1)
		require.NoError(t, err)
		require.Equal(t, []string{"a", "d", "link", "z"}, paths(entries), "relative to the user's home")
	}
}

func TestListDirErrors(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	file := filepath.Join(dir, "f")
	require.NoError(t, os.WriteFile(file, nil, 0o644))
	_, err := c.ListDir(t.Context(), file, "", 1)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "not a directory")
	_, err = c.ListDir(t.Context(), filepath.Join(dir, "nosuch"), "", 1)
	require.ErrorIs(t, err, types.ErrNotFound)
	_, err = c.ListDir(t.Context(), dir, "", -1)
	require.ErrorIs(t, err, types.ErrInvalid)
}

func TestListDirLarge(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	const n = 3*listDirBatch + 7
	for i := range n {
		require.NoError(t, os.WriteFile(filepath.Join(dir, "f"+string(rune('a'+i%26))+string(rune('a'+i/26%26))+string(rune('a'+i/676))), nil, 0o644))
	}
	entries, err := c.ListDir(t.Context(), dir, "", 1)
	require.NoError(t, err)
	require.Len(t, entries, n, "entries arrive in several batches")
}

func TestMakeDir(t *testing.T) {
	requireRoot(t)
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	target := filepath.Join(dir, "a", "b")

	created, entry, err := c.MakeDir(t.Context(), target, fsTestUser)
	require.NoError(t, err)
	require.True(t, created)
	require.Equal(t, target, entry.Path)
	require.Equal(t, FileTypeDirectory, entry.Type)
	require.Equal(t, fsTestUser, entry.Owner)
	requireOwner(t, filepath.Join(dir, "a"), fsTestUID, 0)
	requireOwner(t, target, fsTestUID, 0)
	requireOwner(t, dir, 0, 0)

	created, entry, err = c.MakeDir(t.Context(), target, fsTestUser)
	require.NoError(t, err, "an existing directory is not an error")
	require.False(t, created)
	require.Equal(t, target, entry.Path)

	// Relative to the home of the user, "/".
	created, entry, err = c.MakeDir(t.Context(), rel(t, filepath.Join(dir, "c")), fsTestUser)
	require.NoError(t, err)
	require.True(t, created)
	require.Equal(t, filepath.Join(dir, "c"), entry.Path)

	created, _, err = c.MakeDir(t.Context(), filepath.Join(dir, "d"), "")
	require.NoError(t, err)
	require.True(t, created)
	requireOwner(t, filepath.Join(dir, "d"), 0, 0)

	file := filepath.Join(dir, "file")
	require.NoError(t, os.WriteFile(file, nil, 0o644))
	for _, p := range []string{file, filepath.Join(file, "below")} {
		_, _, err = c.MakeDir(t.Context(), p, "")
		require.ErrorIs(t, err, types.ErrInvalid, p)
	}
	_, _, err = c.MakeDir(t.Context(), "", "")
	require.ErrorIs(t, err, types.ErrInvalid)
	_, _, err = c.MakeDir(t.Context(), filepath.Join(dir, "e"), "no-such-user")
	require.ErrorIs(t, err, types.ErrInvalid)
}

func TestMove(t *testing.T) {
	requireRoot(t)
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	require.NoError(t, os.WriteFile(src, []byte("content"), 0o640))

	dst := filepath.Join(dir, "new", "parent", "dst")
	entry, err := c.Move(t.Context(), src, dst, fsTestUser)
	require.NoError(t, err)
	require.Equal(t, dst, entry.Path)
	require.Equal(t, "dst", entry.Name)
	require.Equal(t, FileTypeFile, entry.Type)
	require.EqualValues(t, 7, entry.Size)
	require.NoFileExists(t, src)
	b, err := os.ReadFile(dst)
	require.NoError(t, err)
	require.Equal(t, "content", string(b))
	requireOwner(t, filepath.Join(dir, "new"), fsTestUID, 0)
	requireOwner(t, filepath.Join(dir, "new", "parent"), fsTestUID, 0)
	requireOwner(t, dst, 0, 0) // the moved file keeps its owner

	// A directory, with relative paths against the user's home ("/").
	tree := filepath.Join(dir, "tree")
	require.NoError(t, os.MkdirAll(filepath.Join(tree, "x"), 0o755))
	entry, err = c.Move(t.Context(), rel(t, tree), "~/"+rel(t, filepath.Join(dir, "moved")), fsTestUser)
	require.NoError(t, err)
	require.Equal(t, filepath.Join(dir, "moved"), entry.Path)
	require.Equal(t, FileTypeDirectory, entry.Type)
	require.DirExists(t, filepath.Join(dir, "moved", "x"))

	// Onto an existing file: replaced, as rename(2) does.
	other := filepath.Join(dir, "other")
	require.NoError(t, os.WriteFile(other, []byte("other"), 0o644))
	_, err = c.Move(t.Context(), other, dst, "")
	require.NoError(t, err)
	b, err = os.ReadFile(dst)
	require.NoError(t, err)
	require.Equal(t, "other", string(b))

	_, err = c.Move(t.Context(), filepath.Join(dir, "nosuch"), filepath.Join(dir, "x"), "")
	require.ErrorIs(t, err, types.ErrNotFound)
	_, err = c.Move(t.Context(), dst, filepath.Join(dst, "below"), "")
	require.ErrorIs(t, err, types.ErrInvalid, "a file is in the way of the destination's parent")
	_, err = c.Move(t.Context(), "", dst, "")
	require.ErrorIs(t, err, types.ErrInvalid)
}

func TestRemove(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	tree := filepath.Join(dir, "tree")
	require.NoError(t, os.MkdirAll(filepath.Join(tree, "a", "b"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(tree, "a", "b", "f"), nil, 0o644))
	kept := filepath.Join(dir, "kept")
	require.NoError(t, os.Mkdir(kept, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(kept, "f"), nil, 0o644))
	link := filepath.Join(dir, "link")
	require.NoError(t, os.Symlink(kept, link))

	require.NoError(t, c.Remove(t.Context(), tree, ""))
	require.NoDirExists(t, tree)
	require.NoError(t, c.Remove(t.Context(), tree, ""), "a missing path is not an error")
	require.NoError(t, c.Remove(t.Context(), link, ""))
	require.NoFileExists(t, link)
	require.FileExists(t, filepath.Join(kept, "f"), "the symlink's target stays")

	if os.Geteuid() == 0 {
		require.NoError(t, c.Remove(t.Context(), rel(t, kept), fsTestUser), "relative to the user's home")
		require.NoDirExists(t, kept)
	}
	for _, p := range []string{"", "/", "/.."} {
		err := c.Remove(t.Context(), p, "")
		require.ErrorIs(t, err, types.ErrInvalid, "%q", p)
	}
}
