package agent

import (
	"context"
	"fmt"
	"io"
	"maps"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// ProcessSpec is a process to start in the guest's process table.
type ProcessSpec struct {
	// Cmd is the program, looked up in PATH unless it contains a slash.
	Cmd string
	// Args follow the program name.
	Args []string
	// Env is set over the agent's PATH and the user's HOME, USER and
	// LOGNAME; the agent's own environment is not inherited.
	Env map[string]string
	// Cwd is the working directory: empty is the user's home, and a
	// relative path or "~/..." is resolved against it. A missing one fails
	// with types.ErrInvalid.
	Cwd string
	// User runs the process: a name from the guest's /etc/passwd or a
	// numeric uid; empty: the agent's user (root).
	User string
	// Tag names the process for ConnectProcess and the other calls; empty:
	// none. At most one running process has a given tag.
	Tag string
	// Stdin gives the process a pipe fed by WriteStdin and closed by
	// CloseStdin; otherwise it reads /dev/null.
	Stdin bool
	// Timeout kills the process group once elapsed; 0: never.
	Timeout time.Duration
	// KeepaliveInterval sends a keepalive event on the returned stream
	// whenever nothing else was sent for that long, so that proxies keep
	// an idle stream open; 0: no keepalives.
	KeepaliveInterval time.Duration
}

// ProcessSelector names a process of the table: by PID when it is set,
// otherwise by Tag.
type ProcessSelector struct {
	PID uint32
	Tag string
}

// ProcessEnd is how a process ended, as Go's os.ProcessState and
// exec.Cmd.Wait report it.
type ProcessEnd struct {
	// ExitCode is the exit status; -1 when a signal ended the process.
	ExitCode int32
	// Exited is true when the process exited on its own.
	Exited bool
	// Status reads like "exit status 3" or "signal: killed".
	Status string
	// Error is the text of the error cmd.Wait would return; empty on
	// success.
	Error string
}

// ProcessEvent is one event of a ProcessStream: exactly one of PID (the
// start, always first), Stdout, Stderr, End (always last) and Keepalive
// is set.
type ProcessEvent struct {
	PID            uint32
	Stdout, Stderr []byte
	End            *ProcessEnd
	Keepalive      bool
}

// ProcessStream follows a process of the guest's table.
type ProcessStream interface {
	// Recv returns the next event. After the End event it returns io.EOF.
	// A stream that the agent cut off because its reader fell far behind
	// the output returns an error; ConnectProcess follows the process
	// again from then on. Other errors are those of the Client.
	Recv() (*ProcessEvent, error)
	// Close stops following the process; the process keeps running. It
	// must be called unless Recv returned io.EOF or an error, and may be
	// called more than once.
	Close() error
}

// ProcessInfo describes a running process of the table.
type ProcessInfo struct {
	PID  uint32
	Tag  string
	Cmd  string
	Args []string
	// Env is the environment the process was started with (ProcessSpec.Env,
	// without the defaults).
	Env map[string]string
	// Cwd is the resolved working directory.
	Cwd string
}

// StartProcess starts a process in the guest's table and returns once it
// runs, with a stream whose first Recv returns the start event (its pid).
// The stream then carries the process's output, keepalives and its end.
//
// Unlike Exec and Start, the process outlives the stream: cancelling ctx
// or closing the stream only stops following it; SignalProcess, the
// timeout or the agent stopping end it. A process that cannot start (no
// such program or cwd, unknown user) fails with types.ErrInvalid, a tag
// held by a running process with types.ErrConflict, and an agent older
// than this call with types.ErrNotSupported. It is not idempotent: each
// call starts a process.
func (c *Client) StartProcess(ctx context.Context, spec ProcessSpec) (ProcessStream, error) {
	// The spec is the agent's to check (empty command, env names, negative
	// durations), at the trust boundary; its refusal comes back as
	// types.ErrInvalid.
	op := fmt.Sprintf("starting %q in the guest", spec.Cmd)
	req := &agentpb.ProcessStartRequest{
		Cmd:                 spec.Cmd,
		Args:                spec.Args,
		Env:                 spec.Env,
		Cwd:                 spec.Cwd,
		User:                spec.User,
		Tag:                 spec.Tag,
		Stdin:               spec.Stdin,
		TimeoutMs:           millis(spec.Timeout),
		KeepaliveIntervalMs: millis(spec.KeepaliveInterval),
	}
	return c.openProcessStream(ctx, op, func(ctx context.Context) (grpc.ServerStreamingClient[agentpb.ProcessEvent], error) {
		return c.api.StartProcess(ctx, req)
	})
}

// ConnectProcess follows a process of the guest's table: the first Recv
// returns the start event (its pid), then come the output it produces from
// now on, keepalives every keepalive of silence (0: none) and its end. A
// process that ended in the last minute answers its start and its end. An
// unknown one fails with types.ErrNotFound. Several streams may follow one
// process; each gets all of the output. Cancelling ctx or closing the
// stream only detaches.
func (c *Client) ConnectProcess(ctx context.Context, sel ProcessSelector, keepalive time.Duration) (ProcessStream, error) {
	op := "attaching to " + sel.String() + " in the guest"
	psel, err := sel.proto(op)
	if err != nil {
		return nil, err
	}
	req := &agentpb.ProcessConnectRequest{Process: psel, KeepaliveIntervalMs: millis(keepalive)}
	return c.openProcessStream(ctx, op, func(ctx context.Context) (grpc.ServerStreamingClient[agentpb.ProcessEvent], error) {
		return c.api.ConnectProcess(ctx, req)
	})
}

// openProcessStream opens a stream and waits for its start event.
func (c *Client) openProcessStream(ctx context.Context, op string, open func(context.Context) (grpc.ServerStreamingClient[agentpb.ProcessEvent], error)) (ProcessStream, error) {
	sctx, cancel := context.WithCancel(ctx)
	st, err := open(sctx)
	if err != nil {
		cancel()
		return nil, c.newCallError(ctx, op, err)
	}
	s := &clientProcessStream{c: c, ctx: ctx, op: op, stream: st, cancel: cancel}
	first, err := s.Recv()
	if err != nil {
		cancel()
		return nil, err
	}
	if first.End != nil || first.PID == 0 {
		cancel()
		return nil, fmt.Errorf("%s: the agent sent an event before the start; is it a compatible version?", op)
	}
	s.first = first
	return s, nil
}

// clientProcessStream is the ProcessStream of StartProcess and
// ConnectProcess. Like a gRPC stream, it is for one reader.
type clientProcessStream struct {
	c      *Client
	ctx    context.Context // the caller's, to tell cancellation from failure
	op     string
	stream grpc.ServerStreamingClient[agentpb.ProcessEvent]
	cancel context.CancelFunc

	first *ProcessEvent // the start, until the first Recv
	ended bool
}

func (s *clientProcessStream) Recv() (*ProcessEvent, error) {
	if ev := s.first; ev != nil {
		s.first = nil
		return ev, nil
	}
	for !s.ended {
		m, err := s.stream.Recv()
		if err == io.EOF {
			s.ended = true
			return nil, fmt.Errorf("%s: %w: the agent ended the stream without the process's end", s.op, types.ErrUnavailable)
		}
		if err != nil {
			s.ended = true
			s.cancel()
			return nil, s.c.newCallError(s.ctx, s.op, err)
		}
		ev := &ProcessEvent{}
		switch e := m.GetEvent().(type) {
		case *agentpb.ProcessEvent_Start:
			ev.PID = e.Start.GetPid()
		case *agentpb.ProcessEvent_Data:
			ev.Stdout, ev.Stderr = e.Data.GetStdout(), e.Data.GetStderr()
			if ev.Stdout == nil && ev.Stderr == nil {
				continue
			}
		case *agentpb.ProcessEvent_Keepalive:
			ev.Keepalive = true
		case *agentpb.ProcessEvent_End:
			x := e.End
			ev.End = &ProcessEnd{ExitCode: x.GetExitCode(), Exited: x.GetExited(), Status: x.GetStatus(), Error: x.GetError()}
			s.ended = true
			s.cancel()
		default:
			continue // an event of a newer agent
		}
		return ev, nil
	}
	return nil, io.EOF
}

func (s *clientProcessStream) Close() error {
	s.cancel()
	return nil
}

// ListProcesses lists the running processes of the guest's table, by pid.
func (c *Client) ListProcesses(ctx context.Context) ([]ProcessInfo, error) {
	resp, err := c.api.ListProcesses(ctx, &agentpb.ListProcessesRequest{})
	if err != nil {
		return nil, c.newCallError(ctx, "listing the guest's processes", err)
	}
	var ps []ProcessInfo
	for _, p := range resp.GetProcesses() {
		ps = append(ps, ProcessInfo{
			PID:  p.GetPid(),
			Tag:  p.GetTag(),
			Cmd:  p.GetCmd(),
			Args: p.GetArgs(),
			Env:  maps.Clone(p.GetEnv()),
			Cwd:  p.GetCwd(),
		})
	}
	return ps, nil
}

// SignalProcess sends sig to the process group of a running process of
// the table. Unknown or ended processes give types.ErrNotFound.
func (c *Client) SignalProcess(ctx context.Context, sel ProcessSelector, sig syscall.Signal) error {
	op := fmt.Sprintf("sending signal %d to %s in the guest", int(sig), sel)
	psel, err := sel.proto(op)
	if err != nil {
		return err
	}
	if _, err := c.api.SignalProcess(ctx, &agentpb.SignalProcessRequest{Process: psel, Signal: int32(sig)}); err != nil {
		return c.newCallError(ctx, op, err)
	}
	return nil
}

// WriteStdin writes data to the stdin of a running process of the table,
// waiting while the process does not read. Unknown or ended processes
// give types.ErrNotFound; one started without ProcessSpec.Stdin, or whose
// stdin was closed, types.ErrInvalid. If ctx ends meanwhile, part of data
// may have been written.
func (c *Client) WriteStdin(ctx context.Context, sel ProcessSelector, data []byte) error {
	op := "writing to the stdin of " + sel.String() + " in the guest"
	psel, err := sel.proto(op)
	if err != nil {
		return err
	}
	// Chunked: one message must stay under gRPC's 4 MiB limit. Empty data
	// is still sent, and checks that the process can take input.
	for {
		n := min(len(data), chunkSize)
		if _, err := c.api.WriteStdin(ctx, &agentpb.WriteStdinRequest{Process: psel, Data: data[:n]}); err != nil {
			return c.newCallError(ctx, op, err)
		}
		if data = data[n:]; len(data) == 0 {
			return nil
		}
	}
}

// CloseStdin closes the stdin of a process of the table, which reads it as
// end of input. It is idempotent: closing it again, or once the process
// has ended, is harmless. An unknown process gives types.ErrNotFound, one
// started without ProcessSpec.Stdin types.ErrInvalid.
func (c *Client) CloseStdin(ctx context.Context, sel ProcessSelector) error {
	op := "closing the stdin of " + sel.String() + " in the guest"
	psel, err := sel.proto(op)
	if err != nil {
		return err
	}
	if _, err := c.api.CloseStdin(ctx, &agentpb.CloseStdinRequest{Process: psel}); err != nil {
		return c.newCallError(ctx, op, err)
	}
	return nil
}

func (sel ProcessSelector) String() string {
	if sel.PID != 0 {
		return fmt.Sprintf("process %d", sel.PID)
	}
	return fmt.Sprintf("process tagged %q", sel.Tag)
}

func (sel ProcessSelector) proto(op string) (*agentpb.ProcessSelector, error) {
	switch {
	case sel.PID != 0:
		return &agentpb.ProcessSelector{Selector: &agentpb.ProcessSelector_Pid{Pid: sel.PID}}, nil
	case sel.Tag != "":
		return &agentpb.ProcessSelector{Selector: &agentpb.ProcessSelector_Tag{Tag: sel.Tag}}, nil
	}
	return nil, fmt.Errorf("%s: %w: name the process by PID or Tag", op, types.ErrInvalid)
}

// millis rounds d up to whole milliseconds, so that a short timeout does
// not become "none".
func millis(d time.Duration) int64 {
	return int64((d + time.Millisecond - 1) / time.Millisecond)
}

// newCallError is rpcError for the calls of protocol revision 3: an agent
// that does not know them answers Unimplemented, and Info tells which
// agent that is.
func (c *Client) newCallError(ctx context.Context, op string, err error) error {
	return c.revisionError(ctx, op, err, protocolProcessesFiles)
}

// revisionError is newCallError for a call that protocol revision need
// introduced.
func (c *Client) revisionError(ctx context.Context, op string, err error, need uint32) error {
	if status.Code(err) != codes.Unimplemented || ctx.Err() != nil {
		return rpcError(ctx, op, err)
	}
	detail := fmt.Sprintf("it does not implement protocol %d", need)
	if info, ierr := c.api.Info(ctx, &agentpb.InfoRequest{}); ierr == nil {
		detail = fmt.Sprintf("fc-agent %s speaks protocol %d; this call needs %d", info.GetVersion(), info.GetProtocol(), need)
	}
	return fmt.Errorf("%s: %w: the guest agent is too old (%s); rebuild the guest image", op, types.ErrNotSupported, detail)
}
