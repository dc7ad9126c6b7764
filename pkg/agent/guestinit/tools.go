//go:build linux

package guestinit

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// toolStagingDir holds the mount point of a tool disk while its marker is
// read, before the disk moves to the Dir the marker names.
const toolStagingDir = "/run/aetherium-init/tools"

// toolDiskWait bounds the wait for a tool disk's device node: sysfs lists
// it already (virtio_blk probed every disk when it loaded), and devtmpfs
// follows within milliseconds.
const toolDiskWait = 2 * time.Second

// toolMountFlags mount a tool disk: read-only, and nothing on it can be
// a device or gain privileges.
const toolMountFlags = unix.MS_RDONLY | unix.MS_NODEV | unix.MS_NOSUID

// toolDisks returns the tool disks sys lists: those whose serial says so
// (types.IsToolDiskSerial, set by the qemu backend) and, because
// Firecracker cannot set a drive's serial, virtio disks (vd*) whose ext4
// label under dev is types.ToolDiskLabel. Either way the marker on the
// disk, checked when it is mounted, decides what it is.
func toolDisks(sys, dev string) ([]disk, error) {
	entries, err := os.ReadDir(filepath.Join(sys, "block"))
	if err != nil {
		return nil, fmt.Errorf("listing block devices: %w", err)
	}
	serials := map[string]string{}
	if disks, err := listDisks(sys); err == nil {
		for _, d := range disks {
			serials[d.name] = d.serial
		}
	}
	var tools []disk
	for _, e := range entries {
		d := disk{name: e.Name(), serial: serials[e.Name()]}
		switch {
		case types.IsToolDiskSerial(d.serial):
		case strings.HasPrefix(d.name, "vd") && ext4Label(filepath.Join(dev, d.name)) == types.ToolDiskLabel:
			d.byLabel = true
		default:
			continue
		}
		tools = append(tools, d)
	}
	slices.SortFunc(tools, func(a, b disk) int { return strings.Compare(a.name, b.name) })
	return tools, nil
}

// ext4Label reads the volume label from the ext4 superblock of the block
// device (or image) at path, "" when it cannot be read or is not ext4.
// The superblock starts at byte 1024; its magic 0xEF53 is at offset 0x38
// and the 16-byte label at 0x78. Read by hand: blkid is not in the
// initramfs and no Go library reads just this.
func ext4Label(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	sb := make([]byte, 0x88)
	if _, err := f.ReadAt(sb, 1024); err != nil {
		return ""
	}
	if sb[0x38] != 0x53 || sb[0x39] != 0xEF {
		return ""
	}
	return strings.TrimRight(string(sb[0x78:0x88]), "\x00")
}

// mountToolDisks mounts every tool disk read-only at the Dir its marker
// names under the tools root. It runs in the final root file system, so
// the mounts are where commands see them. Nothing here is fatal: a disk
// that cannot be mounted or has no valid marker is logged and skipped,
// and the guest boots without it. A Dir that is a mount point already is
// left as it is, so a second run changes nothing.
func mountToolDisks(ctx context.Context, root string, log *slog.Logger) {
	start := time.Now()
	disks, err := toolDisks(sysfsRoot, devRoot)
	if err != nil {
		log.Error("TOOL DISKS SKIPPED: cannot list the disks", "err", err)
		return
	}
	mounted := 0
	for _, d := range disks {
		vol, err := mountToolDisk(ctx, d, root, log)
		if err != nil {
			log.Error("TOOL DISK SKIPPED; its tools are not on PATH", "serial", d.serial, "device", d.name, "err", err)
			continue
		}
		mounted++
		log.Info("mounted tool disk", "serial", d.serial, "device", d.name, "key", vol.Key, "dir", vol.Dir)
	}
	log.Info("tool disks", "root", root, "found", len(disks), "mounted", mounted, "took", time.Since(start))
}

// mountToolDisk mounts one tool disk at a staging point, checks its
// marker against root and moves the mount to the volume's Dir.
func mountToolDisk(ctx context.Context, d disk, root string, log *slog.Logger) (vol types.ToolVolume, err error) {
	node := filepath.Join(devRoot, d.name) // found by its label: the node was read
	if !d.byLabel {
		if node, err = waitForSerial(ctx, sysfsRoot, devRoot, d.serial, toolDiskWait, log); err != nil {
			return vol, err
		}
	}
	staging := filepath.Join(toolStagingDir, d.name)
	if err := os.MkdirAll(staging, 0o700); err != nil {
		return vol, fmt.Errorf("creating staging mount point %s: %w", staging, err)
	}
	defer os.Remove(staging)
	if err := unix.Mount(node, staging, "ext4", toolMountFlags, ""); err != nil {
		return vol, fmt.Errorf("mounting %s read-only as ext4: %w; a tool disk is an ext4 image the host made from a tool cache entry", node, err)
	}
	moved := false
	defer func() {
		if !moved {
			if uerr := unix.Unmount(staging, unix.MNT_DETACH); uerr != nil {
				log.Warn("cannot unmount a skipped tool disk", "staging", staging, "err", uerr)
			}
		}
	}()
	vol, err = agent.ReadToolMarker(staging, root)
	if errors.Is(err, fs.ErrNotExist) {
		return vol, fmt.Errorf("the disk has no %s at its top, so it names no tool volume: %w", types.ToolMarkerFile, err)
	}
	if err != nil {
		return vol, err
	}
	if isMountPoint(vol.Dir) {
		log.Info("tool volume already mounted", "dir", vol.Dir)
		return vol, nil
	}
	if err := os.MkdirAll(vol.Dir, 0o755); err != nil {
		return vol, fmt.Errorf("creating mount point %s: %w; boot with a writable root disk or create the tools root %s in the image", vol.Dir, err, root)
	}
	if err := unix.Mount(staging, vol.Dir, "", unix.MS_MOVE, ""); err != nil {
		return vol, fmt.Errorf("moving the tool disk from %s to %s: %w", staging, vol.Dir, err)
	}
	moved = true
	return vol, nil
}
