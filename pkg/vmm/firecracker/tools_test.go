package firecracker_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

// toolSet makes a tool set of n volumes whose images are small files.
func toolSet(t *testing.T, n int) *types.ToolSet {
	root := filepath.Join(t.TempDir(), "tools")
	s := &types.ToolSet{Root: root}
	for i := range n {
		key := "http-hello-1.0." + string(rune('0'+i)) + "-abcd"
		img := filepath.Join(root, ".images", key+".ext4")
		require.NoError(t, os.MkdirAll(filepath.Dir(img), 0o755))
		require.NoError(t, os.WriteFile(img, []byte("image "+key), 0o644))
		dir := filepath.Join(root, key)
		s.Volumes = append(s.Volumes, types.ToolVolume{Key: key, Dir: dir, Image: img, BinPaths: []string{dir + "/bin"}})
	}
	return s
}

// TestToolDrives: a VM with tools gets each image as a read-only drive and
// the tools root on its kernel command line, jailed or not; the jail holds
// hard links, not copies, of the shared images.
func TestToolDrives(t *testing.T) {
	t.Parallel()
	for _, jailed := range []bool{false, true} {
		t.Run(map[bool]string{false: "direct", true: "jailed"}[jailed], func(t *testing.T) {
			t.Parallel()
			cfg := fakeConfig(t)
			dir := cfg.SocketDir
			if jailed {
				cfg = jailedConfig(t)
				dir = filepath.Join(cfg.Jailer.ChrootBaseDir, "firecracker")
			}
			o := newOrchestrator(t, cfg)
			sp := vmmtest.NewSpec(t)
			sp.Tools = toolSet(t, 2)
			id := vmmtest.StartVM(t, o, sp)
			root := filepath.Join(dir, id)
			if jailed {
				root = filepath.Join(root, "root")
			}
			reqs := requests(t, root)
			for i, v := range sp.Tools.Volumes {
				d := find(t, reqs, "PUT", "/drives/tool"+string(rune('0'+i)))
				require.Equal(t, true, d["is_read_only"])
				require.Equal(t, false, d["is_root_device"])
				if jailed {
					require.Equal(t, "/tool"+string(rune('0'+i)), d["path_on_host"])
					in, err := os.Stat(filepath.Join(root, "tool"+string(rune('0'+i))))
					require.NoError(t, err)
					out, err := os.Stat(v.Image)
					require.NoError(t, err)
					require.True(t, os.SameFile(in, out), "the jail links the shared image instead of copying it")
				} else {
					require.Equal(t, v.Image, d["path_on_host"])
				}
			}
			bs := find(t, reqs, "PUT", "/boot-source")
			require.True(t, strings.HasSuffix(bs["boot_args"].(string), " "+bootparams.Arg(bootparams.ToolsRoot, sp.Tools.Root)), bs["boot_args"])
			require.NoError(t, o.DeleteVM(t.Context(), id))
			for _, v := range sp.Tools.Volumes {
				require.FileExists(t, v.Image, "deleting a VM never touches the shared cache")
			}
		})
	}
}

// TestToolSetInvalid: a tool set that breaks the delivery contract is
// refused before anything is made.
func TestToolSetInvalid(t *testing.T) {
	t.Parallel()
	o := newOrchestrator(t, fakeConfig(t))
	sp := vmmtest.NewSpec(t)
	sp.Tools = toolSet(t, 1)
	sp.Tools.Volumes[0].Dir = "/elsewhere"
	_, err := o.CreateVM(t.Context(), sp)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "must be "+filepath.Join(sp.Tools.Root, sp.Tools.Volumes[0].Key))
}
