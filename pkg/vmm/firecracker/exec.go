package firecracker

import (
	"context"
	"fmt"
	"net"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
	"github.com/aetherium/aetherium-core/pkg/vsock"
)

// ExecuteCommand implements vmm.VMOrchestrator. The command's environment
// is the VM spec's overlaid with cmd.Env.
func (o *Orchestrator) ExecuteCommand(ctx context.Context, id string, cmd types.Command, stream vmm.ExecIO) (*types.ExecResult, error) {
	c, rec, err := o.runningAgent(ctx, id)
	if err != nil {
		return nil, err
	}
	return vmutil.Exec(ctx, c, id, rec.Env, cmd, stream)
}

// runningRecord returns the record of a running VM, or types.ErrNotFound
// or types.ErrConflict.
func (o *Orchestrator) runningRecord(ctx context.Context, id string) (*record, error) {
	if types.ValidateID(id) != nil {
		return nil, notFound(id)
	}
	rec, err := o.readRecord(id)
	if err != nil {
		return nil, err
	}
	st, err := o.status(ctx, id)
	if err != nil {
		return nil, err
	}
	if st.State == types.VMPaused || st.State == types.VMSuspended {
		return nil, fmt.Errorf("%w: vm %s is %s; resume it first", types.ErrConflict, id, st.State)
	}
	if st.State != types.VMRunning {
		what := string(st.State)
		if st.Detail != "" {
			what += " (" + st.Detail + ")"
		}
		return nil, fmt.Errorf("%w: vm %s is %s; start it first", types.ErrConflict, id, what)
	}
	return rec, nil
}

// runningAgent returns the agent client of a running VM and its record.
func (o *Orchestrator) runningAgent(ctx context.Context, id string) (*agent.Client, *record, error) {
	rec, err := o.runningRecord(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	c, err := o.client(id)
	return c, rec, err
}

// dialerOf is the dialer of a running VM's agent as a vmutil.RunningDialer.
func (o *Orchestrator) dialerOf(ctx context.Context, id string) (agent.Dialer, error) {
	if _, err := o.runningRecord(ctx, id); err != nil {
		return nil, err
	}
	return o.dialer(id), nil
}

// dialer reaches VM id's agent; the cached client and DialAgent share it.
func (o *Orchestrator) dialer(id string) agent.Dialer {
	uds := o.cfg.paths(id).host(vsockSockName)
	return func(ctx context.Context) (net.Conn, error) {
		return vsock.Dial(ctx, uds, bootparams.AgentPort)
	}
}

// agentOf is runningAgent as a vmutil.RunningAgent.
func (o *Orchestrator) agentOf(ctx context.Context, id string) (*agent.Client, error) {
	c, _, err := o.runningAgent(ctx, id)
	return c, err
}

// client returns the cached agent client of VM id, which reaches fc-agent
// through the VM's hybrid vsock socket.
func (o *Orchestrator) client(id string) (*agent.Client, error) {
	return o.clients.Get(id, o.dialer(id))
}
