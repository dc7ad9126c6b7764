package firecracker

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Copy methods reported by cloneFile.
const (
	copyReflink = "reflink"
	copySparse  = "sparse copy"
	copyLink    = "hard link"
)

// cloneFile makes dst a private, writable copy of src: a reflink (FICLONE,
// which shares blocks copy-on-write on btrfs, XFS and similar) when the
// file system can, otherwise a copy that keeps src's holes so a mostly empty
// ext4 image stays small. Firecracker needs a plain raw file per VM, so an
// overlay at the block layer is not an option. dst appears only once
// complete. It returns the method used.
func cloneFile(src, dst string, perm os.FileMode) (string, error) {
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return "", err
	}
	tmp, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".*")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	method := copyReflink
	if err := unix.IoctlFileClone(int(tmp.Fd()), int(in.Fd())); err != nil {
		method = copySparse
		if err := sparseCopy(tmp, in, fi.Size()); err != nil {
			tmp.Close()
			return "", fmt.Errorf("copying %s to %s: %w", src, dst, err)
		}
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return "", err
	}
	return method, nil
}

// sparseCopy copies the data extents of in (found with SEEK_DATA and
// SEEK_HOLE) and leaves the holes as holes.
func sparseCopy(out, in *os.File, size int64) error {
	if err := out.Truncate(size); err != nil {
		return err
	}
	ifd := int(in.Fd())
	var off int64
	for off < size {
		data, err := unix.Seek(ifd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole remains
		} else if err != nil {
			// No SEEK_DATA support: copy everything.
			if _, err := in.Seek(0, io.SeekStart); err != nil {
				return err
			}
			if _, err := out.Seek(0, io.SeekStart); err != nil {
				return err
			}
			_, err = io.Copy(out, in)
			return err
		}
		hole, err := unix.Seek(ifd, data, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		if _, err := out.Seek(data, io.SeekStart); err != nil {
			return err
		}
		if _, err := io.Copy(out, io.NewSectionReader(in, data, hole-data)); err != nil {
			return err
		}
		off = hole
	}
	return nil
}

// linkOrCopy puts src at dst for a jailed VMM, which sees only its chroot:
// a hard link when both are on one file system (no space used), a copy
// otherwise. An existing dst is kept.
func linkOrCopy(src, dst string) (string, error) {
	if _, err := os.Stat(dst); err == nil {
		return copyLink, nil
	}
	if err := os.Link(src, dst); err == nil {
		return copyLink, nil
	}
	return cloneFile(src, dst, 0o644)
}
