package agent

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
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
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
)

// exitTimedOut is the exit code of a command killed by its timeout, as
// coreutils timeout(1) reports it.
const exitTimedOut = bootparams.ExitTimedOut

// pipeGrace is how long output is still read after a command exited, for
// background processes it left behind that keep its stdout or stderr open.
// After that the pipes are abandoned (those processes get EPIPE) so that the
// exit can be reported.
const pipeGrace = 200 * time.Millisecond

type execStream = grpc.BidiStreamingServer[agentpb.ExecRequest, agentpb.ExecResponse]

// Exec runs one command; see agent.proto for the message flow. A program
// that is missing or cannot be executed ends with an exit that carries
// error and code 127 or 126; any other request that cannot start is
// InvalidArgument. The process group
// is killed by the timeout, when the caller goes away and by Stop.
func (s *Server) Exec(stream execStream) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	start := first.GetStart()
	if start == nil {
		return status.Error(codes.InvalidArgument, "the first Exec message must carry start")
	}
	cmd, err := s.buildCmd(start)
	if err != nil {
		return s.refuseStart(stream, start, err)
	}
	e := &execution{
		Server: s,
		stream: stream,
		start:  start,
		cmd:    cmd,
		limit:  start.GetMaxOutputBytes(),
	}
	if e.limit <= 0 {
		e.limit = int64(s.cfg.MaxOutputBytes)
	}
	return e.run()
}

