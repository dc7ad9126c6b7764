package firecracker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/aetherium/aetherium-core/pkg/network"

	"github.com/aetherium/aetherium-core/pkg/vmm/internal/jail"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// bootArgs is the guest kernel command line. fc-agent's init reads root=
// and aetherium.hostname=; reboot=k makes a guest reboot (and Ctrl-Alt-Del)
// end the Firecracker process.
func (o *Orchestrator) bootArgs(rec *record) string {
	args := "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw " + bootparams.HostnameArg(rec.Name)
	if rec.Options.KernelArg != "" {
		args += " " + rec.Options.KernelArg
	}
	if len(toolVolumes(rec.Tools)) > 0 {
		args += " " + bootparams.Arg(bootparams.ToolsRoot, rec.Tools.Root)
	}
	if o.cfg.BootArgs != "" {
		args += " " + o.cfg.BootArgs
	}
	return args
}

// StartVM implements vmm.VMOrchestrator. A paused VM is resumed, a
// suspended one restored (as Resume does), and a clone not yet started
// (CreateVM with types.VMSpec.FromSnapshot) restored from its snapshot
// with its own identity; a clone stopped since boots its own disk.
func (o *Orchestrator) StartVM(ctx context.Context, id string) error {
	rec, unlock, err := vmutil.Enter(ctx, &o.locks, id, o.readRecord)
	if err != nil {
		return err
	}
	defer unlock()
	p := o.cfg.paths(id)
	if pr := o.running(id); pr != nil {
		info, err := NewClient(p.host(apiSockName)).Describe(ctx)
		switch {
		case err == nil && info.State == InstanceRunning:
			return o.waitAgent(ctx, id, p, pr)
		case err == nil && info.State == InstancePaused:
			if err := NewClient(p.host(apiSockName)).PatchVM(ctx, "Resumed"); err != nil {
				return fmt.Errorf("resuming vm %s: %w", id, err)
			}
			return o.waitAgent(ctx, id, p, pr)
		}
		// A VMM left half-configured by an interrupted start: begin again.
		o.log.Warn("replacing a firecracker process that never started its guest", "vm_id", id, "pid", pr.Pid())
		o.kill(ctx, id, pr)
	}
	switch {
	case rec.Suspended:
		return o.restore(ctx, rec, restoreSuspended)
	case rec.Clone != nil && !rec.Clone.Restored:
		return o.restore(ctx, rec, restoreClone)
	}
	if _, err := o.repairNet(ctx, rec); err != nil {
		return err
	}
	pr, c, err := o.spawn(ctx, id, p, rec)
	if err != nil {
		return err
	}
	fail := func(err error) error {
		o.kill(context.WithoutCancel(ctx), id, pr)
		return fmt.Errorf("starting vm %s: %w", id, err)
	}
	steps := []struct {
		what string
		do   func() error
	}{
		{"configuring the logger", func() error {
			return c.PutLogger(ctx, Logger{LogPath: p.vmm(logName), Level: o.cfg.LogLevel, ShowLevel: true})
		}},
		{"configuring metrics", func() error { return c.PutMetrics(ctx, Metrics{MetricsPath: p.vmm(metricsName)}) }},
		{"setting the machine config", func() error {
			return c.PutMachineConfig(ctx, MachineConfig{VCPUCount: rec.VCPUs, MemSizeMiB: rec.MemoryMB})
		}},
		{"setting the boot source", func() error {
			bs := BootSource{KernelImagePath: o.cfg.KernelPath, InitrdPath: o.cfg.InitrdPath, BootArgs: o.bootArgs(rec)}
			if p.jailed {
				bs.KernelImagePath = p.vmm(kernelName)
				if bs.InitrdPath != "" {
					bs.InitrdPath = p.vmm(initrdName)
				}
			}
			return c.PutBootSource(ctx, bs)
		}},
		{"attaching the rootfs", func() error {
			return c.PutDrive(ctx, Drive{DriveID: "rootfs", PathOnHost: p.vmm(rootfsName), IsRootDevice: true})
		}},
		{"attaching the tool drives", func() error {
			// Firecracker has no drive serials: the guest's init recognises
			// tool disks by their file system label (types.ToolDiskLabel)
			// and mounts each at the directory its marker names.
			for i, v := range toolVolumes(rec.Tools) {
				path := v.Image
				if p.jailed {
					path = p.vmm(toolDriveName(i))
				}
				if err := c.PutDrive(ctx, Drive{DriveID: toolDriveName(i), PathOnHost: path, IsReadOnly: true}); err != nil {
					return err
				}
			}
			return nil
		}},
		{"adding the vsock device", func() error {
			return c.PutVsock(ctx, Vsock{GuestCID: GuestCID, UDSPath: p.vmm(vsockSockName)})
		}},
		{"attaching the network interface", func() error {
			if rec.Options.TAPDevice == "" {
				return nil
			}
			return c.PutNetworkInterface(ctx, NetworkInterface{IfaceID: ifaceID, HostDevName: rec.Options.TAPDevice, GuestMAC: rec.Options.GuestMAC})
		}},
		{"starting the instance", func() error { return c.Action(ctx, ActionInstanceStart) }},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			return fail(fmt.Errorf("%s: %w", s.what, err))
		}
	}
	o.log.Info("started vm", "vm_id", id, "pid", pr.Pid())
	err = o.waitAgent(ctx, id, p, pr)
	if err == nil {
		var ac *agent.Client
		if ac, err = o.client(id); err == nil {
			err = vmutil.SeedBoot(ctx, ac, o.log, id)
		}
	}
	if err != nil {
		o.kill(context.WithoutCancel(ctx), id, pr)
		return err
	}
	return o.markRunning(id)
}

