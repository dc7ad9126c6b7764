package worker

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"time"

	"github.com/hibiken/asynq"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/tools"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// installTools installs specs into the host's tool cache and records them
// as VM vmID's (with mise itself when withMise is set) before anything is
// delivered: the cache's prune consults those rows, so an entry is held
// from the moment the VM is given it. No specs give nil (and no mise).
func (w *Worker) installTools(ctx context.Context, log *slog.Logger, vmID string, specs []string, withMise bool) ([]tools.Entry, error) {
	if len(specs) == 0 {
		return nil, nil
	}
	if w.cfg.Tools == nil {
		return nil, fmt.Errorf("%w: worker %s has no tool installer: install mise with `sudo scripts/setup.sh` or set tools.mise_binary, then restart the worker", types.ErrNotSupported, w.cfg.ID)
	}
	parsed, err := tools.ParseSpecs(specs)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	set, err := w.cfg.Tools.Install(ctx, parsed)
	if err != nil {
		return nil, fmt.Errorf("installing tools for vm %s: %w", vmID, err)
	}
	entries := set.Entries
	if withMise {
		if entries, err = tools.WithMise(ctx, w.cfg.Tools, set); err != nil {
			return nil, fmt.Errorf("adding mise to the tools of vm %s: %w", vmID, err)
		}
	}
	now := time.Now().UTC()
	rows := make([]types.VMTool, 0, len(entries))
	for _, e := range entries {
		rows = append(rows, types.VMTool{VMID: vmID, Key: e.Key, Spec: e.Spec, Tool: e.Tool, Version: e.Version, AddedAt: now})
	}
	if err := w.store.AddVMTools(ctx, vmID, rows); err != nil {
		return nil, err
	}
	log.Info("tools ready", "vm_id", vmID, "tools", len(entries), "took", time.Since(start).Round(time.Millisecond))
	return entries, nil
}

// createSpecs is what a new VM gets: its own specs, then the worker's
// defaults it did not name itself, so that its own come first on PATH.
func (w *Worker) createSpecs(own []string) []string {
	specs := slices.Clone(own)
	for _, d := range w.cfg.ToolDefaults {
		if !slices.Contains(specs, d) {
			specs = append(specs, d)
		}
	}
	return specs
}

// createTools installs and records the tools of a VM being created and
// returns the tool set its backend delivers: images for VM backends,
// directories for containers. A VM without tools (and no defaults) gets
// nil, at no cost.
func (w *Worker) createTools(ctx context.Context, log *slog.Logger, vmID string, own []string) (*types.ToolSet, error) {
	specs := w.createSpecs(own)
	// mise itself comes with every tool set: check the count before
	// installing anything rather than after.
	if len(specs) > 0 && len(specs)+1 > types.MaxToolVolumes {
		return nil, fmt.Errorf("%w: vm %s asks for %d tools with this worker's tools.defaults (%d of them); with mise that is over the %d a VM can get: ask for fewer", types.ErrInvalid, vmID, len(specs), len(w.cfg.ToolDefaults), types.MaxToolVolumes)
	}
	entries, err := w.installTools(ctx, log, vmID, specs, true)
	if err != nil || entries == nil {
		return nil, err
	}
	images := w.vmm.Capabilities().Isolation != "container"
	ts, err := tools.ToolSet(ctx, w.cfg.Tools, entries, images)
	if err != nil {
		return nil, fmt.Errorf("preparing the tools of vm %s: %w", vmID, err)
	}
	return ts, nil
}

// handleToolsInstall installs tools on the host and streams them into a
// running VM through its agent. Volumes the guest has already are skipped
// by the agent, so a retry resumes. mise itself is not streamed: it is
// about 150 MB, which a running guest would have to hold in its root or
// its memory (docker's tools root is a tmpfs) and which takes minutes
// through a software-emulated VM's vsock; VMs get it, at no copy, with the
// tool set they are created with.
func (w *Worker) handleToolsInstall(ctx context.Context, t *asynq.Task, log *slog.Logger) (map[string]any, error) {
	p, err := queue.Decode[queue.ToolsInstallPayload](t.Payload())
	if err != nil {
		return nil, err
	}
	vm, err := w.ownedVM(ctx, p.VMID)
	if err != nil {
		return nil, err
	}
	log = log.With("vm_id", vm.ID)
	if vm.State != types.VMRunning {
		return nil, fmt.Errorf("%w: vm %s is %s; tools can be installed into a running vm only", types.ErrConflict, vm.ID, vm.State)
	}
	entries, err := w.installTools(ctx, log, vm.ID, p.Specs, false)
	if err != nil {
		return nil, err
	}
	ts, err := tools.ToolSet(ctx, w.cfg.Tools, entries, false)
	if err != nil {
		return nil, fmt.Errorf("preparing the tools of vm %s: %w", vm.ID, err)
	}
	c, err := agent.NewClient(func(ctx context.Context) (net.Conn, error) { return w.vmm.DialAgent(ctx, vm.ID) })
	if err != nil {
		return nil, err
	}
	defer c.Close()
	start := time.Now()
	keys := make([]string, 0, len(ts.Volumes))
	var sent int64
	for _, v := range ts.Volumes {
		added, err := c.AddToolsDir(ctx, v, ts.Root, v.Dir)
		if err != nil {
			return nil, fmt.Errorf("delivering %s to vm %s: %w", volumeName(v), vm.ID, err)
		}
		sent += added.Bytes
		keys = append(keys, v.Key)
	}
	log.Info("tools delivered", "tools", len(keys), "bytes", sent, "took", time.Since(start).Round(time.Millisecond))
	return map[string]any{"vm_id": vm.ID, "tools": keys}, nil
}

// volumeName names a volume in messages: its spec, or its key for mise.
func volumeName(v types.ToolVolume) string {
	if v.Spec != "" {
		return v.Spec
	}
	return v.Key
}
