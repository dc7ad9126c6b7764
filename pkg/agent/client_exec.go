package agent

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Exec runs cmd in the guest and waits for it. Output is written to stdout
// and stderr (either may be nil) as it arrives, and kept in the result up
// to cmd.MaxOutputBytes per stream (0: types.DefaultMaxOutputBytes), with
// the truncation flags set past that. cmd.Stdin is the command's whole
// input; without it the command reads /dev/null.
//
// A command that ran returns a result whatever its exit code; one killed by
// cmd.Timeout has TimedOut set and exit code 124. A program that does not
// exist returns a result with exit code 127, and one that exists but
// cannot be executed (no exec bit, a directory, a bad interpreter) exit
// code 126, each with "aetherium: <program>: <reason>" on stderr, as a
// shell or `docker exec` reports them. A request that cannot run as given
// (bad cwd, unknown user, empty command) returns an error wrapping
// types.ErrInvalid with the agent's reason. An unreachable agent gives
// types.ErrUnavailable. Cancelling ctx kills the command's process group in
// the guest and returns the context's error. If writing to stdout or stderr
// fails, the command still runs to the end and Exec returns the result
// together with that error.
func (c *Client) Exec(ctx context.Context, cmd types.Command, stdout, stderr io.Writer) (*types.ExecResult, error) {
	p, err := c.Start(ctx, cmd, nil, stdout, stderr)
	if err != nil {
		return nil, err
	}
	return p.Wait()
}

// Process is a command running in the guest, started by Client.Start.
type Process struct {
	// Pid is the command's pid in the guest; it leads its process group.
	// It is 0 for a program that was missing or could not be executed.
	Pid int

	op     string
	stream grpc.BidiStreamingClient[agentpb.ExecRequest, agentpb.ExecResponse]
	cancel context.CancelFunc
	sendMu sync.Mutex // gRPC allows one sender at a time

	done chan struct{} // closed when res and err are set
	res  *types.ExecResult
	err  error
}

// Start starts cmd in the guest and returns once it runs; Wait collects the
// result. A missing or unusable program gives a Process that has already
// ended (Pid 0) with the result Exec describes. It is Exec with stdin streamed from r (cmd.Stdin, if any, goes
// first; with neither the command reads /dev/null) and with the running
// command's handle. Cancelling ctx kills the command. If r blocks after the
// command has exited, the goroutine reading it lingers until Read returns.
func (c *Client) Start(ctx context.Context, cmd types.Command, r io.Reader, stdout, stderr io.Writer) (*Process, error) {
	op := fmt.Sprintf("running %q in the guest", cmd.Cmd)
	// The command is not validated here: the service validated what the
	// user typed and the agent checks what it is asked to run (empty
	// command, env names). Only what would break this process is refused.
	if cmd.MaxOutputBytes < 0 {
		return nil, fmt.Errorf("%s: %w: max output bytes %d is negative", op, types.ErrInvalid, cmd.MaxOutputBytes)
	}
	if len(cmd.Stdin) > 0 {
		if r == nil {
			r = bytes.NewReader(cmd.Stdin)
		} else {
			r = io.MultiReader(bytes.NewReader(cmd.Stdin), r)
		}
	}
	limit := cmp.Or(cmd.MaxOutputBytes, types.DefaultMaxOutputBytes)

	sctx, cancel := context.WithCancel(ctx)
	stream, err := c.api.Exec(sctx)
	if err != nil {
		cancel()
		return nil, rpcError(ctx, op, err)
	}
	start := &agentpb.ExecStart{
		Cmd:            cmd.Cmd,
		Args:           cmd.Args,
		Env:            cmd.Env,
		Cwd:            cmd.Cwd,
		User:           cmd.User,
		TimeoutMs:      int64((cmd.Timeout + time.Millisecond - 1) / time.Millisecond),
		MaxOutputBytes: int64(limit),
		Stdin:          r != nil,
	}
	// A failed Send means the stream ended; Recv reports why.
	_ = stream.Send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Start{Start: start}})
	first, err := stream.Recv()
	if err != nil {
		cancel()
		if err == io.EOF {
			return nil, fmt.Errorf("%s: %w: the agent ended the call without starting the command", op, types.ErrUnavailable)
		}
		return nil, rpcError(ctx, op, err)
	}
	var pid int
	switch m := first.GetMsg().(type) {
	case *agentpb.ExecResponse_StartedPid:
		pid = int(m.StartedPid)
	case *agentpb.ExecResponse_Exit:
		cancel()
		if p := notStarted(op, m.Exit, limit, stdout, stderr); p != nil {
			return p, nil
		}
		return nil, fmt.Errorf("%s: %w: %s", op, types.ErrInvalid, cmp.Or(m.Exit.GetError(), "the agent reported an exit before the start"))
	default:
		cancel()
		return nil, fmt.Errorf("%s: the agent sent %T before the start; is it a compatible version?", op, m)
	}

	p := &Process{Pid: pid, op: op, stream: stream, cancel: cancel, done: make(chan struct{})}
	if r != nil {
		go p.sendStdin(r)
	}
	go p.receive(ctx, limit, stdout, stderr)
	return p, nil
}

