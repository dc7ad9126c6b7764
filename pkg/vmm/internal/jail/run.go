package jail

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Main is aether-jailer: it confines itself as args (without the program
// name) say and exec()s the VMM. It returns only on failure, after writing
// why to stderr (the VMM's log), with the exit code to use.
//
// It must be started as root in a mount namespace of its own whose mounts
// are private (Manager.Command does both).
func Main(args []string, stderr io.Writer) int {
	spec, err := ParseArgs(args)
	if err == nil {
		err = Run(spec)
	}
	fmt.Fprintf(stderr, "aether-jailer: %v\n", err)
	return 126
}

// Run confines the calling process as spec says and exec()s spec.Argv. It
// returns only on failure. Order matters:
//  1. join the cgroups, while the cgroup file systems are visible;
//  2. build the jail: a tmpfs on spec.Root with the bind mounts, made
//     read-only;
//  3. pivot_root into it and drop the old root;
//  4. drop the capability bounding set, then the groups, gid and uid
//     (which clears every capability), and set no_new_privs;
//  5. load the seccomp filter, which denies setuid and mount, so last;
//  6. execve, still allowed, which keeps this pid for the VMM.
func Run(spec Spec) error {
	// no_new_privs is set on the calling thread and the filter loaded
	// from it (TSYNC then spreads both), so the goroutine must not move
	// to another thread in between.
	runtime.LockOSThread()
	if err := spec.validate(); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("must be started as root (it drops to the VM's uid itself)")
	}
	if err := notInHostMountNS(); err != nil {
		return err
	}
	for _, d := range spec.Cgroups {
		if err := os.WriteFile(filepath.Join(d, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
			return fmt.Errorf("joining cgroup %s: %w", d, err)
		}
	}
	if err := buildRoot(spec); err != nil {
		return err
	}
	if err := pivot(spec.Root); err != nil {
		return err
	}
	if err := dropPrivileges(spec.UID, spec.GID); err != nil {
		return err
	}
	if err := loadSeccomp(); err != nil {
		return err
	}
	err := syscall.Exec(spec.Argv[0], spec.Argv, os.Environ())
	return fmt.Errorf("executing %s in the jail: %w", spec.Argv[0], err)
}

// notInHostMountNS refuses to mount anything in the host's mount
// namespace: the jailer's mounts must die with it.
func notInHostMountNS() error {
	self, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		return fmt.Errorf("reading the mount namespace: %w", err)
	}
	init, err := os.Readlink("/proc/1/ns/mnt")
	if err == nil && init == self {
		return errors.New("runs in the host's mount namespace; start it with CLONE_NEWNS (jail.Manager.Command does)")
	}
	return nil
}

// buildRoot mounts the jail's tmpfs on root and the bind mounts in it,
// then makes the tmpfs read-only.
func buildRoot(spec Spec) error {
	root := spec.Root
	if err := unix.Mount("tmpfs", root, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0755,size=1m,nr_inodes=4096"); err != nil {
		return fmt.Errorf("mounting the jail's tmpfs on %s: %w", root, err)
	}
	type bind struct {
		path  string
		flags uintptr
	}
	const common = unix.MS_NOSUID
	var binds []bind
	for _, p := range spec.ReadOnly {
		binds = append(binds, bind{p, common | unix.MS_NODEV | unix.MS_RDONLY})
	}
	for _, p := range spec.ReadWrite {
		binds = append(binds, bind{p, common | unix.MS_NODEV | unix.MS_NOEXEC})
	}
	// Parents before children, so a file bound under a bound directory
	// lands on top of it.
	slices.SortStableFunc(binds, func(a, b bind) int { return strings.Count(a.path, "/") - strings.Count(b.path, "/") })
	for _, b := range binds {
		if err := bindInto(root, b.path, b.flags); err != nil {
			return err
		}
	}
	if err := makeDevices(root, spec.Devices, spec.UID, spec.GID); err != nil {
		return err
	}
	if err := unix.Mount("", root, "", unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("making the jail's root read-only: %w", err)
	}
	return nil
}

