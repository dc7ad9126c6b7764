//go:build linux

package guestinit

import (
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// fakeDisks is a sysfs and a /dev tree holding block devices.
type fakeDisks struct {
	t        *testing.T
	sys, dev string
}

func newFakeDisks(t *testing.T) *fakeDisks {
	root := t.TempDir()
	f := &fakeDisks{t: t, sys: filepath.Join(root, "sys"), dev: filepath.Join(root, "dev")}
	require.NoError(t, os.MkdirAll(filepath.Join(f.sys, "block"), 0o755))
	require.NoError(t, os.MkdirAll(f.dev, 0o755))
	return f
}

// add lists disk name in sysfs with serial (none when empty, as for a loop
// device) and, with node set, creates its device node.
func (f *fakeDisks) add(name, serial string, node bool) {
	dir := filepath.Join(f.sys, "block", name)
	require.NoError(f.t, os.MkdirAll(dir, 0o755))
	if serial != "" {
		// As the kernel writes it: a newline after the serial.
		require.NoError(f.t, os.WriteFile(filepath.Join(dir, "serial"), []byte(serial+"\n"), 0o444))
	}
	if node {
		f.node(name)
	}
}

func (f *fakeDisks) node(name string) {
	require.NoError(f.t, os.WriteFile(filepath.Join(f.dev, name), nil, 0o600))
}

func TestListDisks(t *testing.T) {
	f := newFakeDisks(t)
	f.add("vdb", types.ToolDiskSerial(0), true)
	f.add("vda", types.RootDiskSerial, true)
	f.add("loop0", "", true)
	f.add("vdc", "padded\x00\x00", false)
	disks, err := listDisks(f.sys)
	require.NoError(t, err)
	require.Equal(t, []disk{{name: "vda", serial: "aet-root"}, {name: "vdb", serial: "aet-tool-0"}, {name: "vdc", serial: "padded"}}, disks)

	_, err = listDisks(filepath.Join(f.sys, "missing"))
	require.ErrorContains(t, err, "listing block devices")
}

func TestFindDisk(t *testing.T) {
	f := newFakeDisks(t)
	// The root is not the first disk: the serial, not the order, decides.
	f.add("vda", types.ToolDiskSerial(0), true)
	f.add("vdb", types.RootDiskSerial, true)
	f.add("vdc", "no-node-yet", false)

	node, err := findDisk(f.sys, f.dev, types.RootDiskSerial)
	require.NoError(t, err)
	require.Equal(t, filepath.Join(f.dev, "vdb"), node)

	node, err = findDisk(f.sys, f.dev, "no-node-yet")
	require.NoError(t, err)
	require.Empty(t, node, "sysfs lists it but devtmpfs has not created the node")

	node, err = findDisk(f.sys, f.dev, "absent")
	require.NoError(t, err)
	require.Empty(t, node)

	f.add("vdd", types.RootDiskSerial, true)
	_, err = findDisk(f.sys, f.dev, types.RootDiskSerial)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "vdb, vdd")
}

func TestWaitForSerial(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	f := newFakeDisks(t)
	f.add("vda", types.ToolDiskSerial(0), true)
	// The disk is probed, and its node created, while the init waits.
	go func() {
		time.Sleep(30 * time.Millisecond)
		f.add("vdb", types.RootDiskSerial, false)
		time.Sleep(30 * time.Millisecond)
		f.node("vdb")
	}()
	node, err := waitForSerial(t.Context(), f.sys, f.dev, types.RootDiskSerial, 5*time.Second, log)
	require.NoError(t, err)
	require.Equal(t, filepath.Join(f.dev, "vdb"), node)

	start := time.Now()
	_, err = waitForSerial(t.Context(), f.sys, f.dev, "absent", 50*time.Millisecond, log)
	require.ErrorIs(t, err, types.ErrUnavailable)
	require.ErrorContains(t, err, `no disk with serial "absent"`)
	require.Less(t, time.Since(start), 2*time.Second)
}

func TestRootBySerialParses(t *testing.T) {
	cfg, err := ParseCmdline("root=" + bootparams.RootBySerial(types.RootDiskSerial) + " ro")
	require.NoError(t, err)
	serial, ok := bootparams.RootSerial(cfg.Root)
	require.True(t, ok)
	require.Equal(t, types.RootDiskSerial, serial)
	for _, root := range []string{"/dev/vda", "SERIAL=", "myfs", ""} {
		_, ok := bootparams.RootSerial(root)
		require.False(t, ok, root)
	}
}

func TestToolDisks(t *testing.T) {
	f := newFakeDisks(t)
	f.add("vda", types.RootDiskSerial, true)
	f.add("vdc", types.ToolDiskSerial(1), true)
	f.add("vdb", types.ToolDiskSerial(0), true)
	f.add("vdd", "data", true)
	f.add("vde", "", true)
	// Firecracker's drives carry an opaque id for a serial; its tool
	// disks are known by their ext4 label instead.
	f.add("vdf", "fc-opaque-id", false)
	require.NoError(t, os.WriteFile(filepath.Join(f.dev, "vdf"), ext4Superblock(types.ToolDiskLabel), 0o600))
	f.add("vdg", "", false)
	require.NoError(t, os.WriteFile(filepath.Join(f.dev, "vdg"), ext4Superblock(types.ToolDiskLabel), 0o600))
	f.add("vdh", "", false)
	require.NoError(t, os.WriteFile(filepath.Join(f.dev, "vdh"), ext4Superblock("rootfs"), 0o600))
	disks, err := toolDisks(f.sys, f.dev)
	require.NoError(t, err)
	require.Equal(t, []disk{{"vdb", "aet-tool-0", false}, {"vdc", "aet-tool-1", false}, {"vdf", "fc-opaque-id", true}, {"vdg", "", true}}, disks)
}

// ext4Superblock is the start of an ext4 image with the given label.
func ext4Superblock(label string) []byte {
	b := make([]byte, 2048)
	b[1024+0x38], b[1024+0x39] = 0x53, 0xEF
	copy(b[1024+0x78:], label)
	return b
}

// TestExt4Label reads the label of a real image made by mkfs.ext4, as the
// tool cache makes them.
func TestExt4Label(t *testing.T) {
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		testenv.Skip(t, "mkfs.ext4 is not installed; run ./scripts/setup.sh (e2fsprogs)")
	}
	img := filepath.Join(t.TempDir(), "t.ext4")
	out, err := exec.Command(mkfs, "-q", "-F", "-L", types.ToolDiskLabel, img, "4M").CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Equal(t, types.ToolDiskLabel, ext4Label(img))
	require.Equal(t, "", ext4Label(filepath.Join(t.TempDir(), "missing")))
	require.NoError(t, os.WriteFile(img, make([]byte, 4096), 0o600))
	require.Equal(t, "", ext4Label(img), "no ext4 magic, no label")
}
