package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
)

type processStream = grpc.ServerStreamingServer[agentpb.ProcessEvent]

// StartProcess starts a process of the table and follows it; see
// agent.proto. Unlike Exec, the caller going away only ends its stream:
// the process runs on until it exits, its timeout or Stop kills it.
func (s *Server) StartProcess(req *agentpb.ProcessStartRequest, stream processStream) error {
	if req.GetTimeoutMs() < 0 || req.GetKeepaliveIntervalMs() < 0 {
		return status.Error(codes.InvalidArgument, "timeout_ms and keepalive_interval_ms must not be negative")
	}
	if !s.procs.tagFree(req.GetTag()) {
		return tagInUse(req.GetTag())
	}
	var cwd string
	cmd, err := s.newCmd(req.GetCmd(), req.GetArgs(), req.GetEnv(), req.GetUser(), func(home string) (string, error) {
		var err error
		cwd, err = processDir(req.GetCwd(), home)
		return cwd, err
	})
	if err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	p, sub, err := s.startTableProc(req, cmd, cwd)
	if err != nil {
		return err
	}
	return s.follow(stream, p, sub, time.Duration(req.GetKeepaliveIntervalMs())*time.Millisecond)
}

func tagInUse(tag string) error {
	return status.Errorf(codes.AlreadyExists, "a running process has tag %q; pick another tag or wait for it to end", tag)
}

// startTableProc starts cmd, enters it into the table and subscribes the
// starting stream before any output is read, so that it misses none. A
// goroutine waits for the process; it does not depend on the stream.
func (s *Server) startTableProc(req *agentpb.ProcessStartRequest, cmd *exec.Cmd, cwd string) (*tableProc, *subscriber, error) {
	var parentEnds, childEnds []*os.File
	closeAll := func(fs []*os.File) {
		for _, f := range fs {
			f.Close()
		}
	}
	pipe := func() (r, w *os.File, err error) {
		if r, w, err = os.Pipe(); err != nil {
			closeAll(parentEnds)
			closeAll(childEnds)
			return nil, nil, status.Errorf(codes.ResourceExhausted, "creating a pipe: %v", err)
		}
		return r, w, nil
	}
	outR, outW, err := pipe()
	if err != nil {
		return nil, nil, err
	}
	parentEnds, childEnds = append(parentEnds, outR), append(childEnds, outW)
	errR, errW, err := pipe()
	if err != nil {
		return nil, nil, err
	}
	parentEnds, childEnds = append(parentEnds, errR), append(childEnds, errW)
	cmd.Stdout, cmd.Stderr = outW, errW
	var stdin *os.File
	if req.GetStdin() {
		inR, inW, err := pipe()
		if err != nil {
			return nil, nil, err
		}
		parentEnds, childEnds = append(parentEnds, inW), append(childEnds, inR)
		cmd.Stdin, stdin = inR, inW
	}

	// Marks the process's tree so that a timeout or Stop kills all of it.
	token, started := s.markTree(cmd)
	var (
		waitc <-chan waitResult
		serr  error
	)
	if s.stopping.Err() != nil {
		serr = errStopping
	} else {
		waitc, serr = s.startTree(cmd)
	}
	started()
	closeAll(childEnds)
	if serr != nil {
		s.endTree(token, false)
		closeAll(parentEnds)
		if errors.Is(serr, errStopping) {
			return nil, nil, status.Error(codes.Unavailable, "the agent is shutting down")
		}
		return nil, nil, status.Error(codes.InvalidArgument, cannotRun(req.GetCmd(), cmd.Path, serr).Error())
	}

	p := &tableProc{
		pid:   uint32(cmd.Process.Pid),
		tag:   req.GetTag(),
		cmd:   req.GetCmd(),
		args:  req.GetArgs(),
		env:   req.GetEnv(),
		cwd:   cwd,
		stdin: stdin,
		subs:  make(map[*subscriber]struct{}),
		done:  make(chan struct{}),
	}
	sub := p.subscribe()
	addErr := s.procs.add(p)
	go s.superviseProc(p, cmd, token, waitc, time.Duration(req.GetTimeoutMs())*time.Millisecond, outR, errR)
	if addErr != nil {
		// Another start took the tag after the check above.
		p.unsubscribe(sub)
		killGroup(int(p.pid))
		return nil, nil, tagInUse(p.tag)
	}
	return p, sub, nil
}

