package tools

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// requireE2fsprogs skips when mkfs.ext4 or debugfs is missing.
func requireE2fsprogs(t *testing.T) {
	t.Helper()
	for _, bin := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := lookMkfs(bin); err != nil {
			testenv.Skip(t, "%s is missing (%v); install e2fsprogs with `apt-get install e2fsprogs`", bin, err)
		}
	}
}

// debugfsCat reads a file out of an ext4 image without mounting it.
func debugfsCat(t *testing.T, img, path string) string {
	t.Helper()
	bin, err := lookMkfs("debugfs")
	require.NoError(t, err)
	out, err := exec.Command(bin, "-R", "cat "+path, img).Output()
	require.NoError(t, err)
	return string(out)
}

// countingMkfs writes a mkfs.ext4 wrapper that counts its runs in a file.
func countingMkfs(t *testing.T) (bin, count string) {
	t.Helper()
	real, err := lookMkfs("mkfs.ext4")
	require.NoError(t, err)
	dir := t.TempDir()
	count = filepath.Join(dir, "count")
	bin = filepath.Join(dir, "mkfs.ext4")
	require.NoError(t, os.WriteFile(bin, []byte("#!/bin/sh\necho run >> "+count+"\nexec "+real+" \"$@\"\n"), 0o755))
	return bin, count
}

func runs(t *testing.T, count string) int {
	t.Helper()
	b, err := os.ReadFile(count)
	if os.IsNotExist(err) {
		return 0
	}
	require.NoError(t, err)
	return strings.Count(string(b), "run")
}

func inode(t *testing.T, path string) (uint64, time.Time) {
	t.Helper()
	fi, err := os.Stat(path)
	require.NoError(t, err)
	return fi.Sys().(*syscall.Stat_t).Ino, fi.ModTime()
}

func TestImageBuiltOnceWithMarker(t *testing.T) {
	requireE2fsprogs(t)
	srv := newToolServer(t)
	m := newTestMise(t, nil)
	mkfs, count := countingMkfs(t)
	m.mkfs = mkfs
	ctx := context.Background()
	set, err := m.Install(ctx, []Spec{srv.spec(t, "1.0.0")})
	require.NoError(t, err)
	e := set.Entries[0]

	// The marker is written at install time and names the volume.
	var marker types.ToolVolume
	b, err := os.ReadFile(filepath.Join(e.Dir, types.ToolMarkerFile))
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &marker))
	require.Equal(t, e.Volume(), marker)
	require.Empty(t, marker.Image)
	fi, err := os.Stat(filepath.Join(e.Dir, types.ToolMarkerFile))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o644), fi.Mode().Perm())

	img, err := m.Image(ctx, e)
	require.NoError(t, err)
	require.Equal(t, filepath.Join(m.root, ".images", e.Key+".ext4"), img)
	ino, mtime := inode(t, img)
	again, err := m.Image(ctx, e)
	require.NoError(t, err)
	require.Equal(t, img, again)
	ino2, mtime2 := inode(t, img)
	require.Equal(t, ino, ino2, "the image is built once")
	require.Equal(t, mtime, mtime2)
	require.Equal(t, 1, runs(t, count))

	// The image's root is the entry's directory, marker included.
	var inImage types.ToolVolume
	require.NoError(t, json.Unmarshal([]byte(debugfsCat(t, img, "/"+types.ToolMarkerFile)), &inImage))
	require.Equal(t, marker, inImage)
	rel, err := filepath.Rel(e.Dir, filepath.Join(e.BinPaths[0], "hello"))
	require.NoError(t, err)
	require.Equal(t, "#!/bin/sh\necho \"hello from the tool cache\"\n", debugfsCat(t, img, "/"+rel))
	fi, err = os.Stat(img)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o444), fi.Mode().Perm(), "images are read-only")

	// Prune takes the image with its entry, and keep protects both.
	pruned, err := m.Prune(ctx, 0, func(key string) bool { return key == e.Key })
	require.NoError(t, err)
	require.Empty(t, pruned, "an entry in use is kept")
	require.FileExists(t, img)
	pruned, err = m.Prune(ctx, 0, nil)
	require.NoError(t, err)
	require.Len(t, pruned, 1)
	require.NoFileExists(t, img)
	_, err = m.Image(ctx, e)
	require.ErrorIs(t, err, types.ErrNotFound)
}

