package cli_test

import (
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
)

// TestProviderIsTheWorkers: the CLI's yaml names qemu (and a network by
// default) while the only worker runs docker, as when a worker is started
// with AETHERIUM_VMM_PROVIDER=docker next to a yaml that says qemu. The VM
// the CLI creates is recorded with the worker's backend and the worker's
// network default, in local and remote mode: nothing the CLI's vmm section
// says reaches the row.
func TestProviderIsTheWorkers(t *testing.T) {
	for _, mode := range []string{"local", "remote"} {
		t.Run(mode, func(t *testing.T) {
			s := stack.Start(t, stack.Options{Provider: "docker"})
			cfg := s.ConfigFile(t)
			body, err := os.ReadFile(cfg)
			require.NoError(t, err)
			require.Contains(t, string(body), "  provider: docker\n")
			body = []byte(strings.Replace(string(body), "  provider: docker\n", "  provider: qemu\n", 1) + "network:\n  enabled: true\n")
			require.NoError(t, os.WriteFile(cfg, body, 0o600))
			if mode == "remote" {
				remote(t, s)
			}

			r := run(t, cfg, "", "vm", "create", "--name", "whose-provider", "--wait")
			require.Equal(t, 0, r.code, r.stderr)
			vmID := strings.TrimSpace(r.stdout)
			r = run(t, cfg, "", "--json", "vm", "get", vmID)
			require.Equal(t, 0, r.code, r.stderr)
			var vm map[string]any
			require.NoError(t, json.Unmarshal([]byte(r.stdout), &vm))
			require.Equal(t, "running", vm["state"])
			require.Equal(t, "docker", vm["provider"], "the row must name the worker's backend, not the CLI's")
			require.Equal(t, "none", vm["network"], "a docker worker gives no network by default")
		})
	}
}
