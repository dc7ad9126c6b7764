package network

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// SetTAPOwner makes uid and gid the owners of the persistent TAP name, so
// that a VMM running as that uid, without CAP_NET_ADMIN, can attach to it
// (a jailed VMM gets a uid per VM, so the manager-wide TAPOwner cannot
// serve). It acts in the calling thread's network namespace: call it
// inside VMNetwork.Do. It is idempotent.
func SetTAPOwner(name string, uid, gid int) error {
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("setting the owner of tap %s: %w", name, err)
	}
	defer f.Close()
	// Attaching to the TAP needs the flags it was made with (see
	// ensurePort); the fd detaches again when closed, and the TAP persists.
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fmt.Errorf("setting the owner of tap %s: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_ONE_QUEUE | unix.IFF_VNET_HDR)
	fd := int(f.Fd())
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return fmt.Errorf("opening tap %s to set its owner: %w", name, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETOWNER, uid); err != nil {
		return fmt.Errorf("setting the owner of tap %s to uid %d: %w", name, uid, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETGROUP, gid); err != nil {
		return fmt.Errorf("setting the group of tap %s to gid %d: %w", name, gid, err)
	}
	return nil
}