func TestImageAddsMissingMarker(t *testing.T) {
	requireE2fsprogs(t)
	srv := newToolServer(t)
	m := newTestMise(t, nil)
	ctx := context.Background()
	set, err := m.Install(ctx, []Spec{srv.spec(t, "1.0.0")})
	require.NoError(t, err)
	e := set.Entries[0]
	// An entry made before markers existed.
	require.NoError(t, os.Remove(filepath.Join(e.Dir, types.ToolMarkerFile)))
	img, err := m.Image(ctx, e)
	require.NoError(t, err)
	require.FileExists(t, filepath.Join(e.Dir, types.ToolMarkerFile))
	require.Contains(t, debugfsCat(t, img, "/"+types.ToolMarkerFile), e.Key)
}

func TestImageConcurrentBuildsOnce(t *testing.T) {
	requireE2fsprogs(t)
	srv := newToolServer(t)
	m := newTestMise(t, nil)
	mkfs, count := countingMkfs(t)
	m.mkfs = mkfs
	other, err := NewMise(Config{Root: m.root, Mkfs: mkfs, AllowPrivateURLs: true})
	require.NoError(t, err)
	set, err := m.Install(context.Background(), []Spec{srv.spec(t, "1.0.0")})
	require.NoError(t, err)
	var wg sync.WaitGroup
	paths := make([]string, 6)
	errs := make([]error, 6)
	for i := range paths {
		wg.Go(func() {
			inst := m
			if i%2 == 1 {
				inst = other // another process: only the lock file is shared
			}
			paths[i], errs[i] = inst.Image(context.Background(), set.Entries[0])
		})
	}
	wg.Wait()
	for i := range paths {
		require.NoError(t, errs[i])
		require.Equal(t, paths[0], paths[i])
	}
	require.Equal(t, 1, runs(t, count), "one build for all")
}

func TestImageKilledBuildLeavesNoImage(t *testing.T) {
	requireE2fsprogs(t)
	srv := newToolServer(t)
	m := newTestMise(t, nil)
	ctx := context.Background()
	set, err := m.Install(ctx, []Spec{srv.spec(t, "1.0.0")})
	require.NoError(t, err)
	e := set.Entries[0]

	// A mkfs that writes half an image, then hangs until killed.
	dir := t.TempDir()
	started := filepath.Join(dir, "started")
	hang := filepath.Join(dir, "mkfs.ext4")
	require.NoError(t, os.WriteFile(hang, []byte("#!/bin/sh\nfor a; do prev=$last; last=$a; done\nprintf half > \"$prev\"\ntouch "+started+"\nexec sleep 60\n"), 0o755))
	m.mkfs = hang
	cctx, cancel := context.WithCancel(ctx)
	errc := make(chan error, 1)
	go func() { _, err := m.Image(cctx, e); errc <- err }()
	require.Eventually(t, func() bool { _, err := os.Stat(started); return err == nil }, 30*time.Second, 10*time.Millisecond)
	require.FileExists(t, m.layout.imageTemp(e.Key), "the build is midway")
	cancel()
	select {
	case err := <-errc:
		require.ErrorIs(t, err, context.Canceled)
	case <-time.After(30 * time.Second):
		t.Fatal("cancelling did not stop the build")
	}
	require.NoFileExists(t, m.layout.imageFile(e.Key))
	require.NoFileExists(t, m.layout.imageTemp(e.Key))

	// A SIGKILLed worker leaves the temporary file: prune clears it, and
	// the next build ignores it.
	require.NoError(t, os.WriteFile(m.layout.imageTemp(e.Key), []byte("half"), 0o644))
	_, err = m.Prune(ctx, time.Hour, nil)
	require.NoError(t, err)
	require.NoFileExists(t, m.layout.imageTemp(e.Key))
	require.NoError(t, os.WriteFile(m.layout.imageTemp(e.Key), []byte("half"), 0o644))
	m.mkfs = MkfsBinaryDefault
	img, err := m.Image(ctx, e)
	require.NoError(t, err)
	require.Contains(t, debugfsCat(t, img, "/"+types.ToolMarkerFile), e.Key)
	require.NoFileExists(t, m.layout.imageTemp(e.Key))
}

