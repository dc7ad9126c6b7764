package image

import (
	"fmt"
	"io"
	"io/fs"
	"path"
	"sort"
	"strings"
)

// The initramfs is a newc cpio archive. It is written here by hand because
// the format is a fixed 110-byte ASCII header per entry and no cpio module
// is available from the module proxy; writing it ourselves also makes the
// archive deterministic (sorted names, zero mtimes, owner root, stable
// inode numbers), so its hash only changes when its contents do.

// CpioEntry is one file, directory or device node of an initramfs.
type CpioEntry struct {
	// Name is the path inside the archive, without a leading slash.
	Name string
	// Mode holds the type bits (fs.ModeDir, fs.ModeCharDevice|fs.ModeDevice)
	// and the permission bits.
	Mode fs.FileMode
	// Data is a regular file's contents.
	Data []byte
	// Major and Minor are a device node's numbers.
	Major, Minor uint32
}

// cpio mode type bits (from <sys/stat.h>).
const (
	cpioDir  = 0o040000
	cpioReg  = 0o100000
	cpioChr  = 0o020000
	cpioBlk  = 0o060000
	cpioLink = 0o120000
)

func cpioMode(m fs.FileMode) (uint32, error) {
	perm := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		perm |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		perm |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		perm |= 0o1000
	}
	switch {
	case m.IsDir():
		return cpioDir | perm, nil
	case m&fs.ModeCharDevice != 0:
		return cpioChr | perm, nil
	case m&fs.ModeDevice != 0:
		return cpioBlk | perm, nil
	case m&fs.ModeSymlink != 0:
		return cpioLink | perm, nil
	case m.IsRegular():
		return cpioReg | perm, nil
	}
	return 0, fmt.Errorf("cpio: unsupported file mode %v", m)
}

// WriteCpio writes entries as a newc archive, sorted by name so parents
// precede children, followed by the trailer. A symlink's Data is its target.
func WriteCpio(w io.Writer, entries []CpioEntry) error {
	es := append([]CpioEntry(nil), entries...)
	sort.Slice(es, func(i, j int) bool { return es[i].Name < es[j].Name })
	var off int64
	write := func(name string, mode uint32, ino int, e CpioEntry) error {
		nlink := 1
		if mode&0o170000 == cpioDir {
			nlink = 2
		}
		hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
			ino, mode, 0, 0, nlink, 0, len(e.Data), 0, 0, e.Major, e.Minor, len(name)+1, 0)
		n, err := io.WriteString(w, hdr+name+"\x00")
		off += int64(n)
		if err != nil {
			return err
		}
		if err := cpioPad(w, &off); err != nil {
			return err
		}
		n, err = w.Write(e.Data)
		off += int64(n)
		if err != nil {
			return err
		}
		return cpioPad(w, &off)
	}
	for i, e := range es {
		name := strings.TrimPrefix(path.Clean("/"+e.Name), "/")
		if name == "" || i > 0 && es[i-1].Name == e.Name {
			return fmt.Errorf("cpio: empty or duplicate entry name %q", e.Name)
		}
		mode, err := cpioMode(e.Mode)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if mode&0o170000 != cpioReg && mode&0o170000 != cpioLink && len(e.Data) > 0 {
			return fmt.Errorf("cpio: %s is not a regular file but has data", name)
		}
		if err := write(name, mode, i+1, e); err != nil {
			return fmt.Errorf("writing cpio entry %s: %w", name, err)
		}
	}
	if err := write("TRAILER!!!", 0, 0, CpioEntry{}); err != nil {
		return fmt.Errorf("writing cpio trailer: %w", err)
	}
	return nil
}

// cpioPad pads to a multiple of four bytes, as newc requires after the
// name and after the data.
func cpioPad(w io.Writer, off *int64) error {
	if r := *off % 4; r != 0 {
		n, err := w.Write(make([]byte, 4-r))
		*off += int64(n)
		return err
	}
	return nil
}