// notStarted turns the agent's report of a program that is missing (exit
// code 127) or cannot be executed (126) into a finished Process, as a
// shell reports them: that exit code and "aetherium: <reason>" on stderr,
// which is also written to the caller's stderr. Other early exits are
// not a result; it returns nil for them.
func notStarted(op string, x *agentpb.ExecExit, limit int, stdout, stderr io.Writer) *Process {
	code := int(x.GetExitCode())
	if x.GetError() == "" || (code != bootparams.ExitNotFound && code != bootparams.ExitCannotExecute) {
		return nil
	}
	errs := outputSink{w: stderr, name: "stderr", limit: limit}
	errs.write([]byte("aetherium: " + x.GetError() + "\n"))
	p := &Process{op: op, cancel: func() {}, done: make(chan struct{})}
	p.res = &types.ExecResult{
		ExitCode:        code,
		Stdout:          []byte{},
		Stderr:          errs.kept,
		StderrTruncated: errs.truncated,
		StartedAt:       time.Unix(0, x.GetStartedUnixNano()),
		FinishedAt:      time.Unix(0, x.GetFinishedUnixNano()),
	}
	if errs.err != nil {
		p.err = fmt.Errorf("%s: %w", op, errs.err)
	}
	close(p.done)
	return p
}

// Signal sends sig to the command's process group. Once the command has
// exited it returns an error wrapping types.ErrConflict.
func (p *Process) Signal(sig syscall.Signal) error {
	select {
	case <-p.done:
		return fmt.Errorf("signalling pid %d: %w: the command has exited", p.Pid, types.ErrConflict)
	default:
	}
	if err := p.send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Signal{Signal: int32(sig)}}); err != nil {
		return fmt.Errorf("signalling pid %d: %w: the command has exited or the agent is gone", p.Pid, types.ErrConflict)
	}
	return nil
}

// Wait waits for the command to end and returns what Exec would. It may
// be called more than once and from several goroutines.
func (p *Process) Wait() (*types.ExecResult, error) {
	<-p.done
	return p.res, p.err
}

func (p *Process) send(m *agentpb.ExecRequest) error {
	p.sendMu.Lock()
	defer p.sendMu.Unlock()
	return p.stream.Send(m)
}

// sendStdin streams r to the command, then closes its stdin; a read error
// closes it too, as end of input.
func (p *Process) sendStdin(r io.Reader) {
	buf := make([]byte, chunkSize)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if p.send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Stdin{Stdin: bytes.Clone(buf[:n])}}) != nil {
				return // the command's stream has ended
			}
		}
		if err != nil {
			_ = p.send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_CloseStdin{CloseStdin: true}})
			return
		}
	}
}

// receive collects output and the exit. ctx is the caller's, to tell its
// cancellation from a broken connection.
func (p *Process) receive(ctx context.Context, limit int, stdout, stderr io.Writer) {
	defer close(p.done)
	defer p.cancel()
	res := &types.ExecResult{}
	out := outputSink{w: stdout, name: "stdout", limit: limit}
	errs := outputSink{w: stderr, name: "stderr", limit: limit}
	for {
		m, err := p.stream.Recv()
		if err == io.EOF {
			p.err = fmt.Errorf("%s: %w: the agent ended the call without reporting the exit", p.op, types.ErrUnavailable)
			return
		}
		if err != nil {
			p.err = rpcError(ctx, p.op, err)
			return
		}
		switch m := m.GetMsg().(type) {
		case *agentpb.ExecResponse_Stdout:
			out.write(m.Stdout)
		case *agentpb.ExecResponse_Stderr:
			errs.write(m.Stderr)
		case *agentpb.ExecResponse_Exit:
			x := m.Exit
			if x.GetError() != "" {
				p.err = fmt.Errorf("%s: %w: %s", p.op, types.ErrInvalid, x.GetError())
				return
			}
			*res = types.ExecResult{
				ExitCode:        int(x.GetExitCode()),
				Stdout:          out.kept,
				Stderr:          errs.kept,
				StdoutTruncated: x.GetStdoutTruncated() || out.truncated,
				StderrTruncated: x.GetStderrTruncated() || errs.truncated,
				TimedOut:        x.GetTimedOut(),
				Signal:          x.GetSignal(),
				StartedAt:       time.Unix(0, x.GetStartedUnixNano()),
				FinishedAt:      time.Unix(0, x.GetFinishedUnixNano()),
			}
			p.res = res
			if err := errors.Join(out.err, errs.err); err != nil {
				p.err = fmt.Errorf("%s: %w", p.op, err)
			}
			return
		}
	}
}

// outputSink forwards one output stream to the caller's writer and keeps
// up to limit bytes of it.
type outputSink struct {
	w         io.Writer
	name      string
	limit     int
	kept      []byte
	truncated bool
	err       error // the first write error; the writer is not used after it
}

func (s *outputSink) write(b []byte) {
	if s.w != nil && s.err == nil {
		if _, err := s.w.Write(b); err != nil {
			s.err = fmt.Errorf("writing the command's %s: %w", s.name, err)
		}
	}
	room := s.limit - len(s.kept)
	if len(b) > room {
		b, s.truncated = b[:room], true
	}
	s.kept = append(s.kept, b...)
}
