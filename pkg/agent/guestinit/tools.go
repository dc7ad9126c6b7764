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

// toolDisks returns the tool disks (types.IsToolDiskSerial) sys lists.
func toolDisks(sys string) ([]disk, error) {
	disks, err := listDisks(sys)
	if err != nil {
		return nil, err
	}
	var tools []disk
	for _, d := range disks {
		if types.IsToolDiskSerial(d.serial) {
			tools = append(tools, d)
		}
	}
	return tools, nil
}

// mountToolDisks mounts every tool disk read-only at the Dir its marker
// names under the tools root. It runs in the final root file system, so
// the mounts are where commands see them. Nothing here is fatal: a disk
// that cannot be mounted or has no valid marker is logged and skipped,
// and the guest boots without it. A Dir that is a mount point already is
// left as it is, so a second run changes nothing.
func mountToolDisks(ctx context.Context, root string, log *slog.Logger) {
	start := time.Now()
	disks, err := toolDisks(sysfsRoot)
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
	node, err := waitForSerial(ctx, sysfsRoot, devRoot, d.serial, toolDiskWait, log)
	if err != nil {
		return vol, err
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
