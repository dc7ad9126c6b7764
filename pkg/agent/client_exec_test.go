package agent

import (
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// TestExecUnvalidatedInput: the client leaves commands to the agent, which
// refuses what it cannot run (see TestExecCannotStart), and keeps only the
// check that protects the caller's process: a negative output cap would
// break the client's own output buffers.
func TestExecUnvalidatedInput(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	_, err := c.Exec(t.Context(), types.Command{Cmd: "true", MaxOutputBytes: -1}, nil, nil)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "max output bytes -1 is negative")

	// A stdin larger than a task payload may carry is the queue's limit,
	// not the agent's: it streams.
	in := make([]byte, types.MaxStdinBytes+1)
	res, err := c.Exec(t.Context(), types.Command{Cmd: "wc", Args: []string{"-c"}, Stdin: in}, nil, nil)
	require.NoError(t, err)
	require.Equal(t, 0, res.ExitCode)
	require.Equal(t, strconv.Itoa(len(in)), strings.TrimSpace(string(res.Stdout)))
}
