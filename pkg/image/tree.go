package image

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// ErrUnsafePath is wrapped by ExtractTar for an entry that would land
// outside the destination.
var ErrUnsafePath = fmt.Errorf("%w: unsafe path in archive", types.ErrInvalid)

// safeName cleans an archive entry name to a path relative to the root,
// rejecting names that climb out of it. A leading "/" or "./" is allowed
// (tar -C / . and docker export write those).
func safeName(name string) (string, error) {
	if strings.ContainsRune(name, 0) {
		return "", fmt.Errorf("%w: %q contains a NUL byte", ErrUnsafePath, name)
	}
	for _, part := range strings.Split(name, "/") {
		if part == ".." {
			return "", fmt.Errorf("%w: %q climbs out of the root with \"..\"; re-create the archive from inside the tree (tar -C DIR .)", ErrUnsafePath, name)
		}
	}
	return strings.TrimPrefix(path.Clean("/"+name), "/"), nil
}

// ExtractTar unpacks the tar stream r into dir (which must exist), keeping
// modes, owners, device nodes, links and mtimes. Entries with ".." in
// their names or link targets are rejected; every file operation goes
// through os.Root, so symlinks inside the archive cannot redirect writes
// outside dir either.
func ExtractTar(r io.Reader, dir string) error {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return fmt.Errorf("opening %s: %w", dir, err)
	}
	defer root.Close()
	type dirTime struct {
		name string
		t    time.Time
	}
	var dirTimes []dirTime
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("%w: reading the tar archive: %v", types.ErrInvalid, err)
		}
		name, err := safeName(h.Name)
		if err != nil {
			return err
		}
		if name == "" {
			name = "."
		}
		if parent := path.Dir(name); parent != "." {
			if err := root.MkdirAll(parent, 0o755); err != nil {
				return fmt.Errorf("extracting %s: %w", h.Name, err)
			}
		}
		mode := fs.FileMode(h.Mode).Perm()
		if h.Typeflag != tar.TypeDir && name != "." {
			// Replace whatever is there, as tar does.
			if fi, err := root.Lstat(name); err == nil && !fi.IsDir() {
				if err := root.Remove(name); err != nil {
					return fmt.Errorf("extracting %s: %w", h.Name, err)
				}
			}
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := root.Mkdir(name, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
				return fmt.Errorf("extracting %s: %w", h.Name, err)
			}
			dirTimes = append(dirTimes, dirTime{name, h.ModTime})
		case tar.TypeReg:
			f, err := root.OpenFile(name, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
			if err != nil {
				return fmt.Errorf("extracting %s: %w", h.Name, err)
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("extracting %s: %w", h.Name, err)
			}
		case tar.TypeSymlink:
			// Absolute targets are fine: they resolve inside the guest.
			// os.Root refuses to follow them out of dir while extracting.
			if err := root.Symlink(h.Linkname, name); err != nil {
				return fmt.Errorf("extracting symlink %s: %w", h.Name, err)
			}
		case tar.TypeLink:
			target, err := safeName(h.Linkname)
			if err != nil {
				return fmt.Errorf("hard link %s: %w", h.Name, err)
			}
			if err := root.Link(target, name); err != nil {
				return fmt.Errorf("extracting hard link %s -> %s: %w", h.Name, h.Linkname, err)
			}
			continue // the link shares the target's inode and metadata
		case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
			if err := mknodIn(root, name, h); err != nil {
				return fmt.Errorf("extracting device %s: %w", h.Name, err)
			}
		case tar.TypeXGlobalHeader:
			continue
		default:
			return fmt.Errorf("%w: tar entry %s has unsupported type %q", types.ErrNotSupported, h.Name, h.Typeflag)
		}
		if err := root.Lchown(name, h.Uid, h.Gid); err != nil {
			return fmt.Errorf("setting the owner of %s: %w", h.Name, err)
		}
		if h.Typeflag != tar.TypeSymlink {
			// Chmod after chown: chown clears set-id bits.
			if err := root.Chmod(name, mode|setIDBits(h.Mode)); err != nil {
				return fmt.Errorf("setting the mode of %s: %w", h.Name, err)
			}
			if h.Typeflag != tar.TypeDir {
				if err := root.Chtimes(name, h.ModTime, h.ModTime); err != nil {
					return fmt.Errorf("setting the mtime of %s: %w", h.Name, err)
				}
			}
		}
	}
	// Directory mtimes last, since creating their children changed them.
	for i := len(dirTimes) - 1; i >= 0; i-- {
		_ = root.Chtimes(dirTimes[i].name, dirTimes[i].t, dirTimes[i].t)
	}
	return nil
}

