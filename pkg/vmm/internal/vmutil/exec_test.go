package vmutil

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// TestExecJournalErrors: Exec passes ExecIO's journal fields to the agent
// and reports its errors as vmm's sentinels.
func TestExecJournalErrors(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := agent.Listen("unix://" + sock)
	require.NoError(t, err)
	srv := agent.NewServer(agent.ServerConfig{})
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	c, err := agent.NewClient(agent.UnixDialer(sock))
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })

	cmd := types.Command{Cmd: "sh", Args: []string{"-c", "sleep 0.5; echo $GREETING"}}
	base := map[string]string{"GREETING": "hello"}
	_, err = Exec(t.Context(), c, "vm1", base, cmd, vmm.ExecIO{ExecutionID: "e1", ReattachOnly: true})
	require.ErrorIs(t, err, vmm.ErrUnknownExecution)
	require.ErrorIs(t, err, types.ErrNotFound)
	require.ErrorContains(t, err, "in vm vm1")

	detach := make(chan struct{})
	var pids []int
	_, err = Exec(t.Context(), c, "vm1", base, cmd, vmm.ExecIO{
		ExecutionID: "e1",
		Detach:      detach,
		Started: func(pid int, reattached bool) {
			require.False(t, reattached)
			pids = append(pids, pid)
			close(detach)
		},
	})
	require.ErrorIs(t, err, vmm.ErrDetached)

	res, err := Exec(t.Context(), c, "vm1", base, cmd, vmm.ExecIO{
		ExecutionID:  "e1",
		ReattachOnly: true,
		Started: func(pid int, reattached bool) {
			require.True(t, reattached)
			pids = append(pids, pid)
		},
	})
	require.NoError(t, err)
	require.Equal(t, "hello\n", string(res.Stdout))
	require.Len(t, pids, 2)
	require.Equal(t, pids[0], pids[1])
}
