package e2b

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// TestSandboxState: only a VM that can take commands reads as running; a
// stopped or lost one reads as paused.
func TestSandboxState(t *testing.T) {
	for st, want := range map[types.VMState]string{
		types.VMRunning: "running", types.VMCreating: "running",
		types.VMStopped: "paused", types.VMStopping: "paused", types.VMLost: "paused",
		types.VMPaused: "paused", types.VMSuspended: "paused",
	} {
		require.Equal(t, want, sandboxState(st), st)
	}
}
