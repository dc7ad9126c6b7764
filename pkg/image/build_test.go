package image_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/image"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// needBuildTools skips unless the tools a non-debootstrap build uses exist
// and we are root (file owners and device nodes).
func needBuildTools(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		testenv.Skip(t, "building images needs root (file owners, device nodes); run the tests as root")
	}
	for _, tool := range []string{"apt-get", "dpkg-deb", "mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Skip(t, "%s is not installed; run ./scripts/setup.sh", tool)
		}
	}
}

// smallTree makes a tiny root tree: busybox, a symlink, a setuid file, a
// hard link and a device node.
func smallTree(t *testing.T) string {
	t.Helper()
	busybox := "/bin/busybox"
	if _, err := os.Stat(busybox); err != nil {
		testenv.Skip(t, "busybox-static is not installed; run ./scripts/setup.sh")
	}
	dir := t.TempDir()
	for _, d := range []string{"bin", "etc", "dev", "usr/local/bin"} {
		require.NoError(t, os.MkdirAll(filepath.Join(dir, d), 0o755))
	}
	b, err := os.ReadFile(busybox)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "bin/busybox"), b, 0o755))
	require.NoError(t, os.Symlink("busybox", filepath.Join(dir, "bin/sh")))
	require.NoError(t, os.Link(filepath.Join(dir, "bin/busybox"), filepath.Join(dir, "bin/ls")))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "bin/su"), []byte("x"), 0o755))
	require.NoError(t, os.Chmod(filepath.Join(dir, "bin/su"), 0o755|os.ModeSetuid))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "etc/owned"), []byte("y"), 0o600))
	require.NoError(t, os.Chown(filepath.Join(dir, "etc/owned"), 1000, 1000))
	require.NoError(t, unix.Mknod(filepath.Join(dir, "dev/null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	return dir
}

func sharedDebs() string { return filepath.Join(image.DefaultCacheDir(), "debs") }

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlog{t}, nil))
}

type tlog struct{ t *testing.T }

func (w tlog) Write(p []byte) (int, error) { w.t.Log(strings.TrimSpace(string(p))); return len(p), nil }

func build(t *testing.T, o image.Options) *image.Manifest {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	m, err := image.Build(ctx, o)
	if errors.Is(err, types.ErrUnavailable) {
		testenv.Skip(t, "cannot build an image here: %v", err)
	}
	require.NoError(t, err)
	return m
}

func debugfs(t *testing.T, img, req string) string {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", req, img).CombinedOutput()
	require.NoError(t, err, "%s", out)
	return string(out)
}

func tarNames(t *testing.T, file string) map[string]*tar.Header {
	t.Helper()
	f, err := os.Open(file)
	require.NoError(t, err)
	defer f.Close()
	out := map[string]*tar.Header{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		require.NoError(t, err)
		out[strings.TrimSuffix(h.Name, "/")] = h
	}
}

// checkImage checks what every image must hold.
func checkImage(t *testing.T, m *image.Manifest, agent string) {
	t.Helper()
	require.NoError(t, image.VerifyFull(m))
	for _, p := range []string{m.KernelPath(), m.VmlinuxPath(), m.InitrdPath(), m.RootfsPath(), m.RootfsTarPath()} {
		require.True(t, filepath.IsAbs(p))
		fi, err := os.Stat(p)
		require.NoError(t, err)
		t.Logf("%-18s %10d bytes", filepath.Base(p), fi.Size())
	}
	require.Equal(t, image.GuestModules, moduleNames(m))
	require.NotEmpty(t, m.Kernel.Version)
	require.True(t, strings.HasPrefix(m.Kernel.Package, "linux-image-"+m.Kernel.Release))
	require.True(t, m.Kernel.PVH)
	require.NotEmpty(t, m.Agent.Version)

	// The rootfs has fc-agent, the hostname and /etc/aetherium.
	ls := debugfs(t, m.RootfsPath(), "ls -l /usr/local/bin")
	require.Contains(t, ls, "fc-agent")
	require.Contains(t, ls, "100755")
	require.Contains(t, debugfs(t, m.RootfsPath(), "cat /etc/hostname"), "aetherium")
	require.Contains(t, debugfs(t, m.RootfsPath(), "stat /etc/aetherium"), "Type: directory")
	hs := tarNames(t, m.RootfsTarPath())
	require.Contains(t, hs, "usr/local/bin/fc-agent")
	require.Equal(t, int64(0o755), hs["usr/local/bin/fc-agent"].Mode&0o7777)

	// The initramfs: /init is fc-agent, modules flat, their order, /dev nodes.
	f, err := os.Open(m.InitrdPath())
	require.NoError(t, err)
	defer f.Close()
	zr, err := gzip.NewReader(f)
	require.NoError(t, err)
	dir := t.TempDir()
	cmd := exec.Command("cpio", "-i", "-d", "--quiet", "--no-absolute-filenames")
	cmd.Dir, cmd.Stdin = dir, zr
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	want, err := os.ReadFile(agent)
	require.NoError(t, err)
	got, err := os.ReadFile(filepath.Join(dir, "init"))
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "/init is fc-agent")
	order, err := os.ReadFile(filepath.Join(dir, "etc/aetherium/modules.order"))
	require.NoError(t, err)
	lines := strings.Fields(string(order))
	require.Equal(t, "virtio_ring.ko", lines[0])
	require.Equal(t, "vmw_vsock_virtio_transport.ko", lines[len(lines)-1])
	for _, l := range lines {
		require.FileExists(t, filepath.Join(dir, "lib/modules", l))
	}
	var st unix.Stat_t
	require.NoError(t, unix.Stat(filepath.Join(dir, "dev/console"), &st))
	require.Equal(t, uint32(5), unix.Major(st.Rdev))
	for _, d := range []string{"proc", "sys", "run", "tmp", "mnt/root"} {
		require.DirExists(t, filepath.Join(dir, d))
	}
}

