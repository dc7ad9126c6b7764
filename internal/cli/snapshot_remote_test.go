package cli_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
)

// TestSnapshotsRemote: through aether-api (AETHERIUM_API_URL), vm pause
// and resume work as in local mode, state errors exit 2 with the
// service's message, and the docker backend's refusal to snapshot reaches
// the command line with its reason.
func TestSnapshotsRemote(t *testing.T) {
	s := stack.Start(t, stack.Options{Workers: []string{"cli-snap"}})
	cfg := s.ConfigFile(t)
	remote(t, s)

	r := run(t, cfg, "", "vm", "create", "--name", "remote-pause", "--wait")
	require.Equal(t, 0, r.code, r.stderr)
	vmID := strings.TrimSpace(r.stdout)

	r = run(t, cfg, "", "vm", "pause", vmID, "--wait")
	require.Equal(t, 0, r.code, r.stderr)
	r = run(t, cfg, "", "vm", "get", vmID)
	require.Equal(t, 0, r.code, r.stderr)
	require.Regexp(t, `(?m)^state\s+paused$`, r.stdout)
	r = run(t, cfg, "", "vm", "pause", vmID)
	require.Equal(t, 2, r.code, r.stderr)
	require.Contains(t, r.stderr, "it is paused")

	r = run(t, cfg, "", "vm", "resume", vmID, "--wait")
	require.Equal(t, 0, r.code, r.stderr)
	r = run(t, cfg, "", "exec", vmID, "--", "echo", "back")
	require.Equal(t, 0, r.code, r.stderr)
	require.Equal(t, "back\n", r.stdout)

	r = run(t, cfg, "", "snapshot", "create", vmID, "--name", "remote-snap", "--wait")
	require.Equal(t, 1, r.code, r.stdout)
	require.Contains(t, r.stderr, "cannot snapshot")
	r = run(t, cfg, "", "snapshot", "list")
	require.Equal(t, 0, r.code, r.stderr)
	require.Regexp(t, `(?m)^remote-snap\s+failed\s`, r.stdout)
	r = run(t, cfg, "", "snapshot", "delete", "no-such")
	require.Equal(t, 2, r.code, r.stderr)
	require.Contains(t, r.stderr, `no snapshot named "no-such"`)
	r = run(t, cfg, "", "snapshot", "delete", "remote-snap")
	require.Equal(t, 0, r.code, r.stderr)
}
