package main

import (
	"context"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/types"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// TestBinary runs the static binary as it runs in a guest, on a unix socket
// instead of vsock, and stops it the way an init system would.
func TestBinary(t *testing.T) {
	bin := testenv.BuildBinary(t, "fc-agent")
	sock := filepath.Join(t.TempDir(), "agent.sock")
	cmd := exec.Command(bin, "--log-level", "debug")
	cmd.Env = []string{"FC_AGENT_LISTEN=unix://" + sock}
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill() }) // an error once it has exited

	c, err := agent.NewClient(agent.UnixDialer(sock))
	require.NoError(t, err)
	defer c.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	info, err := c.WaitReady(ctx)
	require.NoError(t, err)
	require.Equal(t, agent.Version, info.GetVersion())

	res, err := c.Exec(ctx, types.Command{Cmd: "sh", Args: []string{"-c", "echo hi"}}, nil, nil)
	require.NoError(t, err)
	require.Equal(t, "hi\n", string(res.Stdout))

	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-exited:
		require.NoError(t, err, "fc-agent exits 0 on SIGTERM")
	case <-time.After(10 * time.Second):
		t.Fatal("fc-agent did not stop on SIGTERM")
	}
}

func TestBinaryFlags(t *testing.T) {
	bin := testenv.BuildBinary(t, "fc-agent")
	tests := []struct {
		name string
		args []string
		code int
	}{
		{name: "version", args: []string{"--version"}, code: 0},
		{name: "bad log level", args: []string{"--log-level", "loud"}, code: 2},
		{name: "negative cap", args: []string{"--max-output-bytes", "-1"}, code: 2},
		{name: "bad listen address", args: []string{"--listen", "carrier-pigeon"}, code: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := exec.Command(bin, tt.args...).Run()
			if tt.code == 0 {
				require.NoError(t, err)
				return
			}
			var exit *exec.ExitError
			require.ErrorAs(t, err, &exit)
			require.Equal(t, tt.code, exit.ExitCode())
		})
	}
}