// superviseProc forwards the output of a table process, kills it and every
// process it started (killTree, by token) on timeout or Stop, and records
// its end once its output is read.
func (s *Server) superviseProc(p *tableProc, cmd *exec.Cmd, token string, waitc <-chan waitResult, timeout time.Duration, outR, errR *os.File) {
	pid := int(p.pid)
	log := s.log.With("cmd", p.cmd, "pid", pid, "tag", p.tag)
	log.Debug("process started")
	var wg sync.WaitGroup
	wg.Go(func() { p.pump(outR, false) })
	wg.Go(func() { p.pump(errR, true) })

	var timeoutc <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		timeoutc = t.C
	}
	var (
		res      waitResult
		killed   bool
		stopping = s.stopping.Done()
	)
wait:
	for {
		select {
		case res = <-waitc:
			break wait
		case <-timeoutc:
			log.Info("process timed out; killing it and every process it started", "timeout", timeout)
			timeoutc = nil
		case <-stopping:
			log.Info("agent stopping; killing the process and every process it started")
			stopping = nil
		}
		killed = true
		s.killTree(pid, token)
	}
	if killed {
		// Processes forked while the first kill was under way.
		s.killTree(pid, token)
	}
	// The reaper, or directWaiter, took the status; see execution.supervise.
	_ = cmd.Process.Release()
	p.closeStdin()
	awaitPumps(&wg, log, outR, errR)
	s.endTree(token, killed)

	end := processEnd(res)
	log.Debug("process ended", "status", end.GetStatus())
	p.finish(end)
	time.AfterFunc(endedRetention, func() { s.procs.forget(p) })
}

// follow sends a process's events to one stream: start, the output the
// subscriber receives, keepalives when idle, and the end. sub nil means
// the process has ended. Returning ends only the stream.
func (s *Server) follow(stream processStream, p *tableProc, sub *subscriber, keepalive time.Duration) error {
	if sub != nil {
		defer p.unsubscribe(sub)
	}
	if err := stream.Send(&agentpb.ProcessEvent{Event: &agentpb.ProcessEvent_Start{Start: &agentpb.ProcessStart{Pid: p.pid}}}); err != nil {
		return err
	}
	if sub == nil {
		return stream.Send(p.endEvent())
	}
	var (
		tick  <-chan time.Time
		timer *time.Timer
	)
	if keepalive > 0 {
		timer = time.NewTimer(keepalive)
		defer timer.Stop()
		tick = timer.C
	}
	send := func(ev *agentpb.ProcessEvent) error {
		if timer != nil {
			timer.Reset(keepalive)
		}
		return stream.Send(ev)
	}
	lagged := func() error {
		s.log.Info("a process stream fell behind and was cut off", "pid", p.pid, "stalled", subscriberStall)
		return status.Errorf(codes.ResourceExhausted, "the stream fell behind the output of process %d, taking nothing for %s, and was cut off; connect again to follow new output", p.pid, subscriberStall)
	}
	for {
		select {
		case ev := <-sub.events:
			if err := send(ev); err != nil {
				return err
			}
		case <-sub.lagged:
			return lagged()
		case <-tick:
			if err := send(&agentpb.ProcessEvent{Event: &agentpb.ProcessEvent_Keepalive{Keepalive: &agentpb.ProcessKeepalive{}}}); err != nil {
				return err
			}
		case <-stream.Context().Done():
			return status.FromContextError(stream.Context().Err()).Err()
		case <-p.done:
			// All output was handed out before done: send what is left.
			for {
				select {
				case <-sub.lagged:
					return lagged()
				case ev := <-sub.events:
					if err := stream.Send(ev); err != nil {
						return err
					}
					continue
				default:
				}
				return stream.Send(p.endEvent())
			}
		}
	}
}

// ConnectProcess follows a process of the table from now on; see
// agent.proto.
func (s *Server) ConnectProcess(req *agentpb.ProcessConnectRequest, stream processStream) error {
	if req.GetKeepaliveIntervalMs() < 0 {
		return status.Error(codes.InvalidArgument, "keepalive_interval_ms must not be negative")
	}
	p, err := s.findProc(req.GetProcess())
	if err != nil {
		return err
	}
	return s.follow(stream, p, p.subscribe(), time.Duration(req.GetKeepaliveIntervalMs())*time.Millisecond)
}

// ListProcesses lists the running processes of the table by pid.
func (s *Server) ListProcesses(context.Context, *agentpb.ListProcessesRequest) (*agentpb.ListProcessesResponse, error) {
	resp := &agentpb.ListProcessesResponse{}
	for _, p := range s.procs.running() {
		resp.Processes = append(resp.Processes, p.info())
	}
	return resp, nil
}

