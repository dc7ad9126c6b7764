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

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Where the kernel lists block devices and devtmpfs creates their nodes.
// Functions take them as arguments so tests can point them at fake trees.
const (
	sysfsRoot = "/sys"
	devRoot   = "/dev"
)

// disk is a whole block device that has a serial (virtio-blk exposes it
// as /sys/block/<name>/serial).
type disk struct {
	name, serial string
	// byLabel is set for a tool disk found by its file system label
	// rather than its serial (Firecracker sets no serials).
	byLabel bool
}

// listDisks returns the block devices under sys/block that have a
// serial, sorted by name. Devices without one (loop, ram, a virtio-blk
// disk given no serial) are left out.
func listDisks(sys string) ([]disk, error) {
	entries, err := os.ReadDir(filepath.Join(sys, "block"))
	if err != nil {
		return nil, fmt.Errorf("listing block devices: %w", err)
	}
	var disks []disk
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(sys, "block", e.Name(), "serial"))
		if err != nil {
			continue
		}
		// The kernel ends it with a newline; a serial shorter than the
		// 20-byte field may carry NULs.
		serial := strings.TrimRight(strings.TrimSpace(string(b)), "\x00")
		if serial != "" {
			disks = append(disks, disk{name: e.Name(), serial: serial})
		}
	}
	slices.SortFunc(disks, func(a, b disk) int { return strings.Compare(a.name, b.name) })
	return disks, nil
}

// findDisk returns the device node (under dev) of the disk whose serial
// is serial, once sysfs lists it and devtmpfs has created its node, or ""
// while either is missing. Two disks with one serial are an error: the
// host must never attach them.
func findDisk(sys, dev, serial string) (string, error) {
	disks, err := listDisks(sys)
	if err != nil {
		return "", err
	}
	var found []string
	for _, d := range disks {
		if d.serial == serial {
			found = append(found, d.name)
		}
	}
	switch len(found) {
	case 0:
		return "", nil
	case 1:
	default:
		return "", fmt.Errorf("%w: disks %s all have serial %q; give every disk a distinct serial", types.ErrInvalid, strings.Join(found, ", "), serial)
	}
	node := filepath.Join(dev, found[0])
	if _, err := os.Stat(node); errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	return node, nil
}

// waitForSerial polls until the disk with the given serial has a device
// node and returns its path. virtio_blk probes its disks when it loads,
// but devtmpfs creates the nodes a moment later.
func waitForSerial(ctx context.Context, sys, dev, serial string, limit time.Duration, log *slog.Logger) (string, error) {
	start := time.Now()
	var node string
	found, err := pollFor(ctx, limit, func() (bool, error) {
		var err error
		node, err = findDisk(sys, dev, serial)
		return node != "", err
	})
	if err != nil {
		return "", err
	}
	if !found {
		return "", fmt.Errorf("no disk with serial %q appeared within %s: %w; attach the disk as virtio-blk with serial=%s and list virtio_blk in %s",
			serial, limit, types.ErrUnavailable, serial, ModulesOrder)
	}
	log.Info("disk appeared", "serial", serial, "device", node, "waited", time.Since(start))
	return node, nil
}

// pollFor calls check every few milliseconds until it reports done or
// fails, or until limit passes or ctx ends (found is then false).
func pollFor(ctx context.Context, limit time.Duration, check func() (done bool, err error)) (found bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if done, err := check(); done || err != nil {
			return done, err
		}
		select {
		case <-ctx.Done():
			return false, nil
		case <-tick.C:
		}
	}
}
