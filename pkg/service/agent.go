package service

import (
	"context"
	"net"
)

// AgentDialer reaches the guest agents of VMs wherever their workers are,
// for planes that speak the agent's own protocol (process table, file
// system calls) instead of going through tasks: agent.NewClient over a
// dialer that calls DialAgent is an ordinary agent client. It is separate
// from TaskService because it hands out raw connections, which only code
// in the API process can use.
type AgentDialer interface {
	// DialAgent opens a fresh byte stream to the gRPC server of VM vmID's
	// guest agent, through the data plane of the worker that owns the VM.
	// It is scope-checked like every read: a VM of another tenant answers
	// types.ErrNotFound, as does a missing one; an id that is not a UUID is
	// types.ErrInvalid. The VM must be running (types.ErrConflict
	// otherwise, saying how to start it). A worker or agent that cannot be
	// reached is types.ErrUnavailable, and a service without a data plane
	// types.ErrNotSupported. Each call opens a new connection, so it can
	// be retried; ctx bounds the dial only, and the caller closes the conn.
	DialAgent(ctx context.Context, vmID string) (net.Conn, error)
}

var _ AgentDialer = (*Service)(nil)

// DialAgent implements AgentDialer.
func (s *Service) DialAgent(ctx context.Context, vmID string) (net.Conn, error) {
	addr, vm, err := s.dataAddr(ctx, vmID, "reach the agent of")
	if err != nil {
		return nil, err
	}
	return s.opts.dataPlane.DialAgent(ctx, addr, vm)
}
