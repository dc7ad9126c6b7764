package cli

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/image"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// runImage runs `aether-cli image ARGS` through the command itself, so the
// test does not depend on how the root command registers it.
func runImage(t *testing.T, jsonOut bool, args ...string) (string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	a := &app{stdout: &out, stderr: &errb, json: jsonOut}
	cmd := a.newImageCmd()
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&errb)
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	err := cmd.Execute()
	t.Logf("stderr: %s", errb.String())
	return out.String(), err
}

func TestImageEmptyCache(t *testing.T) {
	cache := t.TempDir()
	out, err := runImage(t, true, "list", "--cache-dir", cache)
	require.NoError(t, err)
	require.JSONEq(t, "[]", out)
	_, err = runImage(t, false, "show", "--cache-dir", cache)
	require.ErrorIs(t, err, types.ErrNotFound)
	require.Contains(t, err.Error(), "aether-cli image build")

	_, err = runImage(t, false, "build", "--cache-dir", cache, "--agent", filepath.Join(cache, "missing"))
	require.ErrorIs(t, err, types.ErrInvalid)
	require.Contains(t, err.Error(), "make build")
	require.Equal(t, 2, ExitCode(err))
	_, err = runImage(t, false, "build", "--from-tar", "a", "--from-dir", "b")
	require.Equal(t, 2, ExitCode(err))
}

func TestImageBuildFromDir(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Skip(t, "building images needs root; run the tests as root")
	}
	for _, tool := range []string{"apt-get", "dpkg-deb", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Skip(t, "%s is not installed; run ./scripts/setup.sh", tool)
		}
	}
	agent := testenv.BuildBinary(t, "fc-agent")
	tree := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(tree, "etc"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(tree, "etc/os-release"), []byte("ID=test\n"), 0o644))
	cache := t.TempDir()

	out, err := runImage(t, true, "build", "--cache-dir", cache, "--agent", agent, "--from-dir", tree, "--rootfs-size-mb", "32")
	require.NoError(t, err)
	var v struct {
		ID    string            `json:"id"`
		Dir   string            `json:"dir"`
		Paths map[string]string `json:"paths"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &v))
	require.Equal(t, filepath.Join(cache, "images", v.ID), v.Dir)
	require.FileExists(t, v.Paths[image.FileRootfs])

	out, err = runImage(t, false, "show", "--cache-dir", cache, v.ID[:8])
	require.NoError(t, err)
	require.Contains(t, out, v.ID)
	require.Contains(t, out, "rootfs.ext4")
	out, err = runImage(t, false, "list", "--cache-dir", cache)
	require.NoError(t, err)
	require.Contains(t, out, v.ID)
}
