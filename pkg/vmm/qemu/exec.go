package qemu

import (
	"context"
	"fmt"
	"net"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// ExecuteCommand implements vmm.VMOrchestrator. The command's environment
// is the VM spec's overlaid with cmd.Env; PATH and HOME come from the agent
// unless either sets them, so the VM's tool directories lead PATH.
func (o *Orchestrator) ExecuteCommand(ctx context.Context, id string, cmd types.Command, stream vmm.ExecIO) (*types.ExecResult, error) {
	c, vf, err := o.runningAgent(id)
	if err != nil {
		return nil, err
	}
	return vmutil.Exec(ctx, c, id, vf.Spec.Env, cmd, stream)
}

// running returns the record of a running VM, or types.ErrNotFound or
// types.ErrConflict.
func (o *Orchestrator) running(id string) (*vmFile, error) {
	if types.ValidateID(id) != nil {
		return nil, notFound(id)
	}
	vf, err := o.readVM(id)
	if err != nil {
		return nil, err
	}
	if err := notRunning(id, vf); err != nil {
		return nil, err
	}
	p := o.procs(id)
	if p == nil || !p.qemu.Alive() {
		st := types.VMStopped
		if vf.Failed != "" {
			st = types.VMFailed
		}
		return nil, fmt.Errorf("%w: vm %s is %s; start it first", types.ErrConflict, id, st)
	}
	return vf, nil
}

// runningAgent returns the agent client of a running VM and its record.
func (o *Orchestrator) runningAgent(id string) (*agent.Client, *vmFile, error) {
	vf, err := o.running(id)
	if err != nil {
		return nil, nil, err
	}
	c, err := o.client(id)
	return c, vf, err
}

// dialerOf is the dialer of a running VM's agent as a vmutil.RunningDialer.
func (o *Orchestrator) dialerOf(ctx context.Context, id string) (agent.Dialer, error) {
	if _, err := o.running(id); err != nil {
		return nil, err
	}
	return o.dialer(id), nil
}

// dialer reaches VM id's agent through its serial channel, which the
// cached client and DialAgent share: QEMU's chardev serves one connection,
// and one session carries every stream.
func (o *Orchestrator) dialer(id string) agent.Dialer {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.channelLocked(id).Dial
}

// channelLocked returns VM id's serial channel, making it on first use.
// o.mu is held.
func (o *Orchestrator) channelLocked(id string) *agent.SerialChannel {
	c := o.chans[id]
	if c == nil {
		sock, uid := o.path(id, fileAgent), o.sockOwner(id)
		c = agent.NewSerialChannel(func(ctx context.Context) (net.Conn, error) { return dialOwned(ctx, sock, uid) })
		o.chans[id] = c
	}
	return c
}

// dropChannel forgets VM id's agent client and serial channel, ending
// their connection.
func (o *Orchestrator) dropChannel(id string) {
	// The session first: its end ends the client's streams at once.
	o.mu.Lock()
	c := o.chans[id]
	delete(o.chans, id)
	o.mu.Unlock()
	if c != nil {
		c.Close()
	}
	o.clients.Drop(id)
}

// dialOwned connects to the agent's serial port socket at sock, which
// must be a socket of uid: the VM's uid owns the directory it is in, and
// must not be able to point the root worker at another socket.
func dialOwned(ctx context.Context, sock string, uid int) (net.Conn, error) {
	p, release, err := vmutil.OwnedSocket(sock, uid)
	if err != nil {
		return nil, err
	}
	defer release()
	var d net.Dialer
	return d.DialContext(ctx, "unix", p)
}

// sockOwner is the uid VM id's sockets belong to: its jail uid when it
// runs confined, root otherwise.
func (o *Orchestrator) sockOwner(id string) int {
	if vf, err := o.readVM(id); err == nil && vf.Jail != nil && o.jail != nil {
		return vf.Jail.UID
	}
	return 0
}

// agentOf is runningAgent as a vmutil.RunningAgent.
func (o *Orchestrator) agentOf(ctx context.Context, id string) (*agent.Client, error) {
	c, _, err := o.runningAgent(id)
	return c, err
}

// client returns the agent client of a running VM, making it on first use.
func (o *Orchestrator) client(id string) (*agent.Client, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.vms[id] == nil {
		return nil, fmt.Errorf("%w: vm %s is not running; start it first", types.ErrConflict, id)
	}
	return o.clients.Get(id, o.channelLocked(id).Dial)
}
