package agent

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestListen(t *testing.T) {
	dir := t.TempDir()
	regular := filepath.Join(dir, "regular")
	require.NoError(t, os.WriteFile(regular, nil, 0o644))

	tests := []struct {
		name string
		spec string
		err  string
	}{
		{name: "no scheme", spec: "/run/agent.sock", err: "no scheme"},
		{name: "unknown scheme", spec: "udp://:1", err: "unknown scheme"},
		{name: "relative unix path", spec: "unix://agent.sock", err: "absolute"},
		{name: "unix path is a file", spec: "unix://" + regular, err: "not a socket"},
		{name: "vsock without port", spec: "vsock://", err: "vsock address"},
		{name: "vsock bad port", spec: "vsock://:http", err: "not a number"},
		{name: "vsock bad cid", spec: "vsock://host:9999", err: "context ID"},
		{name: "tcp", spec: "tcp://127.0.0.1:0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, err := Listen(tt.spec)
			if tt.err != "" {
				require.ErrorContains(t, err, tt.err)
				return
			}
			require.NoError(t, err)
			require.NoError(t, l.Close())
		})
	}
	_, err := os.Stat(regular)
	require.NoError(t, err, "Listen must not remove a file that is not a socket")
}

func TestListenUnixReplacesStaleSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	// A socket file left behind by a process that died.
	stale, err := net.Listen("unix", sock)
	require.NoError(t, err)
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	require.NoError(t, stale.Close())
	_, err = os.Stat(sock)
	require.NoError(t, err)

	l, err := Listen("unix://" + sock)
	require.NoError(t, err)
	defer l.Close()
	fi, err := os.Stat(sock)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	accepted := make(chan error, 1)
	go func() {
		conn, err := l.Accept()
		if err == nil {
			conn.Close()
		}
		accepted <- err
	}()
	conn, err := UnixDialer(sock)(context.Background())
	require.NoError(t, err)
	conn.Close()
	require.NoError(t, <-accepted)
}
