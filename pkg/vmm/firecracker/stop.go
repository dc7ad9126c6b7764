package firecracker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// running returns the VMM process of VM id when one is alive: ours, or one
// found through the pid file (a VM started before the worker restarted),
// which is then watched through a pidfd like ours.
func (o *Orchestrator) running(id string) *vmutil.Proc {
	o.mu.Lock()
	defer o.mu.Unlock()
	if pr := o.procs[id]; pr.Alive() {
		return pr
	}
	delete(o.procs, id)
	// The VMM's command line carries --id: a recycled pid is not taken
	// for it.
	pr := vmutil.Adopt(filepath.Join(o.cfg.paths(id).run, pidFileName), vmutil.HasFlag("--id", id))
	if pr == nil {
		return nil
	}
	o.procs[id] = pr
	return pr
}

// kill ends the VMM with SIGKILL and waits for it.
func (o *Orchestrator) kill(ctx context.Context, id string, pr *vmutil.Proc) {
	if err := pr.Signal(syscall.SIGKILL); err != nil {
		o.log.Warn("cannot kill firecracker", "vm_id", id, "pid", pr.Pid(), "err", err)
	}
	pr.Wait(ctx, 10*time.Second)
	o.cleanupRun(id)
}

// cleanupRun forgets a VMM that ended and removes its sockets and pid file.
func (o *Orchestrator) cleanupRun(id string) {
	o.clients.Drop(id)
	o.mu.Lock()
	delete(o.procs, id)
	o.mu.Unlock()
	p := o.cfg.paths(id)
	os.Remove(p.host(apiSockName))
	os.Remove(p.host(vsockSockName))
	os.Remove(filepath.Join(p.run, pidFileName))
}

// StopVM implements vmm.VMOrchestrator. Gracefully: fc-agent powers the
// guest off (a reboot, which with reboot=k ends Firecracker); if the VMM is
// still there after StopTimeout, Ctrl-Alt-Del; then SIGKILL. force skips
// to SIGKILL. A suspended VM's saved state is discarded.
func (o *Orchestrator) StopVM(ctx context.Context, id string, force bool) error {
	rec, unlock, err := vmutil.Enter(ctx, &o.locks, id, o.readRecord)
	if err != nil {
		return err
	}
	defer unlock()
	if rec.Suspended && o.running(id) == nil {
		// Stopping a suspended VM discards its saved state: it ends
		// stopped, and a start boots it.
		o.log.Info("stopping a suspended vm discards its saved state", "vm_id", id)
		return o.dropSuspended(rec)
	}
	// Asked for: the exit that follows is no crash.
	if err := os.Remove(filepath.Join(o.cfg.paths(id).run, runningMarker)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("stopping vm %s: %w", id, err)
	}
	pr := o.running(id)
	if pr == nil {
		o.cleanupRun(id)
		return nil
	}
	how := "killed"
	if !force {
		how = o.gracefulStop(ctx, id, pr)
	}
	if how == "killed" {
		o.kill(ctx, id, pr)
	}
	if !pr.Wait(ctx, 0) {
		return fmt.Errorf("stopping vm %s: firecracker (pid %d) is still running: %w", id, pr.Pid(), cmp.Or(ctx.Err(), errors.New("it survived SIGKILL")))
	}
	o.cleanupRun(id)
	o.log.Info("stopped vm", "vm_id", id, "force", force, "how", how)
	return nil
}

// gracefulStop runs the polite steps and says which one ended the VMM, or
// "killed" when none did.
func (o *Orchestrator) gracefulStop(ctx context.Context, id string, pr *vmutil.Proc) string {
	p := o.cfg.paths(id)
	if c, err := o.client(id); err == nil {
		sctx, cancel := context.WithTimeout(ctx, min(3*time.Second, o.cfg.StopTimeout))
		// Reboot rather than power off: Firecracker ends on a guest
		// reboot (reboot=k), while a powered-off guest may leave it idle.
		err := c.Shutdown(sctx, true)
		cancel()
		if err != nil {
			o.log.Debug("agent shutdown failed", "vm_id", id, "err", err)
		}
		if pr.Wait(ctx, o.cfg.StopTimeout) {
			return "agent poweroff"
		}
	}
	o.clients.Drop(id)
	if err := NewClient(p.host(apiSockName)).Action(ctx, ActionSendCtrlAltDel); err != nil {
		o.log.Debug("SendCtrlAltDel failed", "vm_id", id, "err", err)
	} else if pr.Wait(ctx, o.cfg.StopTimeout) {
		return "ctrl-alt-del"
	}
	o.log.Warn("vm did not shut down; killing firecracker", "vm_id", id, "pid", pr.Pid())
	return "killed"
}

// PID returns the pid of VM id's running VMM, or 0 when none runs.
func (o *Orchestrator) PID(id string) int {
	if types.ValidateID(id) != nil {
		return 0
	}
	if pr := o.running(id); pr != nil {
		return pr.Pid()
	}
	return 0
}