// repairNet re-attaches an attached VM's network before its VMM starts:
// the TAP and rules may be gone (a host reboot, a network teardown);
// Attach is idempotent and repairs them. It returns the attachment, nil
// for a VM without a managed network.
func (o *Orchestrator) repairNet(ctx context.Context, rec *record) (*network.Attachment, error) {
	if !rec.Attached || !o.net.Enabled() {
		return nil, nil
	}
	a, err := o.net.Attach(ctx, rec.ID)
	if err != nil {
		return nil, fmt.Errorf("starting vm %s: %w", rec.ID, err)
	}
	if a.TAP != rec.Options.TAPDevice || a.MAC.String() != rec.Options.GuestMAC || a.KernelArg != rec.Options.KernelArg {
		rec.Options.TAPDevice, rec.Options.GuestMAC, rec.Options.KernelArg = a.TAP, a.MAC.String(), a.KernelArg
		if err := o.writeRecord(rec); err != nil {
			return nil, fmt.Errorf("starting vm %s: %w", rec.ID, err)
		}
	}
	return a, nil
}

// markRunning records that the VM runs by request, so that an exit nobody
// asked for is reported as a crash.
func (o *Orchestrator) markRunning(id string) error {
	if err := os.WriteFile(filepath.Join(o.cfg.paths(id).run, runningMarker), nil, 0o600); err != nil {
		return fmt.Errorf("starting vm %s: %w", id, err)
	}
	return nil
}

