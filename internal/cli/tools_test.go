package cli_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/tools"
	"github.com/aetherium/aetherium-core/pkg/tools/toolstest"
)

// TestToolsSession is the tools session of the tools issue through the
// command line, on docker and on qemu with --network none, in local and
// remote mode: vm create --tools, exec by name, tools list, tools install
// into a running VM; then (local) the cache commands, which must keep
// what live VMs use.
func TestToolsSession(t *testing.T) {
	for _, provider := range []string{"docker", "qemu"} {
		for _, mode := range []string{"local", "remote"} {
			t.Run(provider+"/"+mode, func(t *testing.T) { testToolsSession(t, provider, mode == "remote") })
		}
	}
}

func testToolsSession(t *testing.T, provider string, remoteMode bool) {
	if _, err := exec.LookPath(tools.MiseBinaryDefault); err != nil {
		testenv.Skip(t, "mise is not installed (%v); install it with `sudo scripts/setup.sh`", err)
	}
	srv := toolstest.NewServer(t)
	root := t.TempDir()
	inst, err := tools.NewMise(tools.Config{Root: root, AllowPrivateURLs: true})
	require.NoError(t, err)
	s := stack.Start(t, stack.Options{Provider: provider, Tools: inst})
	cfg := s.ConfigFile(t)
	t.Setenv("AETHERIUM_TOOLS_CACHE_DIR", root)
	if remoteMode {
		remote(t, s)
	}
	spec := srv.Spec("1.0.0")

	r := run(t, cfg, "", "vm", "create", "--name", "tooled", "--network", "none", "--tools", spec, "--wait")
	require.Equal(t, 0, r.code, r.stderr)
	vmID := strings.TrimSpace(r.stdout)
	r = run(t, cfg, "", "exec", vmID, "--", "hello")
	require.Equal(t, 0, r.code, r.stderr)
	require.Equal(t, toolstest.HelloOutput, r.stdout)

	r = run(t, cfg, "", "--json", "tools", "list", vmID)
	require.Equal(t, 0, r.code, r.stderr)
	var rows []map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &rows))
	require.Len(t, rows, 2)
	require.Equal(t, spec, rows[0]["spec"])
	require.Equal(t, "mise", rows[1]["tool"])
	r = run(t, cfg, "", "tools", "list", vmID)
	require.Equal(t, 0, r.code, r.stderr)
	require.Contains(t, r.stdout, "1.0.0")

	// Bad specs are usage errors, named, and nothing is created.
	r = run(t, cfg, "", "vm", "create", "--name", "bad-tools", "--tools", "node@22,npm:x;rm")
	require.Equal(t, 2, r.code, r.stdout)
	require.Contains(t, r.stderr, `tool spec "npm:x;rm"`)

	// A plain VM, then tools installed into it while it runs.
	r = run(t, cfg, "", "vm", "create", "--name", "plain", "--wait")
	require.Equal(t, 0, r.code, r.stderr)
	plain := strings.TrimSpace(r.stdout)
	r = run(t, cfg, "", "tools", "install", plain, spec, "--wait")
	require.Equal(t, 0, r.code, r.stderr)
	r = run(t, cfg, "", "exec", plain, "--", "hello")
	require.Equal(t, 0, r.code, r.stderr)
	require.Equal(t, toolstest.HelloOutput, r.stdout)
	require.Equal(t, 1, srv.Requests(), "one download for both VMs")

	r = run(t, cfg, "", "tools", "install", plain, "http:hello[url="+srv.URL+"/hello-{{version}}.tar.gz]@2.0.0", "--wait")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stderr, "404")

	if remoteMode {
		r = run(t, cfg, "", "tools", "cache", "list")
		require.Equal(t, 1, r.code)
		require.Contains(t, r.stderr, "not through api_url")
		return
	}

	// The cache: entries in use are kept whatever their age.
	r = run(t, cfg, "", "--json", "tools", "cache", "list")
	require.Equal(t, 0, r.code, r.stderr)
	var entries []map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &entries))
	require.Len(t, entries, 2, "hello and mise")
	for _, e := range entries {
		require.Equal(t, true, e["in_use"], e["key"])
	}
	age(t, root, 30*24*time.Hour)
	r = run(t, cfg, "", "tools", "cache", "prune", "--older-than", "1h")
	require.Equal(t, 0, r.code, r.stderr)
	require.Empty(t, strings.TrimSpace(r.stdout), "entries in use are never pruned")
	r = run(t, cfg, "", "tools", "cache", "prune", "--older-than", "1s")
	require.Equal(t, 2, r.code)
	require.Contains(t, r.stderr, "--older-than")

	for _, id := range []string{vmID, plain} {
		r = run(t, cfg, "", "vm", "delete", id, "--wait")
		require.Equal(t, 0, r.code, r.stderr)
	}
	r = run(t, cfg, "", "tools", "cache", "prune", "--older-than", "1h")
	require.Equal(t, 0, r.code, r.stderr)
	require.Len(t, strings.Fields(r.stdout), 2, "unused once their VMs are deleted: %s", r.stdout)
	r = run(t, cfg, "", "--json", "tools", "cache", "list")
	require.Equal(t, 0, r.code, r.stderr)
	require.JSONEq(t, "[]", r.stdout)
	dirs, err := os.ReadDir(root)
	require.NoError(t, err)
	for _, d := range dirs {
		require.True(t, strings.HasPrefix(d.Name(), "."), "left in the cache: %s", d.Name())
	}
}

// age makes every cache entry look last used that long ago.
func age(t *testing.T, root string, d time.Duration) {
	t.Helper()
	used, err := filepath.Glob(filepath.Join(root, ".meta", "*.used"))
	require.NoError(t, err)
	require.NotEmpty(t, used)
	old := time.Now().Add(-d)
	for _, p := range used {
		require.NoError(t, os.Chtimes(p, old, old))
	}
}

// TestToolsCacheRefusesWithoutPostgres: prune must know what VMs use.
func TestToolsCacheRefusesWithoutPostgres(t *testing.T) {
	if _, err := exec.LookPath(tools.MiseBinaryDefault); err != nil {
		testenv.Skip(t, "mise is not installed (%v); install it with `sudo scripts/setup.sh`", err)
	}
	root := t.TempDir()
	_, err := tools.NewMise(tools.Config{Root: root, AllowPrivateURLs: true})
	require.NoError(t, err)
	cfg := filepath.Join(t.TempDir(), "aetherium.yaml")
	require.NoError(t, os.WriteFile(cfg, []byte("storage: {host: 127.0.0.1, port: 1}\ntools: {cache_dir: "+root+"}\n"), 0o600))
	r := run(t, cfg, "", "tools", "cache", "prune")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stderr, "refusing to prune")

	r = run(t, cfg, "", "tools", "install", "not-a-uuid", "node@22")
	require.Equal(t, 2, r.code)
	r = run(t, cfg, "", "tools", "install")
	require.Equal(t, 2, r.code)
}