// makeDevices gives the jail its own /dev: a small tmpfs (the root's is
// nodev) holding a node for each device, made with the host node's type,
// number and permission bits but owned by the VM's uid, as Firecracker's
// jailer does. The host's nodes may be root's alone (/dev/net/tun and
// /dev/kvm often are), and are not touched; the VMM can open its own.
func makeDevices(root string, devices []string, uid, gid int) error {
	if len(devices) == 0 {
		return nil
	}
	dev := filepath.Join(root, "dev")
	if err := mkdirUnder(root, "/dev"); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", dev, "tmpfs", unix.MS_NOSUID|unix.MS_NOEXEC, "mode=0755,size=64k,nr_inodes=64"); err != nil {
		return fmt.Errorf("mounting the jail's /dev: %w", err)
	}
	for _, p := range devices {
		if !strings.HasPrefix(p, "/dev/") {
			return fmt.Errorf("jail: device %s is not under /dev", p)
		}
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			return fmt.Errorf("jail: device %s: %w", p, err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFCHR && st.Mode&unix.S_IFMT != unix.S_IFBLK {
			return fmt.Errorf("jail: %s is not a device node", p)
		}
		if err := mkdirUnder(root, filepath.Dir(p)); err != nil {
			return err
		}
		dst := filepath.Join(root, p)
		if err := unix.Mknod(dst, st.Mode, int(st.Rdev)); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("jail: making device %s: %w", p, err)
		}
		// mknod applies the umask; the host's bits are what is meant.
		if err := unix.Chmod(dst, st.Mode&0o777); err != nil {
			return fmt.Errorf("jail: device %s: %w", p, err)
		}
		if err := unix.Lchown(dst, uid, gid); err != nil {
			return fmt.Errorf("jail: device %s: %w", p, err)
		}
	}
	if err := unix.Mount("", dev, "", unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("making the jail's /dev read-only: %w", err)
	}
	return nil
}

// bindInto makes src visible at the same path under root with flags. A
// symbolic link is recreated as the same link.
func bindInto(root, src string, flags uintptr) error {
	fi, err := os.Lstat(src)
	if err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	dst := filepath.Join(root, src)
	if err := mkdirUnder(root, filepath.Dir(src)); err != nil {
		return err
	}
	if fi.Mode()&os.ModeSymlink != 0 {
		target, err := os.Readlink(src)
		if err != nil {
			return fmt.Errorf("jail: %w", err)
		}
		if err := os.Symlink(target, dst); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("jail: linking %s: %w", src, err)
		}
		return nil
	}
	if fi.IsDir() {
		err = os.Mkdir(dst, 0o755)
	} else {
		var f *os.File
		if f, err = os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644); err == nil {
			f.Close()
		}
	}
	if err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("jail: making the mount point for %s: %w", src, err)
	}
	// A non-recursive bind: mounts under src (a /usr with submounts) stay
	// out of the jail.
	if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("jail: binding %s: %w", src, err)
	}
	// Bind mounts take their flags only on a remount.
	if err := unix.Mount("", dst, "", unix.MS_REMOUNT|unix.MS_BIND|flags, ""); err != nil {
		return fmt.Errorf("jail: restricting %s: %w", src, err)
	}
	return nil
}

// mkdirUnder makes dir (absolute, as seen in the jail) under root, refusing
// to follow a symbolic link it made itself out of the jail: each component
// must be a real directory of the tmpfs or a bind-mounted one.
func mkdirUnder(root, dir string) error {
	cur := root
	for _, part := range strings.Split(strings.Trim(dir, "/"), "/") {
		if part == "" {
			continue
		}
		cur = filepath.Join(cur, part)
		fi, err := os.Lstat(cur)
		switch {
		case errors.Is(err, os.ErrNotExist):
			if err := os.Mkdir(cur, 0o755); err != nil {
				return fmt.Errorf("jail: making %s: %w", cur, err)
			}
		case err != nil:
			return fmt.Errorf("jail: %w", err)
		case !fi.IsDir():
			return fmt.Errorf("jail: %s is not a directory in the jail (a symbolic link?); name the real path instead", strings.TrimPrefix(cur, root))
		}
	}
	return nil
}

// pivot makes root the process's / and detaches the old one (the "pivot
// onto itself" of runc: no put_old directory is needed).
func pivot(root string) error {
	if err := unix.Chdir(root); err != nil {
		return fmt.Errorf("entering the jail: %w", err)
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root into %s: %w", root, err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detaching the host's root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("entering the jail: %w", err)
	}
	return nil
}

// dropPrivileges empties the capability bounding set, becomes uid/gid
// with no supplementary groups (which clears the permitted, effective and
// ambient capabilities, since keep-caps is off) and sets no_new_privs.
func dropPrivileges(uid, gid int) error {
	for c := 0; ; c++ {
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
			if errors.Is(err, unix.EINVAL) && c > 0 {
				break // past the kernel's last capability
			}
			return fmt.Errorf("dropping capability %d from the bounding set: %w", c, err)
		}
	}
	// Go applies these to every thread of the process.
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("clearing groups: %w", err)
	}
	if err := syscall.Setresgid(gid, gid, gid); err != nil {
		return fmt.Errorf("becoming gid %d: %w", gid, err)
	}
	if err := syscall.Setresuid(uid, uid, uid); err != nil {
		return fmt.Errorf("becoming uid %d: %w", uid, err)
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("setting no_new_privs: %w", err)
	}
	return nil
}
