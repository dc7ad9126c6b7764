package qemu

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// StartVM implements vmm.VMOrchestrator.
func (o *Orchestrator) StartVM(ctx context.Context, id string) error {
	vf, unlock, err := vmutil.Enter(ctx, &o.locks, id, o.readVM)
	if err != nil {
		return err
	}
	defer unlock()
	p := o.procs(id)
	if p == nil || !p.qemu.Alive() {
		if r, err := o.pendingRestore(id, vf); err != nil || r != nil {
			if err != nil {
				return err
			}
			return o.restore(ctx, id, vf, r)
		}
		if p, err = o.boot(ctx, id, vf, nil); err != nil {
			return err
		}
	}
	// Seeded also when QEMU was found running: an earlier StartVM may
	// have been cancelled before its seed, and a second one is harmless.
	err = o.waitAgent(ctx, id, p, true, func(ctx context.Context, c *agent.Client) error {
		return vmutil.SeedBoot(ctx, c, o.log, id)
	})
	if errors.Is(err, types.ErrUnavailable) && ctx.Err() == nil {
		// A guest that boots but never answers is powered off, so that a
		// retry boots it afresh instead of waiting on the same one again.
		o.stopProcs(id, true)
		o.cleanRuntime(id)
		if vf, rerr := o.readVM(id); rerr == nil {
			vf.Running = false
			_ = o.writeVM(id, vf)
		}
		return err
	}
	return err
}

// boot spawns QEMU for a VM that does not run: booting its kernel, or,
// with r, waiting for the state of r to be loaded (see restore).
func (o *Orchestrator) boot(ctx context.Context, id string, vf *vmFile, r *restoreFrom) (p *vmProcs, err error) {
	o.stopProcs(id, true) // leftovers of a crash, if any
	o.cleanRuntime(id)
	dir := o.RunDir(id)
	if vf.Spec.Network == types.NetworkNAT {
		// Idempotent: repairs a TAP lost since (a host reboot, a
		// reconcile) and keeps the lease, so the guest's address stays.
		n, err := o.attach(ctx, id)
		if err != nil {
			return nil, fmt.Errorf("starting vm %s: %w", id, err)
		}
		vf.Net = n
	}
	var cgroups []string
	if o.jail != nil {
		if cgroups, err = o.prepareJail(id, vf); err != nil {
			return nil, fmt.Errorf("starting vm %s: %w", id, err)
		}
		if err := o.setTAPOwner(vf); err != nil {
			o.dropCgroup(id)
			return nil, fmt.Errorf("starting vm %s: %w", id, err)
		}
	} else if err := os.MkdirAll(o.path(id, dirSockets), 0o700); err != nil {
		return nil, fmt.Errorf("starting vm %s: %w", id, err)
	}

	consoleFrom, qemuLogFrom := logSize(o.path(id, fileConsole)), logSize(o.path(id, fileQEMULog))
	defer func() {
		if err != nil {
			o.cleanRuntime(id)
			o.dropCgroup(id)
			if vf.Running {
				// It never ran: record why instead of "should run".
				vf.Running, vf.Failed = false, err.Error()
				_ = o.writeVM(id, vf)
			}
		}
	}()
	vf.Running = true
	vf.Failed = ""
	vf.Paused = false
	vf.Boots++
	if err := o.writeVM(id, vf); err != nil {
		return nil, err
	}
	q, err := o.spawnJailed(id, vf, cgroups, o.vmmDevices(vf, true), append([]string{o.cfg.Binary}, o.qemuArgs(id, vf, r)...), o.path(id, fileQEMULog), o.path(id, fileQEMUPid), vf.Net != nil)
	if err != nil {
		return nil, fmt.Errorf("starting vm %s: %w", id, err)
	}
	p = &vmProcs{qemu: q, consoleFrom: consoleFrom, qemuLogFrom: qemuLogFrom}
	o.mu.Lock()
	o.vms[id] = p
	o.mu.Unlock()
	go o.watch(id, p)
	o.log.Info("started vm", "vm_id", id, "qemu_pid", q.Pid(), "accel", o.accel.Name, "dir", dir)
	return p, nil
}

// qemuArgs is QEMU's command line for a VM. Every value in it comes from
// the validated spec or the configuration; no shell is involved.
//
// With r, QEMU waits for a saved state (-incoming defer, paused after it
// by -S), and the kernel command line is the one the state was saved
// with: a restored VM's devices must be the saved one's exactly.
func (o *Orchestrator) qemuArgs(id string, vf *vmFile, r *restoreFrom) []string {
	spec := vf.Spec
	mem := strconv.Itoa(spec.MemoryMB)
	args := append([]string{"console=ttyS0", "reboot=t", "panic=-1"}, ClockArgs(o.accel.Name)...)
	// The root is named by its disk's serial, so tool disks never change
	// which one it is.
	args = append(args, "root="+bootparams.RootBySerial(types.RootDiskSerial), "rw", bootparams.HostnameArg(spec.Name),
		bootparams.Arg(bootparams.Listen, bootparams.SerialListen), o.cfg.KernelArgs)
	if vf.Net != nil {
		args = append(args, vf.Net.KernelArg)
	}
	tools := toolArgs(spec.Tools)
	if len(tools) > 0 {
		args = append(args, bootparams.Arg(bootparams.ToolsRoot, spec.Tools.Root))
	}
	cmdline := strings.Join(slices.DeleteFunc(args, func(s string) bool { return s == "" }), " ")
	var incoming []string
	if r != nil {
		cmdline = cmp.Or(r.cmdline, cmdline)
		incoming = []string{"-S", "-incoming", "defer"}
	}
	return append(append([]string{
		"-name", "aetherium-" + id + ",process=aetherium-" + id,
		"-M", "microvm",
		"-accel", o.accel.Name,
		"-smp", strconv.Itoa(spec.VCPUs),
		"-m", mem + "M",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-chardev", "file,id=con,path=" + o.path(id, fileConsole) + ",append=on",
		"-serial", "chardev:con",
		"-kernel", o.cfg.KernelPath,
		"-initrd", o.cfg.InitrdPath,
		"-append", cmdline,
		"-drive", "id=root,file=" + o.path(id, vf.disk()) + ",format=qcow2,if=none,discard=unmap",
		"-device", "virtio-blk-device,drive=root,serial=" + types.RootDiskSerial,
		// The agent's channel (see agent.SerialChannel).
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,path=" + o.path(id, fileAgent) + ",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=" + bootparams.AgentSerialPort,
		"-qmp", "unix:" + o.path(id, fileQMP) + ",server=on,wait=off",
	}, incoming...), o.jailArgs(append(tools, netArgs(vf.Net)...))...)
}

