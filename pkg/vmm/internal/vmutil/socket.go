package vmutil

import (
	"fmt"

	"strconv"

	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// OwnedSocket opens the unix socket at path without following a symbolic
// link and checks that it is a socket owned by uid, and returns a path
// that reaches exactly that socket (/proc/self/fd/N of an O_PATH
// descriptor) for as long as release is not called.
//
// A confined VMM owns the directory its sockets live in, so it could
// replace a socket with a link to any other socket on the host, which the
// worker, dialling as root, would then talk to (another VM's agent, a
// system daemon). Dialling through the descriptor closes that: what was
// checked is what is connected to, with no window between the two.
func OwnedSocket(path string, uid int) (dial string, release func(), err error) {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil, fmt.Errorf("opening socket %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return "", nil, fmt.Errorf("checking socket %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK || int(st.Uid) != uid {
		unix.Close(fd)
		return "", nil, fmt.Errorf("%w: %s is not a socket of uid %d (mode %o, uid %d); something replaced the VM's socket", types.ErrUnavailable, path, uid, st.Mode, st.Uid)
	}
	return "/proc/self/fd/" + strconv.Itoa(fd), func() { unix.Close(fd) }, nil
}
