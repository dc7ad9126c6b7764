package agent

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// ErrUnknownExecution is wrapped by a call with ExecOptions.ReattachOnly
// when the agent has no record of the execution: it never started there,
// it was forgotten (ExecRetention after it ended, or past the journal's
// bounds), the guest rebooted, or the agent predates protocol 5. It wraps
// types.ErrNotFound. vmutil translates it into vmm.ErrUnknownExecution.
var ErrUnknownExecution = fmt.Errorf("%w: the guest agent has no record of this execution", types.ErrNotFound)

// ErrDetached is wrapped by Wait when ExecOptions.Detach ended the call
// while the command ran on in the guest. vmutil translates it into
// vmm.ErrDetached.
var ErrDetached = errors.New("detached from a command that runs on in the guest")

// killWait bounds how long a cancelled call with an execution id waits for
// the exit of the command it killed, to return it with the context's error.
const killWait = 2 * time.Second

// ExecOptions are the optional parts of StartWith and ExecWith.
type ExecOptions struct {
	// Stdin is streamed to the command after cmd.Stdin; with neither the
	// command reads /dev/null. It is not used when the call reattaches.
	Stdin io.Reader
	// Stdout and Stderr receive the output as it arrives; nil discards.
	Stdout, Stderr io.Writer

	// ExecutionID names the command so that it runs at most once in the
	// guest (agent protocol 5): the agent journals it while it runs and
	// for ExecRetention after. A call with the id of a journaled execution
	// starts nothing and reattaches: Started reports it, the output kept
	// from the start is written again, then live output, and the result is
	// the original command's. With an id, a broken connection does not
	// kill the command; cancelling ctx does (SIGKILL to its whole tree,
	// then up to killWait for the exit). An agent older than protocol 5
	// ignores the id: the command runs unjournaled and dies with the call.
	ExecutionID string
	// ReattachOnly never starts the command: an execution the agent does
	// not hold gives an error wrapping ErrUnknownExecution. Needs
	// ExecutionID.
	ReattachOnly bool
	// Started, when set, is called once before any output is written, with
	// the pid (0 for a program that could not be started) and whether the
	// call reattached. It is not called when the start fails with an
	// error.
	Started func(pid int, reattached bool)
	// Detach, when closed, ends the call without killing the command:
	// Wait returns an error wrapping ErrDetached. Needs ExecutionID.
	Detach <-chan struct{}
}

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
// types.ErrUnavailable. Cancelling ctx kills the command and every process
// it started in the guest and returns the context's error. If writing to
// stdout or stderr fails, the command still runs to the end and Exec
// returns the result together with that error.
func (c *Client) Exec(ctx context.Context, cmd types.Command, stdout, stderr io.Writer) (*types.ExecResult, error) {
	return c.ExecWith(ctx, cmd, ExecOptions{Stdout: stdout, Stderr: stderr})
}

// ExecWith is Exec with options: an execution id to run at most once and
// reattach, a start callback and a way to detach (see ExecOptions).
// Cancelling ctx with an execution id returns the context's error, together
// with the result when the killed command's exit arrived in time.
func (c *Client) ExecWith(ctx context.Context, cmd types.Command, o ExecOptions) (*types.ExecResult, error) {
	p, err := c.StartWith(ctx, cmd, o)
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
	// Reattached is set when the call reattached to a journaled execution
	// (ExecOptions.ExecutionID) instead of starting it.
	Reattached bool

	op     string
	stream grpc.BidiStreamingClient[agentpb.ExecRequest, agentpb.ExecResponse]
	cancel context.CancelFunc
	sendMu sync.Mutex // gRPC allows one sender at a time

	// why the stream was cancelled on purpose (ctx ended, detached); nil
	// until then. Set before cancel, read by receive.
	why atomic.Pointer[error]

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
	return c.StartWith(ctx, cmd, ExecOptions{Stdin: r, Stdout: stdout, Stderr: stderr})
}