// refuseStart ends an Exec whose command did not start. A missing or
// unusable program is a valid request that ends like a shell's: an exit
// with code 127 or 126 and the reason in error. Anything else is a
// request that can never run as given: InvalidArgument.
func (s *Server) refuseStart(stream execStream, start *agentpb.ExecStart, err error) error {
	s.log.Info("command cannot start", "cmd", start.GetCmd(), "err", err)
	var se *startError
	if !errors.As(err, &se) {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	now := time.Now().UnixNano()
	return stream.Send(&agentpb.ExecResponse{Msg: &agentpb.ExecResponse_Exit{Exit: &agentpb.ExecExit{
		ExitCode:         int32(se.code),
		Error:            se.Error(),
		StartedUnixNano:  now,
		FinishedUnixNano: now,
	}}})
}

// execution is one running command.
type execution struct {
	*Server
	stream execStream
	start  *agentpb.ExecStart
	cmd    *exec.Cmd
	limit  int64 // per output stream

	sendMu sync.Mutex // gRPC allows one sender at a time

	stdin     *os.File // write end; nil when the command reads /dev/null
	stdinOnce sync.Once
}

func (e *execution) send(m *agentpb.ExecResponse) error {
	e.sendMu.Lock()
	defer e.sendMu.Unlock()
	return e.stream.Send(m)
}

func (e *execution) run() error {
	// The agent reads the pipes itself, rather than giving os/exec writers,
	// so that it decides how long to wait for them (see pipeGrace) and never
	// needs cmd.Wait, which the reaper rules out.
	outR, outW, err := os.Pipe()
	if err != nil {
		return status.Errorf(codes.ResourceExhausted, "creating stdout pipe: %v", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return status.Errorf(codes.ResourceExhausted, "creating stderr pipe: %v", err)
	}
	e.cmd.Stdout, e.cmd.Stderr = outW, errW
	childEnds := []*os.File{outW, errW}
	if e.start.GetStdin() {
		inR, inW, err := os.Pipe()
		if err != nil {
			for _, f := range []*os.File{outR, outW, errR, errW} {
				f.Close()
			}
			return status.Errorf(codes.ResourceExhausted, "creating stdin pipe: %v", err)
		}
		e.cmd.Stdin, e.stdin = inR, inW
		childEnds = append(childEnds, inR)
	}

	var (
		waitc <-chan waitResult
		serr  error
	)
	if e.stopping.Err() != nil {
		serr = errStopping
	} else {
		waitc, serr = e.waiter.start(e.cmd)
	}
	startedAt := time.Now()
	for _, f := range childEnds {
		f.Close()
	}
	if serr != nil {
		outR.Close()
		errR.Close()
		e.closeStdin()
		if errors.Is(serr, errStopping) {
			return status.Error(codes.Unavailable, "the agent is shutting down")
		}
		return e.refuseStart(e.stream, e.start, cannotRun(e.start.GetCmd(), e.cmd.Path, serr))
	}
	pid := e.cmd.Process.Pid
	log := e.log.With("cmd", e.start.GetCmd(), "pid", pid)
	log.Debug("command started")

	// Started goes out before any output: the client waits for it.
	if err := e.send(&agentpb.ExecResponse{Msg: &agentpb.ExecResponse_StartedPid{StartedPid: int32(pid)}}); err != nil {
		log.Debug("caller went away before the start was reported", "err", err)
	}
	var (
		wg                 sync.WaitGroup
		outTrunc, errTrunc bool
	)
	wg.Go(func() { outTrunc = e.pump(outR, stdoutResponse) })
	wg.Go(func() { errTrunc = e.pump(errR, stderrResponse) })
	go e.control(pid)

	var timeout <-chan time.Time
	if ms := e.start.GetTimeoutMs(); ms > 0 {
		t := time.NewTimer(time.Duration(ms) * time.Millisecond)
		defer t.Stop()
		timeout = t.C
	}
	var (
		res      waitResult
		timedOut bool
		killed   bool
		gone     = e.stream.Context().Done()
		stopping = e.stopping.Done()
	)
wait:
	for {
		select {
		case res = <-waitc:
			break wait
		case <-timeout:
			log.Info("command timed out; killing its process group", "timeout_ms", e.start.GetTimeoutMs())
			timedOut, timeout = true, nil
		case <-gone:
			log.Info("caller went away; killing the command's process group")
			gone = nil
		case <-stopping:
			log.Info("agent stopping; killing the command's process group")
			stopping = nil
		}
		killed = true
		killGroup(pid)
	}
	finishedAt := time.Now()
	if killed {
		// Processes forked while the first signal was under way.
		killGroup(pid)
	}
	// Frees the pidfd now rather than at garbage collection: the reaper
	// took the status, so Wait, which would free it, is never called.
	// Release also sets Process.Pid to -1, hence the copy in pid.
	_ = e.cmd.Process.Release()
	e.closeStdin()

	awaitPumps(&wg, log, outR, errR)

	if res.err != nil {
		return status.Errorf(codes.Internal, "collecting the exit status of pid %d: %v", pid, res.err)
	}
	exit := &agentpb.ExecExit{
		StdoutTruncated:  outTrunc,
		StderrTruncated:  errTrunc,
		StartedUnixNano:  startedAt.UnixNano(),
		FinishedUnixNano: finishedAt.UnixNano(),
	}
	ws := res.status
	switch {
	case ws.Signaled():
		exit.ExitCode = int32(128 + int(ws.Signal()))
		exit.Signal = unix.SignalName(ws.Signal())
		if timedOut {
			exit.ExitCode, exit.TimedOut = exitTimedOut, true
		}
	default:
		exit.ExitCode = int32(ws.ExitStatus())
	}
	log.Debug("command finished", "exit_code", exit.ExitCode, "signal", exit.Signal,
		"timed_out", exit.TimedOut, "duration", finishedAt.Sub(startedAt))
	return e.send(&agentpb.ExecResponse{Msg: &agentpb.ExecResponse_Exit{Exit: exit}})
}

var errStopping = errors.New("agent stopping")

// awaitPumps waits for the goroutines reading a command's output pipes,
// for at most pipeGrace once the command has exited, then closes the
// pipes.
func awaitPumps(wg *sync.WaitGroup, log *slog.Logger, pipes ...*os.File) {
	pumped := make(chan struct{})
	go func() {
		wg.Wait()
		close(pumped)
	}()
	select {
	case <-pumped:
	case <-time.After(pipeGrace):
		log.Debug("background processes hold the output open; no longer reading it")
		deadline := time.Now()
		for _, f := range pipes {
			f.SetReadDeadline(deadline)
		}
		<-pumped
	}
	for _, f := range pipes {
		f.Close()
	}
}

func stdoutResponse(b []byte) *agentpb.ExecResponse {
	return &agentpb.ExecResponse{Msg: &agentpb.ExecResponse_Stdout{Stdout: b}}
}

func stderrResponse(b []byte) *agentpb.ExecResponse {
	return &agentpb.ExecResponse{Msg: &agentpb.ExecResponse_Stderr{Stderr: b}}
}

// pump forwards what the command writes to r, each read as soon as it
// arrives, up to the limit. Past it, it keeps reading and dropping so that
// the command never blocks on a full pipe, and reports truncation. Memory
// stays bounded by the limit however much the command prints.
func (e *execution) pump(r *os.File, msg func([]byte) *agentpb.ExecResponse) (truncated bool) {
	buf := make([]byte, chunkSize)
	var forwarded int64
	sending := true
	for {
		n, err := r.Read(buf)
		if n > 0 {
			keep := min(int64(n), e.limit-forwarded)
			if keep < int64(n) {
				truncated = true
			}
			if keep > 0 {
				forwarded += keep
				// A fresh slice: gRPC may hold the message after Send.
				if sending && e.send(msg(bytes.Clone(buf[:keep]))) != nil {
					sending = false // the caller is gone; just drain
				}
			}
		}
		if err != nil {
			return truncated
		}
	}
}

// control handles what the client sends after start: stdin and signals.
// It ends when the stream does, which happens at the latest when Exec
// returns.
func (e *execution) control(pid int) {
	defer e.closeStdin()
	for {
		req, err := e.stream.Recv()
		if err != nil {
			return // io.EOF: the client sent all it will; otherwise it is gone
		}
		switch m := req.GetMsg().(type) {
		case *agentpb.ExecRequest_Stdin:
			if e.stdin != nil {
				// Blocks while the command does not read; a failed write
				// (it exited, or closed stdin) drops the data as a pipe
				// would.
				_, _ = e.stdin.Write(m.Stdin)
			}
		case *agentpb.ExecRequest_CloseStdin:
			e.closeStdin()
		case *agentpb.ExecRequest_Signal:
			sig := syscall.Signal(m.Signal)
			if sig <= 0 || sig > 64 {
				e.log.Info("ignoring an invalid signal", "pid", pid, "signal", m.Signal)
				continue
			}
			if err := signalGroup(pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
				e.log.Info("cannot signal the command", "pid", pid, "signal", unix.SignalName(sig), "err", err)
			}
		}
	}
}

func (e *execution) closeStdin() {
	if e.stdin != nil {
		e.stdinOnce.Do(func() { e.stdin.Close() })
	}
}

// signalGroup signals the process group led by pid; the command runs with
// Setpgid, so its pid is the group id.
func signalGroup(pid int, sig syscall.Signal) error {
	if pid <= 1 {
		// kill(-1) would hit every process, kill(0) the agent's own group.
		return fmt.Errorf("refusing to signal process group %d", pid)
	}
	return syscall.Kill(-pid, sig)
}

// killGroup kills the command and everything it started that stayed in its
// group. ESRCH means all of them are gone already.
func killGroup(pid int) {
	_ = signalGroup(pid, syscall.SIGKILL)
}
