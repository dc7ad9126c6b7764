package cli_test

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
)

// TestTemplates: E2B templates are registered, listed and deleted in
// PostgreSQL; invalid ones are refused before anything is stored.
func TestTemplates(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	cfg := s.ConfigFile(t)

	r := run(t, cfg, "", "template", "create", "small", "--build=false", "--vcpus", "1", "--memory", "256", "--env", "A=1", "--env", "B=x=y")
	require.Equal(t, 0, r.code, r.stderr)
	require.Equal(t, "small\n", r.stdout)
	r = run(t, cfg, "", "--json", "template", "create", "big", "--build=false")
	require.Equal(t, 0, r.code, r.stderr)
	require.Contains(t, r.stdout, `"vcpus": 2`, "defaults are the base template's size")

	r = run(t, cfg, "", "--json", "template", "list")
	require.Equal(t, 0, r.code, r.stderr)
	var list []struct {
		Name     string            `json:"name"`
		VCPUs    int               `json:"vcpus"`
		MemoryMB int               `json:"memory_mb"`
		Env      map[string]string `json:"env"`
	}
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &list))
	require.Len(t, list, 2)
	require.Equal(t, "big", list[0].Name)
	require.Equal(t, 512, list[0].MemoryMB)
	require.Equal(t, "small", list[1].Name)
	require.Equal(t, map[string]string{"A": "1", "B": "x=y"}, list[1].Env)
	r = run(t, cfg, "", "template", "list")
	require.Equal(t, 0, r.code, r.stderr)
	require.Contains(t, r.stdout, "small  1      256        A,B")

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"base"}, "built in"},
		{[]string{"Bad Name"}, "lowercase"},
		{[]string{"x", "--vcpus", "0"}, "at least 1"},
		{[]string{"x", "--memory", "10"}, "at least 64"},
		{[]string{"x", "--env", "NOEQUALS"}, "KEY=VALUE"},
		{[]string{"x", "--env", "1A=b"}, "environment variable"},
		{[]string{"small"}, "already exists"},
	} {
		r = run(t, cfg, "", append([]string{"template", "create"}, tc.args...)...)
		require.NotEqual(t, 0, r.code, tc.args)
		require.Contains(t, r.stderr, tc.want, tc.args)
	}

	// Building needs a backend that snapshots: docker says it cannot.
	r = run(t, cfg, "", "template", "create", "built", "--wait")
	require.Equal(t, 1, r.code, r.stderr)
	require.Contains(t, r.stderr, "cannot snapshot")
	r = run(t, cfg, "", "template", "list")
	require.Equal(t, 0, r.code, r.stderr)
	require.Contains(t, r.stdout, "failed: not supported")
	r = run(t, cfg, "", "template", "delete", "built")
	require.Equal(t, 0, r.code, r.stderr)

	r = run(t, cfg, "", "template", "delete", "small")
	require.Equal(t, 0, r.code, r.stderr)
	r = run(t, cfg, "", "template", "delete", "small")
	require.NotEqual(t, 0, r.code)
	require.Contains(t, strings.ToLower(r.stderr), "not found")
}
