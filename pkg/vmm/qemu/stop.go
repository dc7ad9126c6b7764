package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/digitalocean/go-qemu/qmp"

	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// watch waits for QEMU to end. An end nobody asked for marks the VM failed
// and frees what it held, so a killed or crashed VM leaks nothing.
func (o *Orchestrator) watch(id string, p *vmProcs) {
	<-p.qemu.Done()
	unlock := o.locks.Lock(id)
	defer unlock()
	o.mu.Lock()
	stopping := p.stopping
	current := o.vms[id] == p && !o.closed
	o.mu.Unlock()
	if stopping || !current {
		return
	}
	failed := o.qemuEnded(id, p)
	o.log.Warn("vm ended unexpectedly", "vm_id", id, "why", failed)
	// Recorded before the processes are dropped, so a status read in
	// between shows these words and not a generic "not running".
	if vf, err := o.readVM(id); err == nil {
		vf.Running = false
		vf.Failed = failed
		if err := o.writeVM(id, vf); err != nil {
			o.log.Warn("cannot record failed vm", "vm_id", id, "err", err)
		}
	}
	o.stopProcs(id, true)
	o.cleanRuntime(id)
}

// StopVM implements vmm.VMOrchestrator. A graceful stop asks the agent to
// power the guest off, then asks QEMU to quit over QMP, then kills it,
// giving each step StopTimeout.
func (o *Orchestrator) StopVM(ctx context.Context, id string, force bool) error {
	vf, unlock, err := vmutil.Enter(ctx, &o.locks, id, o.readVM)
	if err != nil {
		return err
	}
	defer unlock()
	p := o.procs(id)
	if p != nil && p.qemu.Alive() {
		o.mu.Lock()
		p.stopping = true
		o.mu.Unlock()
		if !force {
			if vf.Paused {
				// A paused guest cannot power itself off: it runs again
				// for its graceful end.
				if err := o.cont(ctx, id); err != nil {
					o.log.Debug("cannot resume a paused vm to stop it gracefully", "vm_id", id, "err", err)
				}
			}
			o.gracefulStop(ctx, id, p)
		}
	}
	o.stopProcs(id, true)
	o.cleanRuntime(id)
	if vf.Suspended {
		// A stopped VM boots afresh: its saved state goes.
		if err := os.Remove(o.path(id, fileState)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("stopping vm %s: removing its saved state: %w", id, err)
		}
	}
	if vf.Running || vf.Failed != "" || vf.Paused || vf.Suspended {
		// A stopped VM is stopped, whatever ended its last run.
		vf.Running, vf.Failed, vf.Paused, vf.Suspended = false, "", false, false
		if err := o.writeVM(id, vf); err != nil {
			return err
		}
		o.log.Info("stopped vm", "vm_id", id, "force", force)
	}
	return nil
}

func (o *Orchestrator) gracefulStop(ctx context.Context, id string, p *vmProcs) {
	wait := func(d time.Duration) bool {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-p.qemu.Done():
			return true
		case <-ctx.Done():
			return false
		case <-t.C:
			return false
		}
	}
	// o.client makes the client when this worker has none yet (a VM found
	// again after a restart), so the guest always gets to sync first.
	if c, err := o.client(id); err == nil {
		sctx, cancel := context.WithTimeout(ctx, o.cfg.StopTimeout)
		err := c.Shutdown(sctx, false)
		cancel()
		if err == nil && wait(o.cfg.StopTimeout) {
			return
		}
		o.log.Debug("agent power-off did not end the vm; asking QEMU to quit", "vm_id", id, "err", err)
	}
	if err := o.qmpQuitOwned(ctx, id); err != nil {
		o.log.Debug("QMP quit failed; killing QEMU", "vm_id", id, "err", err)
		return
	}
	wait(o.cfg.StopTimeout)
}

// qmpQuit asks QEMU to exit through its monitor.
//
// go-qemu bounds only the connect, and QMP serves one client at a time, so
// a monitor someone else holds (or a wedged QEMU) would block the greeting
// forever: the exchange runs in a goroutine and is given up after timeout
// or when ctx ends, and the caller goes on to SIGKILL.
func qmpQuit(ctx context.Context, sock string, timeout time.Duration) error {
	done := make(chan error, 1)
	go func() {
		m, err := qmp.NewSocketMonitor("unix", sock, 2*time.Second)
		if err != nil {
			done <- err
			return
		}
		if err := m.Connect(); err != nil {
			done <- err
			return
		}
		defer m.Disconnect()
		_, err = m.Run([]byte(`{"execute":"quit"}`))
		if err != nil && (errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed)) {
			err = nil // QEMU closed the monitor as it quit
		}
		done <- err
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		return fmt.Errorf("QMP did not answer within %s", timeout)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// stopProcs ends the VM's processes (SIGKILL for QEMU when kill is set) and
// forgets them. It must be called with the VM's lock held.
func (o *Orchestrator) stopProcs(id string, kill bool) {
	o.mu.Lock()
	p := o.vms[id]
	if p != nil {
		p.stopping = true
		delete(o.vms, id)
	}
	o.mu.Unlock()
	if p == nil {
		// Not known to this worker: a leftover from an earlier one.
		dir := o.RunDir(id)
		p = &vmProcs{qemu: vmutil.Adopt(o.path(id, fileQEMUPid), vmutil.MentionsDir(dir))}
	}
	if p.qemu != nil {
		if kill {
			p.qemu.Stop(syscall.SIGKILL, 0)
		} else {
			p.qemu.Stop(syscall.SIGTERM, o.cfg.StopTimeout)
		}
	}
	// After QEMU: the connection then ends at once, where a stopped guest
	// (Suspend) would never answer the agent client's goodbyes.
	o.dropChannel(id)
	// The vhost-device-vsock of a VM started before the agent moved to
	// virtio-serial.
	if v := vmutil.Adopt(o.path(id, fileVsockPid), vmutil.MentionsDir(o.RunDir(id))); v != nil {
		v.Stop(syscall.SIGTERM, 2*time.Second)
	}
	o.dropCgroup(id)
}

// cleanRuntime removes what only a running VM has: sockets and pidfiles.
func (o *Orchestrator) cleanRuntime(id string) {
	for _, f := range []string{fileQEMUPid, fileQMP, fileAgent, fileVsockPid, "run/vhost.sock", "run/vsock.sock"} {
		if err := os.Remove(o.path(id, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			o.log.Warn("cannot remove vm file", "vm_id", id, "file", f, "err", err)
		}
	}
}

// qmpQuitOwned asks VM id's QEMU to quit through its monitor socket, only
// while that is a socket of the VM's uid (see vmutil.OwnedSocket).
func (o *Orchestrator) qmpQuitOwned(ctx context.Context, id string) error {
	p, release, err := vmutil.OwnedSocket(o.path(id, fileQMP), o.sockOwner(id))
	if err != nil {
		return err
	}
	defer release()
	return qmpQuit(ctx, p, o.cfg.StopTimeout)
}
