package docker

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/mount"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// checkTools checks a tool set, which has passed ToolSet.Validate, for
// this backend and host: its root may hide nothing the container needs and
// every volume is in this host's tool cache.
func checkTools(ts *types.ToolSet) error {
	if ts == nil || len(ts.Volumes) == 0 {
		return nil
	}
	if err := checkToolsRoot(ts.Root); err != nil {
		return err
	}
	for _, v := range ts.Volumes {
		if err := checkToolVolume(v); err != nil {
			return err
		}
	}
	return nil
}

// toolsRoot is where a VM with tool set ts gets its tools tmpfs: the set's
// root, or Config.ToolsRoot for a VM without tools, or "" for none.
func (o *Orchestrator) toolsRoot(ts *types.ToolSet) string {
	if ts != nil && len(ts.Volumes) > 0 {
		return ts.Root
	}
	return o.cfg.ToolsRoot
}

// deliverTools adds a tool set's delivery to a container's config, as
// types.ToolSet describes it for docker: a tmpfs at root (see toolsRoot),
// so that the agent can add tools to the running container, with each
// volume's Dir bound read-only over it at the same path. The engine mounts
// parents before children whatever the order given, so the binds land on
// the tmpfs. The mounts belong to the container and come back at every
// start; what the agent adds to the tmpfs does not. The caller sets root
// in the environment and has checked ts with checkTools.
func deliverTools(root string, ts *types.ToolSet, memMB int, hc *container.HostConfig) {
	if root == "" {
		return
	}
	if hc.Tmpfs == nil {
		hc.Tmpfs = map[string]string{}
	}
	hc.Tmpfs[root] = tmpfsOptions("755", memMB)
	if ts == nil {
		return
	}
	for _, v := range ts.Volumes {
		hc.Mounts = append(hc.Mounts, mount.Mount{Type: mount.TypeBind, Source: v.Dir, Target: v.Dir, ReadOnly: true})
	}
}

// checkToolsRoot refuses a tools root whose tmpfs would hide or replace a
// place the container needs: the agent's binary and socket directory, and
// the writable directories of confine.go.
func checkToolsRoot(root string) error {
	if !filepath.IsAbs(root) || filepath.Clean(root) != root || root == "/" {
		return fmt.Errorf("%w: tools root %q must be a clean absolute path other than /", types.ErrInvalid, root)
	}
	needed := []string{filepath.Dir(GuestAgentPath), GuestRunDir}
	for _, d := range tmpfsDirs {
		needed = append(needed, d.path)
	}
	needed = append(needed, homeDirs...)
	for _, p := range needed {
		if p == root || strings.HasPrefix(p, root+"/") {
			return fmt.Errorf("%w: tools root %s would hide %s in the container; choose a tool cache dir of its own, such as /opt/aetherium/tools", types.ErrInvalid, root, p)
		}
	}
	return nil
}

// checkToolVolume makes sure a volume is on this host before the engine is
// asked to bind it, so a missing one is named with what to do.
func checkToolVolume(v types.ToolVolume) error {
	fi, err := os.Stat(v.Dir)
	if err == nil && !fi.IsDir() {
		err = errors.New("not a directory")
	}
	if err != nil {
		return fmt.Errorf("%w: tool volume %s: %s on this host: %v; install the tool into this worker's tool cache first", types.ErrInvalid, v.Key, v.Dir, err)
	}
	if _, err := os.Stat(filepath.Join(v.Dir, types.ToolMarkerFile)); err != nil {
		return fmt.Errorf("%w: tool volume %s: %s has no %s (%v); it is not a finished tool cache entry, install the tool again", types.ErrInvalid, v.Key, v.Dir, types.ToolMarkerFile, err)
	}
	return nil
}