// StartWith is Start with options (see ExecOptions). With ReattachOnly and
// an unknown execution it returns an error wrapping ErrUnknownExecution.
func (c *Client) StartWith(ctx context.Context, cmd types.Command, o ExecOptions) (*Process, error) {
	op := fmt.Sprintf("running %q in the guest", cmd.Cmd)
	if o.ExecutionID != "" {
		op = fmt.Sprintf("running %q in the guest (execution %s)", cmd.Cmd, o.ExecutionID)
	}
	// The command is not validated here: the service validated what the
	// user typed and the agent checks what it is asked to run (empty
	// command, env names). Only what would break this process is refused.
	switch {
	case cmd.MaxOutputBytes < 0:
		return nil, fmt.Errorf("%s: %w: max output bytes %d is negative", op, types.ErrInvalid, cmd.MaxOutputBytes)
	case o.ExecutionID == "" && o.ReattachOnly:
		return nil, fmt.Errorf("%s: %w: reattaching needs an execution id", op, types.ErrInvalid)
	case o.ExecutionID == "" && o.Detach != nil:
		return nil, fmt.Errorf("%s: %w: detaching needs an execution id, or nothing could reattach", op, types.ErrInvalid)
	}
	journaled := false
	if o.ExecutionID != "" {
		var err error
		if journaled, err = c.journals(ctx); err != nil {
			return nil, fmt.Errorf("%s: %w", op, err)
		}
		if !journaled && o.ReattachOnly {
			return nil, fmt.Errorf("%s: %w: the guest agent predates protocol %d and journals no executions", op, ErrUnknownExecution, protocolExecJournal)
		}
	}
	r := o.Stdin
	if len(cmd.Stdin) > 0 {
		if r == nil {
			r = bytes.NewReader(cmd.Stdin)
		} else {
			r = io.MultiReader(bytes.NewReader(cmd.Stdin), r)
		}
	}
	limit := cmp.Or(cmd.MaxOutputBytes, types.DefaultMaxOutputBytes)

	// A journaled command outlives the stream, so cancelling ctx must send
	// SIGKILL before the stream goes: the stream is not bound to ctx and
	// watch ends it.
	sctx, cancel := context.WithCancel(ctx)
	if journaled {
		sctx, cancel = context.WithCancel(context.WithoutCancel(ctx))
	}
	stream, err := c.api.Exec(sctx)
	if err != nil {
		cancel()
		return nil, rpcError(ctx, op, err)
	}
	p := &Process{op: op, stream: stream, cancel: cancel, done: make(chan struct{})}
	if journaled {
		go p.watch(ctx, o.Detach)
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
		ExecutionId:    o.ExecutionID,
		ReattachOnly:   o.ReattachOnly,
	}
	// A failed Send means the stream ended; Recv reports why.
	_ = p.send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Start{Start: start}})
	first, err := stream.Recv()
	if err != nil {
		err = p.streamError(ctx, err)
		p.finish()
		return nil, err
	}
	switch m := first.GetMsg().(type) {
	case *agentpb.ExecResponse_StartedPid:
		p.Pid = int(m.StartedPid)
	case *agentpb.ExecResponse_Reattached:
		p.Pid, p.Reattached = int(m.Reattached.GetPid()), true
		if p.Pid == 0 {
			// The journaled program could not be started; its exit follows.
			if first, err = stream.Recv(); err != nil {
				err = p.streamError(ctx, err)
				p.finish()
				return nil, err
			}
			x, _ := first.GetMsg().(*agentpb.ExecResponse_Exit)
			if x == nil {
				p.finish()
				return nil, fmt.Errorf("%s: the agent sent %T after reattaching to an execution that never started; is it a compatible version?", op, first.GetMsg())
			}
			return p.notStarted(o, x.Exit, limit)
		}
		r = nil // only the stream that started the command feeds it
	case *agentpb.ExecResponse_Exit:
		return p.notStarted(o, m.Exit, limit)
	default:
		p.finish()
		return nil, fmt.Errorf("%s: the agent sent %T before the start; is it a compatible version?", op, m)
	}
	if o.Started != nil {
		o.Started(p.Pid, p.Reattached)
	}
	if r != nil {
		go p.sendStdin(r)
	}
	go p.receive(ctx, limit, o.Stdout, o.Stderr)
	return p, nil
}