// SignalProcess signals the process group of a running table process.
func (s *Server) SignalProcess(_ context.Context, req *agentpb.SignalProcessRequest) (*agentpb.SignalProcessResponse, error) {
	sig := syscall.Signal(req.GetSignal())
	if !signalValid(sig) {
		return nil, status.Errorf(codes.InvalidArgument, "signal %d is not a signal number (1-64)", req.GetSignal())
	}
	p, err := s.runningProc(req.GetProcess())
	if err != nil {
		return nil, err
	}
	if err := signalGroup(int(p.pid), sig); err != nil {
		if errors.Is(err, syscall.ESRCH) {
			return nil, status.Errorf(codes.NotFound, "process %d has ended", p.pid)
		}
		return nil, status.Errorf(codes.Internal, "sending %s to process %d: %v", unix.SignalName(sig), p.pid, err)
	}
	return &agentpb.SignalProcessResponse{}, nil
}

// WriteStdin writes to a running process's stdin. It waits while the pipe
// is full; if the caller goes away meanwhile, the data may still arrive.
func (s *Server) WriteStdin(ctx context.Context, req *agentpb.WriteStdinRequest) (*agentpb.WriteStdinResponse, error) {
	p, err := s.stdinProc(req.GetProcess())
	if err != nil {
		return nil, err
	}
	written := make(chan error, 1)
	go func() {
		_, err := p.stdin.Write(req.GetData())
		written <- err
	}()
	select {
	case err = <-written:
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	switch {
	case err == nil:
		return &agentpb.WriteStdinResponse{}, nil
	case errors.Is(err, os.ErrClosed):
		return nil, status.Errorf(codes.FailedPrecondition, "the stdin of process %d is closed", p.pid)
	case errors.Is(err, syscall.EPIPE):
		return nil, status.Errorf(codes.FailedPrecondition, "process %d no longer reads its stdin", p.pid)
	default:
		return nil, status.Errorf(codes.Internal, "writing to the stdin of process %d: %v", p.pid, err)
	}
}

// CloseStdin closes a process's stdin, which it reads as end of input.
// Closing it again, or after the process ended (while the table keeps it),
// is harmless, so that the call can be retried.
func (s *Server) CloseStdin(_ context.Context, req *agentpb.CloseStdinRequest) (*agentpb.CloseStdinResponse, error) {
	p, err := s.findProc(req.GetProcess())
	if err != nil {
		return nil, err
	}
	if p.stdin == nil {
		return nil, noStdin(p)
	}
	p.closeStdin()
	return &agentpb.CloseStdinResponse{}, nil
}

func noStdin(p *tableProc) error {
	return status.Errorf(codes.FailedPrecondition, "process %d was started without stdin; start it with stdin to write to it", p.pid)
}

// stdinProc finds a running process whose stdin is open.
func (s *Server) stdinProc(sel *agentpb.ProcessSelector) (*tableProc, error) {
	p, err := s.runningProc(sel)
	if err != nil {
		return nil, err
	}
	if p.stdin == nil {
		return nil, noStdin(p)
	}
	p.stdinMu.Lock()
	closed := p.stdinDone
	p.stdinMu.Unlock()
	if closed {
		return nil, status.Errorf(codes.FailedPrecondition, "the stdin of process %d is closed", p.pid)
	}
	return p, nil
}

// findProc finds a process of the table, running or recently ended.
func (s *Server) findProc(sel *agentpb.ProcessSelector) (*tableProc, error) {
	var what string
	switch v := sel.GetSelector().(type) {
	case *agentpb.ProcessSelector_Pid:
		what = fmt.Sprintf("pid %d", v.Pid)
	case *agentpb.ProcessSelector_Tag:
		what = fmt.Sprintf("tag %q", v.Tag)
	default:
		return nil, status.Error(codes.InvalidArgument, "name the process by pid or tag")
	}
	p := s.procs.find(sel)
	if p == nil {
		return nil, status.Errorf(codes.NotFound, "no process with %s was started by the agent, or it ended more than %s ago", what, endedRetention)
	}
	return p, nil
}

// runningProc is findProc for a process that has not ended: an ended one
// cannot be signalled or fed, and its pid may be reused.
func (s *Server) runningProc(sel *agentpb.ProcessSelector) (*tableProc, error) {
	p, err := s.findProc(sel)
	if err != nil {
		return nil, err
	}
	if p.ended() {
		return nil, status.Errorf(codes.NotFound, "process %d has ended", p.pid)
	}
	return p, nil
}