func TestMiseVolumeAndToolSet(t *testing.T) {
	requireE2fsprogs(t)
	srv := newToolServer(t)
	m := newTestMise(t, nil)
	ctx := context.Background()

	// The real binary is copied once per version, and runs from the cache.
	mv, err := m.MiseVolume(ctx)
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(mv.Key, "mise-"), mv.Key)
	require.Equal(t, MiseTool, mv.Tool)
	require.Empty(t, mv.Spec)
	bin := filepath.Join(m.root, mv.Key, "bin", "mise")
	require.Equal(t, []string{filepath.Dir(bin)}, mv.BinPaths)
	out, err := exec.Command(bin, "--version").Output()
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(string(out), mv.Version), "%s", out)
	ino, _ := inode(t, bin)
	mv2, err := m.MiseVolume(ctx)
	require.NoError(t, err)
	require.Equal(t, mv.Key, mv2.Key)
	ino2, _ := inode(t, bin)
	require.Equal(t, ino, ino2, "mise is copied once")
	require.FileExists(t, filepath.Join(mv.Dir, types.ToolMarkerFile))

	// Nothing asked for: nothing delivered, not even mise.
	none, err := WithMise(ctx, m, &Set{})
	require.NoError(t, err)
	require.Nil(t, none)
	ts, err := ToolSet(ctx, m, none, true)
	require.NoError(t, err)
	require.Nil(t, ts)

	set, err := m.Install(ctx, []Spec{srv.spec(t, "1.0.0")})
	require.NoError(t, err)
	entries, err := WithMise(ctx, m, set)
	require.NoError(t, err)
	ts, err = ToolSet(ctx, m, entries, false)
	require.NoError(t, err)
	require.Equal(t, m.root, ts.Root)
	require.Len(t, ts.Volumes, 2)
	require.Equal(t, set.Entries[0].Key, ts.Volumes[0].Key, "tools in spec order")
	require.Equal(t, mv.Key, ts.Volumes[1].Key, "mise last")
	require.Empty(t, ts.Volumes[0].Image, "no images unless asked for")
	require.NoError(t, ts.Validate())
	require.Equal(t, append(append([]string(nil), set.Path...), mv.BinPaths...), ts.Path())
}

func TestToolSetImages(t *testing.T) {
	requireE2fsprogs(t)
	srv := newToolServer(t)
	// A small stand-in for mise keeps the image small; the real binary is
	// copied in TestMiseVolumeAndToolSet.
	real, err := exec.LookPath(MiseBinaryDefault)
	if err != nil {
		testenv.Skip(t, "mise is not installed (%v); install it with `sudo scripts/setup.sh`", err)
	}
	wrapper := filepath.Join(t.TempDir(), "mise")
	require.NoError(t, os.WriteFile(wrapper, []byte("#!/bin/sh\nexec "+real+" \"$@\"\n"), 0o755))
	m, err := NewMise(Config{Root: t.TempDir(), Mise: wrapper, AllowPrivateURLs: true})
	require.NoError(t, err)
	ctx := context.Background()
	set, err := m.Install(ctx, []Spec{srv.spec(t, "1.0.0")})
	require.NoError(t, err)
	entries, err := WithMise(ctx, m, set)
	require.NoError(t, err)
	ts, err := ToolSet(ctx, m, entries, true)
	require.NoError(t, err)
	require.Len(t, ts.Volumes, 2)
	for _, v := range ts.Volumes {
		require.Equal(t, filepath.Join(m.root, ".images", v.Key+".ext4"), v.Image)
		require.Contains(t, debugfsCat(t, v.Image, "/"+types.ToolMarkerFile), v.Key)
	}
	require.NoError(t, ts.Validate())
}