func setIDBits(mode int64) fs.FileMode {
	var m fs.FileMode
	if mode&0o4000 != 0 {
		m |= fs.ModeSetuid
	}
	if mode&0o2000 != 0 {
		m |= fs.ModeSetgid
	}
	if mode&0o1000 != 0 {
		m |= fs.ModeSticky
	}
	return m
}

// mknodIn makes a device node or fifo inside root. os.Root has no Mknod,
// so the parent is opened through root and the node made relative to it.
func mknodIn(root *os.Root, name string, h *tar.Header) error {
	parent, err := root.Open(path.Dir(name))
	if err != nil {
		return err
	}
	defer parent.Close()
	mode := uint32(h.Mode & 0o7777)
	switch h.Typeflag {
	case tar.TypeChar:
		mode |= unix.S_IFCHR
	case tar.TypeBlock:
		mode |= unix.S_IFBLK
	default:
		mode |= unix.S_IFIFO
	}
	dev := int(unix.Mkdev(uint32(h.Devmajor), uint32(h.Devminor)))
	return unix.Mknodat(int(parent.Fd()), path.Base(name), mode, dev)
}

// walkTree calls fn for every entry under dir in sorted order, with its
// slash-separated path relative to dir ("" is dir itself).
func walkTree(dir string, fn func(rel string, p string, fi fs.FileInfo) error) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		if rel == "." {
			rel = ""
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		return fn(filepath.ToSlash(rel), p, fi)
	})
}

// WriteTar writes the tree under dir as an uncompressed tar with numeric
// owners, sorted entries and hard links kept, for `docker import`.
func WriteTar(w io.Writer, dir string) error {
	tw := tar.NewWriter(w)
	seen := map[[2]uint64]string{} // (dev, inode) -> first name, for hard links
	err := walkTree(dir, func(rel, p string, fi fs.FileInfo) error {
		if rel == "" {
			return nil
		}
		link := ""
		if fi.Mode()&fs.ModeSymlink != 0 {
			var err error
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		h, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		h.Name = rel
		if fi.IsDir() {
			h.Name += "/"
		}
		// Names on this host mean nothing in the guest.
		h.Uname, h.Gname = "", ""
		h.Format = tar.FormatPAX
		h.AccessTime, h.ChangeTime = time.Time{}, time.Time{}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return fmt.Errorf("%s: no stat information", p)
		}
		if fi.Mode().IsRegular() && st.Nlink > 1 {
			key := [2]uint64{uint64(st.Dev), st.Ino}
			if first, ok := seen[key]; ok {
				h.Typeflag, h.Linkname, h.Size = tar.TypeLink, first, 0
				return tw.WriteHeader(h)
			}
			seen[key] = rel
		}
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		if !fi.Mode().IsRegular() {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := io.Copy(tw, f); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("writing a tar of %s: %w", dir, err)
	}
	return tw.Close()
}

// HashTree returns a sha256 over every path under dir with its type, mode,
// owner, device numbers, link target and contents, in sorted order. Mtimes
// are left out, so copying a tree keeps its hash.
func HashTree(dir string) (string, error) {
	h := sha256.New()
	err := walkTree(dir, func(rel, p string, fi fs.FileInfo) error {
		var uid, gid uint32
		var rdev uint64
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			uid, gid, rdev = st.Uid, st.Gid, st.Rdev
		}
		fmt.Fprintf(h, "%q %o %d:%d %d", rel, uint32(fi.Mode()), uid, gid, rdev)
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			l, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(h, " -> %q", l)
		case fi.Mode().IsRegular():
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			fh := sha256.New()
			if _, err := io.Copy(fh, f); err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			fmt.Fprintf(h, " %x", fh.Sum(nil))
		}
		h.Write([]byte{'\n'})
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("hashing the tree %s: %w", dir, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// hashFile returns the sha256 of a file in hex and its size.
func hashFile(p string) (string, int64, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, fmt.Errorf("hashing %s: %w", p, err)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}