func moduleNames(m *image.Manifest) []string {
	var out []string
	for _, mod := range m.Modules {
		out = append(out, mod.Name)
	}
	return out
}

func TestBuildFromDirAndNoOpRebuild(t *testing.T) {
	needBuildTools(t)
	agent := testenv.BuildBinary(t, "fc-agent")
	tree := smallTree(t)
	o := image.Options{CacheDir: t.TempDir(), DebCacheDir: sharedDebs(), AgentPath: agent, FromDir: tree, RootfsSizeMB: 64, Logger: testLogger(t)}
	start := time.Now()
	m := build(t, o)
	t.Logf("fresh --from-dir build took %s", time.Since(start).Round(time.Millisecond))
	checkImage(t, m, agent)
	require.Equal(t, "dir:"+tree, m.Rootfs.Source)
	require.Equal(t, 64, m.Rootfs.SizeMB)
	require.Equal(t, filepath.Join(o.CacheDir, "images", m.ID), m.Dir)

	// Owners, set-id bits, links and devices survive into both outputs.
	require.Contains(t, debugfs(t, m.RootfsPath(), "stat /bin/su"), "Mode:  04755")
	require.Contains(t, debugfs(t, m.RootfsPath(), "stat /etc/owned"), "User:  1000")
	require.Contains(t, debugfs(t, m.RootfsPath(), "stat /bin/ls"), "Links: 2")
	require.Contains(t, debugfs(t, m.RootfsPath(), "stat /dev/null"), "Type: character special")
	hs := tarNames(t, m.RootfsTarPath())
	require.Equal(t, byte(tar.TypeSymlink), hs["bin/sh"].Typeflag)
	require.Equal(t, 1000, hs["etc/owned"].Uid)
	require.Equal(t, byte(tar.TypeChar), hs["dev/null"].Typeflag)
	require.Equal(t, int64(3), hs["dev/null"].Devminor)
	require.True(t, hs["bin/ls"].Typeflag == tar.TypeLink || hs["bin/busybox"].Typeflag == tar.TypeLink)

	// The same inputs: no rebuild, same image.
	start = time.Now()
	again := build(t, o)
	noop := time.Since(start)
	t.Logf("no-op rebuild took %s", noop.Round(time.Millisecond))
	require.Equal(t, m.ID, again.ID)
	require.Equal(t, m.Created, again.Created, "not rebuilt")
	require.Less(t, noop, 5*time.Second)

	latest, err := image.Latest(o.CacheDir)
	require.NoError(t, err)
	require.Equal(t, m.ID, latest.ID)
	found, err := image.Find(o.CacheDir, m.ID[:6])
	require.NoError(t, err)
	require.Equal(t, m.ID, found.ID)

	// A different rootfs size is a different image.
	o.RootfsSizeMB = 48
	other := build(t, o)
	require.NotEqual(t, m.ID, other.ID)
	latest, err = image.Latest(o.CacheDir)
	require.NoError(t, err)
	require.Equal(t, other.ID, latest.ID)

	// A damaged image fails Verify and the next Build replaces it.
	require.NoError(t, os.Chmod(m.KernelPath(), 0o644))
	require.NoError(t, os.WriteFile(m.KernelPath(), []byte("damaged"), 0o644))
	require.ErrorIs(t, image.Verify(m), types.ErrInvalid)
	o.RootfsSizeMB = 64
	fixed := build(t, o)
	require.Equal(t, m.ID, fixed.ID)
	require.NoError(t, image.Verify(fixed))
	require.NotEqual(t, m.Created, fixed.Created)
}