// spawn starts the VMM (directly or through the jailer) and waits for its
// API socket to answer.
func (o *Orchestrator) spawn(ctx context.Context, id string, p paths, rec *record) (*vmutil.Proc, *Client, error) {
	// Sockets of an earlier run would make Firecracker fail to bind; the
	// marker of a crashed run is no longer news.
	os.Remove(filepath.Join(p.run, runningMarker))
	os.Remove(p.host(apiSockName))
	os.Remove(p.host(vsockSockName))
	bin, err := exec.LookPath(o.cfg.Binary)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: starting vm %s: firecracker binary %q: %v; install Firecracker v1.16 and set vmm.firecracker.binary (see `aether-cli doctor`)", types.ErrUnavailable, id, o.cfg.Binary, err)
	}
	var cmd *exec.Cmd
	if p.jailed {
		jailer, err := exec.LookPath(o.cfg.Jailer.Binary)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: starting vm %s: jailer binary %q: %v; install the jailer of the same release or disable vmm.firecracker.jailer", types.ErrUnavailable, id, o.cfg.Jailer.Binary, err)
		}
		bin, _ = filepath.Abs(bin)
		ids, err := o.bootIDs(rec, p)
		if err != nil {
			return nil, nil, fmt.Errorf("starting vm %s: %w", id, err)
		}
		if rec.Attached && rec.Options.TAPDevice != "" && o.leases != nil {
			// The jailed VMM has no CAP_NET_ADMIN: its TAP must be its
			// uid's (the manager made it root's).
			tap := rec.Options.TAPDevice
			if err := o.net.Do(func() error { return network.SetTAPOwner(tap, ids.UID, ids.GID) }); err != nil {
				return nil, nil, fmt.Errorf("starting vm %s: %w", id, err)
			}
		}
		cmd = exec.Command(jailer, o.jailerArgs(id, bin, ids, rec.VCPUs, rec.MemoryMB)...)
	} else {
		cmd = exec.Command(bin, "--api-sock", p.host(apiSockName), "--id", id)
	}
	console, err := os.OpenFile(filepath.Join(p.run, consoleName), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("starting vm %s: %w", id, err)
	}
	defer console.Close()
	cmd.Stdout, cmd.Stderr = console, console
	cmd.Dir = p.run
	var start func() error
	if !(p.jailed && o.cfg.Jailer.NetNS != "") {
		// The VMM opens its TAP by name, so it runs where the TAPs are.
		start = func() error { return o.net.Do(cmd.Start) }
	}
	// Its own session: the VM survives the worker and its signals.
	pr, err := vmutil.Spawn(cmd, filepath.Join(p.run, pidFileName), start)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: starting vm %s: %v", types.ErrUnavailable, id, err)
	}
	o.mu.Lock()
	o.procs[id] = pr
	o.mu.Unlock()

	c := NewClient(p.host(apiSockName))
	rctx, cancel := context.WithTimeout(ctx, o.cfg.ReadyTimeout)
	defer cancel()
	for {
		_, err := c.Describe(rctx)
		if err == nil {
			return pr, c, nil
		}
		select {
		case <-pr.Done():
			return nil, nil, fmt.Errorf("%w: starting vm %s: firecracker exited before its API socket answered; its output ends with:\n%s",
				types.ErrUnavailable, id, vmutil.Tail(filepath.Join(p.run, consoleName), 20))
		case <-rctx.Done():
			o.kill(context.WithoutCancel(ctx), id, pr)
			if ctx.Err() != nil {
				return nil, nil, fmt.Errorf("starting vm %s: %w", id, ctx.Err())
			}
			return nil, nil, fmt.Errorf("%w: starting vm %s: firecracker's API socket %s did not answer within %s: %v",
				types.ErrUnavailable, id, p.host(apiSockName), o.cfg.ReadyTimeout, err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// jailerArgs builds the jailer's command line (docs/jailer.md) for a VM
// with vcpus and memoryMB of guest memory. The API socket is put at
// /api.sock in the jail, beside the VM's other files.
//
// The jailer makes the VM's cgroup, <parent>/<id>, and writes each
// --cgroup file=value into it before it drops privileges; without them
// the cgroup would have no limits. They are the qemu backend's limits
// (jail.VMLimits at its defaults): a CPU quota of the vCPUs plus
// jail.DefaultCPUOverheadMillis, the guest memory plus
// jail.DefaultMemoryOverheadMB, and jail.DefaultPidsMax tasks.
func (o *Orchestrator) jailerArgs(id, execFile string, ids jail.IDs, vcpus, memoryMB int) []string {
	j := o.cfg.Jailer
	version := strconv.Itoa(j.CgroupVersion)
	args := []string{
		"--id", id,
		"--exec-file", execFile,
		"--uid", strconv.Itoa(ids.UID),
		"--gid", strconv.Itoa(ids.GID),
		"--chroot-base-dir", j.ChrootBaseDir,
		"--cgroup-version", version,
	}
	if j.ParentCgroup != "" {
		args = append(args, "--parent-cgroup", j.ParentCgroup)
	}
	for _, f := range jail.VMLimits(jail.Config{}, vcpus, memoryMB).Files(version) {
		args = append(args, "--cgroup", f.Name+"="+f.Value)
	}
	if j.NetNS != "" {
		args = append(args, "--netns", j.NetNS)
	}
	return append(args, "--", "--api-sock", "/"+apiSockName)
}

// waitAgent waits until fc-agent answers over hybrid vsock, or the VMM
// exits, or ReadyTimeout passes.
func (o *Orchestrator) waitAgent(ctx context.Context, id string, p paths, pr *vmutil.Proc) error {
	c, err := o.client(id)
	if err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, o.cfg.ReadyTimeout)
	defer cancel()
	ready := make(chan error, 1)
	go func() {
		_, err := c.WaitReady(rctx)
		ready <- err
	}()
	var exited <-chan struct{}
	if pr != nil {
		exited = pr.Done()
	}
	select {
	case err := <-ready:
		if err == nil {
			return nil
		}
		o.clients.Drop(id)
		if ctx.Err() != nil {
			return fmt.Errorf("starting vm %s: waiting for its agent: %w", id, ctx.Err())
		}
		return fmt.Errorf("%w: starting vm %s: VSock connection timeout: fc-agent did not answer on vsock port %d via %s within %s: %v; check that the guest kernel has virtio_vsock and that fc-agent is the initramfs's /init. Firecracker's log ends with:\n%s",
			types.ErrUnavailable, id, bootparams.AgentPort, p.host(vsockSockName), o.cfg.ReadyTimeout, err, vmutil.Tail(p.host(logName), 20))
	case <-exited:
		cancel()
		<-ready
		o.clients.Drop(id)
		return fmt.Errorf("%w: starting vm %s: firecracker exited before the agent answered; its output ends with:\n%s",
			types.ErrUnavailable, id, vmutil.Tail(filepath.Join(p.run, consoleName), 20))
	}
}

// toolVolumes returns the volumes of a tool set that have an image to
// attach.
func toolVolumes(s *types.ToolSet) []types.ToolVolume {
	if s == nil {
		return nil
	}
	var vs []types.ToolVolume
	for _, v := range s.Volumes {
		if v.Image != "" {
			vs = append(vs, v)
		}
	}
	return vs
}

// toolDriveName names the i-th tool drive: its drive id and, with the
// jailer, its file in the jail.
func toolDriveName(i int) string { return fmt.Sprintf("tool%d", i) }

// bootIDs returns the uid/gid a jailed VM boots as: the pair its record
// names, claimed again (a no-op while the lease is its own), or, for a VM
// recorded before it had one, a fresh lease written to its record.
func (o *Orchestrator) bootIDs(rec *record, p paths) (jail.IDs, error) {
	if o.leases == nil {
		return jail.IDs{UID: o.cfg.Jailer.UID, GID: o.cfg.Jailer.GID}, nil
	}
	if rec.Jail != nil {
		return *rec.Jail, o.leases.Claim(*rec.Jail, p.run)
	}
	ids, err := o.leases.Acquire(p.run)
	if err != nil {
		return ids, err
	}
	for _, f := range []string{p.root, p.host(rootfsName), p.host(logName), p.host(metricsName)} {
		if err := os.Chown(f, ids.UID, ids.GID); err != nil && !errors.Is(err, os.ErrNotExist) {
			return ids, fmt.Errorf("giving %s to the jailer's uid %d: %w", f, ids.UID, err)
		}
	}
	rec.Jail = &ids
	return ids, o.writeRecord(rec)
}
