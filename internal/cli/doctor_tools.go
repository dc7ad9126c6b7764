package cli

import (
	"context"
	"fmt"
	"io/fs"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/aetherium/aetherium-core/pkg/config"
	"github.com/aetherium/aetherium-core/pkg/tools"
)

// miseVersionTimeout bounds doctor's `mise --version`.
const miseVersionTimeout = 10 * time.Second

// checkTools reports mise's version and the tool cache. Tools are
// optional, so a missing mise only warns, unless tools.defaults are set:
// then every VM needs it.
func (a *app) checkTools(ctx context.Context, cfg *config.Config) []check {
	needed := len(cfg.Tools.Defaults) > 0
	fix := "install a pinned mise with `sudo scripts/setup.sh`, or set tools.mise_binary to a mise binary"
	var out []check
	bin, err := exec.LookPath(cfg.Tools.MiseBinary)
	if err == nil {
		cctx, cancel := context.WithTimeout(ctx, miseVersionTimeout)
		var b []byte
		cmd := exec.CommandContext(cctx, bin, "--version")
		cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin", "NO_COLOR=1"}
		b, err = cmd.Output()
		cancel()
		if err == nil {
			out = append(out, check{Name: "mise", OK: true, Detail: fmt.Sprintf("%s (%s)", strings.TrimSpace(string(b)), bin)})
		} else {
			err = fmt.Errorf("%s --version failed: %v", bin, err)
		}
	}
	if err != nil {
		out = append(out, check{Name: "mise", Detail: fmt.Sprintf("tools cannot be installed: %v", err), Fix: fix, Warning: !needed})
	}

	root := cfg.Tools.CacheDir
	m, err := tools.OpenCache(root, nil)
	if err != nil {
		return append(out, check{Name: "tool cache", OK: true, Detail: root + ": empty (made at the first install)"})
	}
	entries, err := m.List(ctx)
	if err != nil {
		return append(out, check{Name: "tool cache", Detail: err.Error(), Fix: "check that " + root + " is readable", Warning: !needed})
	}
	var size int64
	for _, e := range entries {
		size += e.Size
	}
	images := int64(0)
	_ = filepath.WalkDir(filepath.Join(root, ".images"), func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, err := d.Info(); err == nil {
				images += fi.Size()
			}
		}
		return nil
	})
	return append(out, check{Name: "tool cache", OK: true,
		Detail: fmt.Sprintf("%s: %d entries, %s (images %s); `aether-cli tools cache list` shows them", root, len(entries), sizeText(size), sizeText(images))})
}
