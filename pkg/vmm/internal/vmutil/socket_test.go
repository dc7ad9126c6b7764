package vmutil

import (
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// TestOwnedSocket: a socket of the right owner is reached through the
// returned path; a link to another socket, a plain file or a socket of
// another owner is refused.
func TestOwnedSocket(t *testing.T) {
	dir := t.TempDir()
	listen := func(name string) string {
		p := filepath.Join(dir, name)
		l, err := net.Listen("unix", p)
		require.NoError(t, err)
		t.Cleanup(func() { l.Close() })
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				c.Write([]byte(name))
				c.Close()
			}
		}()
		return p
	}
	mine := listen("mine.sock")
	other := listen("other.sock")

	dial, release, err := OwnedSocket(mine, os.Getuid())
	require.NoError(t, err)
	c, err := net.Dial("unix", dial)
	require.NoError(t, err)
	b := make([]byte, 16)
	n, _ := c.Read(b)
	require.Equal(t, "mine.sock", string(b[:n]), "the checked socket is the one reached")
	c.Close()
	release()

	link := filepath.Join(dir, "link.sock")
	require.NoError(t, os.Symlink(other, link))
	_, _, err = OwnedSocket(link, os.Getuid())
	require.Error(t, err, "a link is never followed")

	file := filepath.Join(dir, "file")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	_, _, err = OwnedSocket(file, os.Getuid())
	require.ErrorIs(t, err, types.ErrUnavailable)

	_, _, err = OwnedSocket(mine, os.Getuid()+4242)
	require.ErrorIs(t, err, types.ErrUnavailable, "another uid's socket")
	require.ErrorContains(t, err, "replaced")
}