func TestBuildFromTar(t *testing.T) {
	needBuildTools(t)
	agent := testenv.BuildBinary(t, "fc-agent")
	tree := smallTree(t)
	tarFile := filepath.Join(t.TempDir(), "root.tar")
	f, err := os.Create(tarFile)
	require.NoError(t, err)
	require.NoError(t, image.WriteTar(f, tree))
	require.NoError(t, f.Close())

	// Two concurrent builds of the same image: one builds, the other
	// waits for it and finds it done.
	o := image.Options{CacheDir: t.TempDir(), DebCacheDir: sharedDebs(), AgentPath: agent, FromTar: tarFile, RootfsSizeMB: 64, Logger: testLogger(t)}
	var wg sync.WaitGroup
	results := make([]*image.Manifest, 2)
	errs := make([]error, 2)
	for i := range results {
		wg.Go(func() { results[i], errs[i] = image.Build(context.Background(), o) })
	}
	wg.Wait()
	for _, err := range errs {
		if errors.Is(err, types.ErrUnavailable) {
			testenv.Skip(t, "cannot build an image here: %v", err)
		}
		require.NoError(t, err)
	}
	m := results[0]
	require.Equal(t, m.ID, results[1].ID)
	require.Equal(t, m.Created, results[1].Created, "built once")
	ents, err := os.ReadDir(filepath.Join(o.CacheDir, "images"))
	require.NoError(t, err)
	for _, e := range ents {
		require.False(t, strings.HasPrefix(e.Name(), ".build-") || strings.HasPrefix(e.Name(), ".work-"), "left behind: %s", e.Name())
	}
	checkImage(t, m, agent)
	require.Equal(t, "tar:"+tarFile, m.Rootfs.Source)
	require.Contains(t, debugfs(t, m.RootfsPath(), "stat /bin/su"), "Mode:  04755")
	require.Contains(t, debugfs(t, m.RootfsPath(), "ls -l /bin"), "busybox")
}

func TestLatestEmpty(t *testing.T) {
	_, err := image.Latest(t.TempDir())
	require.ErrorIs(t, err, types.ErrNotFound)
	require.Contains(t, err.Error(), "make guest-image")
}

func TestBuildOptionErrors(t *testing.T) {
	ctx := context.Background()
	_, err := image.Build(ctx, image.Options{CacheDir: t.TempDir()})
	require.ErrorIs(t, err, types.ErrInvalid)
	require.Contains(t, err.Error(), "make build")
	agent := filepath.Join(t.TempDir(), "fc-agent")
	require.NoError(t, os.WriteFile(agent, []byte("x"), 0o755))
	_, err = image.Build(ctx, image.Options{CacheDir: t.TempDir(), AgentPath: agent, FromDir: "/", FromTar: "/x.tar"})
	require.ErrorIs(t, err, types.ErrInvalid)
	_, err = image.Build(ctx, image.Options{CacheDir: t.TempDir(), AgentPath: agent, FromDir: "/", RootfsSizeMB: 1})
	require.ErrorIs(t, err, types.ErrInvalid)
	_, err = image.Build(ctx, image.Options{CacheDir: t.TempDir(), AgentPath: agent, Mirror: "ftp://x", Suite: "bookworm"})
	require.ErrorIs(t, err, types.ErrInvalid)
}

// TestGuestImage builds (or reuses) the default debootstrap image that the
// QEMU backend's tests boot.
func TestGuestImage(t *testing.T) {
	if testing.Short() {
		testenv.Skip(t, "-short: the full guest image build runs debootstrap; run without -short")
	}
	m := testenv.GuestImage(t)
	checkImage(t, m, testenv.BuildBinary(t, "fc-agent"))
	require.Equal(t, "debootstrap bookworm minbase", m.Rootfs.Source)
	require.Equal(t, image.DefaultRootfsSizeMB, m.Rootfs.SizeMB)
	require.Contains(t, debugfs(t, m.RootfsPath(), "ls -l /usr/bin"), "apt")
	require.Contains(t, tarNames(t, m.RootfsTarPath()), "etc/debian_version")
	require.NotContains(t, debugfs(t, m.RootfsPath(), "ls /"), "debootstrap")

	// A rebuild with the same inputs is a no-op.
	start := time.Now()
	again := build(t, image.Options{AgentPath: testenv.BuildBinary(t, "fc-agent")})
	t.Logf("no-op rebuild of the guest image took %s", time.Since(start).Round(time.Millisecond))
	require.Equal(t, m.ID, again.ID)
	require.Equal(t, m.Created, again.Created)
}