// journals reports whether the agent journals executions (protocol 5). A
// revision seen once is remembered for the client's lifetime: an agent is
// not downgraded under a running guest.
func (c *Client) journals(ctx context.Context) (bool, error) {
	if c.protocol.Load() >= protocolExecJournal {
		return true, nil
	}
	info, err := c.Info(ctx)
	if err != nil {
		return false, err
	}
	c.protocol.Store(info.GetProtocol())
	return info.GetProtocol() >= protocolExecJournal, nil
}

// watch ends a journaled call's stream on purpose: when ctx ends it kills
// the command's tree and gives its exit up to killWait to arrive; when
// detach closes it leaves the command running.
func (p *Process) watch(ctx context.Context, detach <-chan struct{}) {
	select {
	case <-p.done:
		return
	case <-detach:
		why := fmt.Errorf("%s: %w", p.op, ErrDetached)
		p.why.Store(&why)
		p.cancel()
	case <-ctx.Done():
		why := fmt.Errorf("%s: %w", p.op, ctx.Err())
		p.why.Store(&why)
		if p.send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Signal{Signal: int32(syscall.SIGKILL)}}) == nil {
			t := time.NewTimer(killWait)
			defer t.Stop()
			select {
			case <-p.done:
			case <-t.C:
			}
		}
		p.cancel()
	}
}

// streamError explains why the stream ended before the exit: a deliberate
// end (ctx, Detach) first, then the agent's status.
func (p *Process) streamError(ctx context.Context, err error) error {
	if why := p.why.Load(); why != nil {
		return *why
	}
	if err == io.EOF {
		return fmt.Errorf("%s: %w: the agent ended the call without reporting the exit", p.op, types.ErrUnavailable)
	}
	if status.Code(err) == codes.NotFound {
		return fmt.Errorf("%s: %w: %s", p.op, ErrUnknownExecution, status.Convert(err).Message())
	}
	return rpcError(ctx, p.op, err)
}

// finish releases the stream of a Process that is not returned.
func (p *Process) finish() {
	p.cancel()
	close(p.done)
}

// notStarted completes p from the agent's early exit. A missing (exit
// code 127) or unusable (126) program gives a finished Process, as a shell
// reports them: that exit code and "aetherium: <reason>" on stderr, which
// is also written to the caller's stderr. Other early exits are errors.
func (p *Process) notStarted(o ExecOptions, x *agentpb.ExecExit, limit int) (*Process, error) {
	defer p.finish()
	code := int(x.GetExitCode())
	if x.GetError() == "" || (code != bootparams.ExitNotFound && code != bootparams.ExitCannotExecute) {
		return nil, fmt.Errorf("%s: %w: %s", p.op, types.ErrInvalid, cmp.Or(x.GetError(), "the agent reported an exit before the start"))
	}
	p.Pid = 0
	if o.Started != nil {
		o.Started(0, p.Reattached)
	}
	errs := outputSink{w: o.Stderr, name: "stderr", limit: limit}
	errs.write([]byte("aetherium: " + x.GetError() + "\n"))
	p.res = &types.ExecResult{
		ExitCode:        code,
		Stdout:          []byte{},
		Stderr:          errs.kept,
		StderrTruncated: errs.truncated,
		StartedAt:       time.Unix(0, x.GetStartedUnixNano()),
		FinishedAt:      time.Unix(0, x.GetFinishedUnixNano()),
	}
	if errs.err != nil {
		p.err = fmt.Errorf("%s: %w", p.op, errs.err)
	}
	return p, nil
}

// Signal sends sig to the command's process group; SIGKILL kills every
// process the command started, in its group or not (agent protocol 5).
// Once the command has exited it returns an error wrapping
// types.ErrConflict.
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
		if err != nil {
			p.err = p.streamError(ctx, err)
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
			if why := p.why.Load(); why != nil {
				// Cancelled: the killed command's exit came in time.
				p.err = errors.Join(*why, p.err)
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
