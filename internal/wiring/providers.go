package wiring

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"maps"
	"path/filepath"
	"slices"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/config"
	"github.com/aetherium/aetherium-core/pkg/image"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/tools"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/docker"
	"github.com/aetherium/aetherium-core/pkg/vmm/firecracker"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
)

// provider is how wiring builds and checks one VM backend from the
// configuration. Adding a backend is one entry in providers.
type provider struct {
	// New builds the backend for worker owner; log already carries the
	// provider's name, store keeps network leases (may be nil).
	New func(ctx context.Context, c *config.Config, owner string, log *slog.Logger, store storage.Store) (vmm.VMOrchestrator, error)
	// Diagnose checks the host for doctor, creating nothing.
	Diagnose func(ctx context.Context, c *config.Config) []vmm.Check
	// Check, when set, replaces "every Diagnose check passes" for CheckVMM.
	Check func(ctx context.Context, c *config.Config) error
}

// providers maps vmm.provider to its backend: the one place that names
// them.
var providers = map[string]provider{
	docker.Provider: {
		New: func(ctx context.Context, c *config.Config, owner string, log *slog.Logger, _ storage.Store) (vmm.VMOrchestrator, error) {
			dc := DockerConfig(c)
			dc.Owner, dc.Logger = owner, log
			return docker.New(ctx, dc)
		},
		Diagnose: func(ctx context.Context, c *config.Config) []vmm.Check { return docker.Diagnose(ctx, DockerConfig(c)) },
		Check:    func(ctx context.Context, c *config.Config) error { return docker.Ping(ctx, c.VMM.Docker.Host) },
	},
	qemu.Provider: {
		New: func(ctx context.Context, c *config.Config, owner string, log *slog.Logger, store storage.Store) (vmm.VMOrchestrator, error) {
			qc, err := QEMUConfig(c)
			if err != nil {
				return nil, err
			}
			qc.Owner, qc.Logger = owner, log
			m, err := networkManager(c, store, log)
			if err != nil {
				return nil, err
			}
			if m != nil {
				qc.Network = m
			}
			return qemu.New(ctx, qc)
		},
		Diagnose: func(ctx context.Context, c *config.Config) []vmm.Check {
			qc, err := QEMUConfig(c)
			checks := qemu.Diagnose(ctx, qc)
			if err != nil {
				for i := range checks {
					if checks[i].Name == "guest image" {
						checks[i] = imageCheck(err)
					}
				}
			}
			return checks
		},
	},
	firecracker.Provider: {
		New: func(ctx context.Context, c *config.Config, owner string, log *slog.Logger, store storage.Store) (vmm.VMOrchestrator, error) {
			fc, err := FirecrackerConfig(c)
			if err != nil {
				return nil, err
			}
			fc.Owner, fc.Logger = owner, log
			m, err := networkManager(c, store, log)
			if err != nil {
				return nil, err
			}
			if m != nil {
				fc.Network = m
			}
			return firecracker.New(ctx, fc)
		},
		Diagnose: func(ctx context.Context, c *config.Config) []vmm.Check {
			fc, err := FirecrackerConfig(c)
			var checks []vmm.Check
			if err != nil {
				checks = append(checks, imageCheck(err))
			}
			return append(checks, firecracker.Diagnose(ctx, fc)...)
		},
	},
}

// lookupProvider returns the backend named name.
func lookupProvider(name string) (provider, error) {
	p, ok := providers[name]
	if !ok {
		return provider{}, fmt.Errorf("%w: vmm.provider %q is unknown; use %s", types.ErrInvalid, name, strings.Join(slices.Sorted(maps.Keys(providers)), ", "))
	}
	return p, nil
}

// imageCheck reports a guest image that cannot be found.
func imageCheck(err error) vmm.Check {
	return vmm.Check{Name: "guest image", Detail: err.Error(), Fix: "Worker can't create VMs: build it with `aether-cli image build` (or `make guest-image`)"}
}

// DockerConfig maps the vmm.docker section to the backend's config. An
// unset rootfs comes from the newest image in vmm.image_dir.
func DockerConfig(c *config.Config) docker.Config {
	rootfs := c.VMM.Docker.RootfsTar
	if rootfs == "" && c.VMM.Docker.Image == "" {
		if m, err := image.Latest(c.VMM.ImageDir); err == nil {
			rootfs = m.RootfsTarPath()
		}
	}
	dc := c.VMM.Docker
	dc.AgentPath = AgentPath(c)
	dc.RootfsTar = rootfs
	dc.MaxVCPUs = c.VMM.MaxVCPUs
	// Tools streamed into a running VM (tools:install) go to a tmpfs at
	// the cache root, the only place they can go in its read-only root.
	if root := filepath.Clean(cmp.Or(c.Tools.CacheDir, tools.DefaultRoot)); filepath.IsAbs(root) {
		dc.ToolsRoot = root
	}
	return dc
}
