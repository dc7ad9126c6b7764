//go:build linux

package guestinit_test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/image"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
)

// toolDiskImage makes an ext4 image holding a tool volume's content: its
// marker (unless marker is nil) and bin/hello, with the file system label
// label (none when empty).
func toolDiskImage(t *testing.T, marker *types.ToolVolume, label string) string {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "bin"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "bin", "hello"), []byte("#!/bin/sh\necho hello\n"), 0o755))
	if marker != nil {
		b, err := json.Marshal(marker)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dir, types.ToolMarkerFile), b, 0o644))
	}
	img := filepath.Join(t.TempDir(), "tool.ext4")
	args := []string{"-q", "-d", dir}
	if label != "" {
		args = append(args, "-L", label)
	}
	out, err := exec.Command("mkfs.ext4", append(args, img, "8M")...).CombinedOutput()
	require.NoError(t, err, "mkfs.ext4: %s", out)
	return img
}

// TestBootRootBySerialAndToolDisks boots the guest image under QEMU with
// the root disk named by serial and attached last, a tool disk and a disk
// without a marker, and reads the console: the init mounts the root by
// its serial, mounts the tool disk at its Dir, skips the other, and the
// agent puts the volume's bin directory on PATH.
func TestBootRootBySerialAndToolDisks(t *testing.T) {
	if _, err := exec.LookPath(qemu.DefaultBinary); err != nil {
		testenv.Skip(t, "%s is not installed; run ./scripts/setup.sh", qemu.DefaultBinary)
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		testenv.Skip(t, "mkfs.ext4 is not installed; install e2fsprogs")
	}
	m := testenv.GuestImage(t)

	const root = "/opt/aetherium-tools"
	vol := types.ToolVolume{Key: "hello-1.0.0-abcd", Dir: root + "/hello-1.0.0-abcd", BinPaths: []string{root + "/hello-1.0.0-abcd/bin"}}
	good := toolDiskImage(t, &vol, "")
	bare := toolDiskImage(t, nil, "")
	// As Firecracker attaches it: an opaque serial, known by its label.
	vol2 := types.ToolVolume{Key: "other-2.0.0-ef01", Dir: root + "/other-2.0.0-ef01", BinPaths: []string{root + "/other-2.0.0-ef01/bin"}}
	labelled := toolDiskImage(t, &vol2, types.ToolDiskLabel)

	console := filepath.Join(t.TempDir(), "console.log")
	cmdline := append([]string{"console=ttyS0", "reboot=t", "panic=-1"}, qemu.ClockArgs(qemu.AccelTCG)...)
	cmdline = append(cmdline,
		"root="+bootparams.RootBySerial(types.RootDiskSerial), "rw",
		// No vsock device here: the agent listens on TCP inside the guest.
		bootparams.Arg(bootparams.Listen, "tcp://:9999"),
		bootparams.Arg(bootparams.ToolsRoot, root))
	drive := func(id, file, serial, extra string) []string {
		return []string{
			"-drive", "id=" + id + ",file=" + file + ",format=raw,if=none" + extra,
			"-device", "virtio-blk-device,drive=" + id + ",serial=" + serial,
		}
	}
	args := []string{
		"-M", "microvm", "-accel", "tcg", "-m", "256M", "-smp", "1",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-chardev", "file,id=con,path=" + console, "-serial", "chardev:con",
		"-kernel", filepath.Join(m.Dir, image.FileVmlinuz),
		"-initrd", filepath.Join(m.Dir, image.FileInitramfs),
		"-append", strings.Join(cmdline, " "),
	}
	args = append(args, drive("t0", good, types.ToolDiskSerial(0), ",readonly=on")...)
	args = append(args, drive("t1", bare, types.ToolDiskSerial(1), ",readonly=on")...)
	args = append(args, drive("t2", labelled, "fc-opaque-7", ",readonly=on")...)
	// Last, so it is not the first disk: only its serial makes it the root.
	args = append(args, drive("root", filepath.Join(m.Dir, image.FileRootfs), types.RootDiskSerial, ",snapshot=on")...)

	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemu.DefaultBinary, args...)
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})

	// The registry's line comes after the init's, once the agent starts.
	wantLine := regexp.MustCompile(`tool volumes on PATH.*volumes=` + regexp.QuoteMeta(vol.Key))
	var log string
	for !wantLine.MatchString(log) {
		select {
		case err := <-exited:
			b, _ := os.ReadFile(console)
			t.Fatalf("qemu exited (%v) before the agent listed its tools; console:\n%s", err, b)
		case <-ctx.Done():
			t.Fatalf("the guest did not list its tools in time; console:\n%s", log)
		case <-time.After(100 * time.Millisecond):
		}
		b, _ := os.ReadFile(console)
		log = string(b)
	}
	require.Regexp(t, `disk appeared" serial=aet-root device=/dev/vd[b-z]`, log, "the root is found by serial, not order")
	require.Contains(t, log, `msg="mounted tool disk" serial=aet-tool-0`)
	require.Contains(t, log, "dir="+vol.Dir)
	require.Regexp(t, `TOOL DISK SKIPPED.*serial=aet-tool-1.*has no `+regexp.QuoteMeta(types.ToolMarkerFile), log)
	require.Contains(t, log, "path="+vol.BinPaths[0])
	require.Regexp(t, `msg="mounted tool disk" serial=fc-opaque-7 .*key=`+regexp.QuoteMeta(vol2.Key), log, "a labelled disk without a tool serial is a tool disk too")
	require.Contains(t, log, bootparams.ReadyLine)
}