// waitAgent waits until the agent answers over its serial channel,
// failing fast when QEMU exits first. The answer waited for is first's
// (the first call the VM needs: it must be safe to repeat, and it is
// retried while the agent cannot be reached), or Info's when first is nil;
// first spares a separate Info round trip, which under TCG costs tens of
// milliseconds of code the restored guest translates afresh.
//
// hint waits for the console's ready line before the first handshake; a
// restored guest prints none.
func (o *Orchestrator) waitAgent(ctx context.Context, id string, p *vmProcs, hint bool, first func(context.Context, *agent.Client) error) error {
	readyCtx, cancel := context.WithTimeout(ctx, o.cfg.ReadyTimeout)
	defer cancel()
	ready := make(chan error, 1)
	go func() {
		// The console line is only a hint that saves handshakes with a
		// guest that has not opened its port yet; Info over the channel
		// is the real test.
		if hint {
			// Bounded well below the ready timeout: a ready line lost in
			// the console (split by kernel messages) must not cost half
			// of it; dialling early only sends a few more HELLOs.
			waitConsole(readyCtx, o.path(id, fileConsole), p.consoleFrom, min(o.cfg.ReadyTimeout/2, consoleHintMax))
		}
		c, err := o.client(id)
		switch {
		case err != nil:
		case first == nil:
			_, err = c.WaitReady(readyCtx)
		default:
			err = agent.UntilReachable(readyCtx, func(ctx context.Context) error { return first(ctx, c) })
		}
		ready <- err
	}()
	select {
	case err := <-ready:
		if err == nil {
			return nil
		}
		if !errors.Is(err, types.ErrUnavailable) && readyCtx.Err() == nil {
			// The agent answered, and first's call failed for its own
			// reason (an old agent, a refused identity): that is the
			// error, with its kind, not a guest that did not answer.
			return err
		}
		// Without ctx's end this is ErrUnavailable, on which StartVM
		// powers the VM off: the message says so before the tail.
		return vmutil.ReadyError(ctx, id, o.cfg.ReadyTimeout, err, "the VM was powered off, so starting it again boots it afresh; the serial console",
			cmp.Or(vmutil.TailFrom(o.path(id, fileConsole), p.consoleFrom, 20), "(empty)"))
	case <-p.qemu.Done():
		cancel()
		<-ready
		// The same words the watcher records as the VM's failure.
		return fmt.Errorf("starting vm %s: it failed before its agent answered: %s", id, o.qemuEnded(id, p))
	}
}

// consoleHintMax bounds the wait for the agent's ready line.
const consoleHintMax = 10 * time.Second

// agentReadyLine is what fc-agent as init prints on the console once the
// agent listens.
const agentReadyLine = bootparams.ReadyLine

// waitConsole waits until the console log, past offset from, holds
// agentReadyLine, or limit passes, or ctx ends. The line is only a hint (a
// guest that logs less still gets dialled after limit).
func waitConsole(ctx context.Context, path string, from int64, limit time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	// Only what is new since the last look is read; the tail of the last
	// read is kept so a line split across two reads is still found.
	off := from
	var carry []byte
	for {
		if f, err := os.Open(path); err == nil {
			if _, err := f.Seek(off, io.SeekStart); err == nil {
				b, _ := io.ReadAll(io.LimitReader(f, 1<<20))
				off += int64(len(b))
				carry = append(carry, b...)
			}
			f.Close()
			if bytes.Contains(carry, []byte(agentReadyLine)) {
				return
			}
			if keep := len(agentReadyLine) - 1; len(carry) > keep {
				carry = append(carry[:0], carry[len(carry)-keep:]...)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// toolArgs attaches each tool volume's image as a read-only virtio-blk
// disk with the serial the guest's init looks for (types.ToolSet's
// delivery contract). Image paths were validated (absolute, no commas).
func toolArgs(ts *types.ToolSet) []string {
	if ts == nil {
		return nil
	}
	var args []string
	for i, v := range ts.Volumes {
		if v.Image == "" {
			continue
		}
		id := "tool" + strconv.Itoa(i)
		args = append(args,
			"-drive", "id="+id+",file="+v.Image+",format=raw,if=none,readonly=on",
			"-device", "virtio-blk-device,drive="+id+",serial="+types.ToolDiskSerial(i))
	}
	return args
}
