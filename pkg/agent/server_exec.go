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

// maxExecutionIDLen bounds an execution id, which the journal keeps.
const maxExecutionIDLen = 256

// Exec runs one command; see agent.proto for the message flow. A program
// that is missing or cannot be executed ends with an exit that carries
// error and code 127 or 126; any other request that cannot start is
// InvalidArgument. The command and every process it started (killTree)
// are killed by the timeout, by a SIGKILL request, by Stop, and when the
// caller goes away, unless the start names an execution id: then the
// command runs on, journaled (execJournal), and a later Exec with the id
// reattaches. A reattached stream gets no stdin: only the stream that
// started the command feeds it, and its stdin is closed when that stream
// ends.
func (s *Server) Exec(stream execStream) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	start := first.GetStart()
	if start == nil {
		return status.Error(codes.InvalidArgument, "the first Exec message must carry start")
	}
	id := start.GetExecutionId()
	switch {
	case id == "" && start.GetReattachOnly():
		return status.Error(codes.InvalidArgument, "reattach_only needs an execution_id")
	case len(id) > maxExecutionIDLen:
		return status.Errorf(codes.InvalidArgument, "execution_id is %d bytes long; the most is %d", len(id), maxExecutionIDLen)
	case id == "":
		return s.startExec(stream, start, newExecRecord())
	case start.GetReattachOnly():
		rec := s.journal.lookup(id)
		if rec == nil {
			return status.Errorf(codes.NotFound, "no execution %q is journaled: it never started here, or it was forgotten (%s after it ended, or at a guest reboot)", id, ExecRetention)
		}
		return s.reattach(stream, rec)
	}
	rec, fresh := s.journal.claim(id, newExecRecord())
	if !fresh {
		return s.reattach(stream, rec)
	}
	return s.startExec(stream, start, rec)
}

// reattach follows a journaled execution on stream: `reattached`, the
// output kept from the start, live output, the exit. The stream may send
// signals, not stdin.
func (s *Server) reattach(stream execStream, rec *execRecord) error {
	select {
	case <-rec.ready:
	case <-stream.Context().Done():
		return status.FromContextError(stream.Context().Err()).Err()
	}
	if rec.startErr != nil {
		return rec.startErr
	}
	s.log.Info("reattached to a command", "execution_id", rec.id, "pid", rec.pid)
	if err := stream.Send(&agentpb.ExecResponse{Msg: &agentpb.ExecResponse_Reattached{Reattached: &agentpb.ExecReattached{
		Pid:             int32(rec.pid),
		StartedUnixNano: rec.startedAt.UnixNano(),
	}}}); err != nil {
		return err
	}
	if rec.pid != 0 {
		go s.control(stream, rec, nil)
	}
	return s.followStream(stream, rec)
}

// followStream sends rec's output and exit on stream until the exit went
// out or the stream ended.
func (s *Server) followStream(stream execStream, rec *execRecord) error {
	ctx := stream.Context()
	return rec.follow(stream.Send, ctx.Done(), func() error { return status.FromContextError(ctx.Err()).Err() })
}

// settleRefused ends a start that did not run anything. A program that is
// missing or unusable is journaled like a command that ran (its exit is
// the result); a refused request is forgotten, since nothing ran and the
// error is what a retry would get too.
func (s *Server) settleRefused(stream execStream, start *agentpb.ExecStart, rec *execRecord, err error) error {
	var se *startError
	if !errors.As(err, &se) {
		if status.Code(err) == codes.Unknown {
			err = status.Error(codes.InvalidArgument, err.Error())
		}
		s.log.Info("command cannot start", "cmd", start.GetCmd(), "err", err)
		rec.startErr = err
		close(rec.ready)
		if rec.id != "" {
			s.journal.abandon(rec)
		}
		return err
	}
	s.log.Info("command cannot start", "cmd", start.GetCmd(), "err", err)
	now := time.Now()
	rec.startedAt = now
	close(rec.ready)
	rec.end(&agentpb.ExecExit{
		ExitCode:         int32(se.code),
		Error:            se.Error(),
		StartedUnixNano:  now.UnixNano(),
		FinishedUnixNano: now.UnixNano(),
	})
	if rec.id != "" {
		s.journal.finished(rec)
	}
	return s.followStream(stream, rec)
}

// execution is one running command.
type execution struct {
	*Server
	rec   *execRecord
	start *agentpb.ExecStart
	cmd   *exec.Cmd
	token string // ExecTokenEnv's value
	limit int64  // per output stream

	stdin     *os.File // write end; nil when the command reads /dev/null
	stdinOnce sync.Once
}

// startExec starts the command of start, recorded in rec, and follows it
// on stream.
func (s *Server) startExec(stream execStream, start *agentpb.ExecStart, rec *execRecord) error {
	cmd, err := s.buildCmd(start)
	if err != nil {
		return s.settleRefused(stream, start, rec, err)
	}
	e := &execution{
		Server: s,
		rec:    rec,
		start:  start,
		cmd:    cmd,
		limit:  start.GetMaxOutputBytes(),
	}
	if e.limit <= 0 {
		e.limit = int64(s.cfg.MaxOutputBytes)
	}
	var started func()
	e.token, started = s.markTree(cmd)
	err = e.launch()
	started()
	if err != nil {
		s.endTree(e.token, false)
		return s.settleRefused(stream, start, rec, err)
	}
	// Started goes out before any output: the client waits for it.
	if err := stream.Send(&agentpb.ExecResponse{Msg: &agentpb.ExecResponse_StartedPid{StartedPid: int32(rec.pid)}}); err != nil {
		e.log.Debug("caller went away before the start was reported", "pid", rec.pid, "err", err)
	}
	go s.control(stream, rec, e)
	err = s.followStream(stream, rec)
	if err != nil && rec.id == "" {
		// No id: the command does not outlive its caller. The stream
		// waits for it to end, so that Stop's drain sees it gone.
		rec.requestKill("caller went away")
		<-rec.ended()
	}
	return err
}

var errStopping = errors.New("agent stopping")

// launch starts the command and its supervisor, and settles rec's start.
// Errors are a *startError, or a gRPC status.
func (e *execution) launch() error {
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
		waitc, serr = e.startTree(e.cmd)
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
		return cannotRun(e.start.GetCmd(), e.cmd.Path, serr)
	}
	e.rec.pid, e.rec.startedAt = e.cmd.Process.Pid, startedAt
	close(e.rec.ready)
	go e.supervise(waitc, outR, errR)
	return nil
}

// supervise waits for the command to end, killing its tree on timeout, on
// request and when the agent stops, then records the exit.
func (e *execution) supervise(waitc <-chan waitResult, outR, errR *os.File) {
	pid, rec := e.rec.pid, e.rec
	log := e.log.With("cmd", e.start.GetCmd(), "pid", pid)
	if rec.id != "" {
		log = log.With("execution_id", rec.id)
	}
	log.Debug("command started")
	var (
		wg                 sync.WaitGroup
		outTrunc, errTrunc bool
	)
	wg.Go(func() { outTrunc = e.pump(outR, false) })
	wg.Go(func() { errTrunc = e.pump(errR, true) })

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
		stopping = e.stopping.Done()
	)
wait:
	for {
		select {
		case res = <-waitc:
			break wait
		case <-timeout:
			log.Info("command timed out; killing it and every process it started", "timeout_ms", e.start.GetTimeoutMs())
			timedOut, timeout = true, nil
		case why := <-rec.kill:
			log.Info("killing the command and every process it started", "why", why)
		case <-stopping:
			log.Info("agent stopping; killing the command and every process it started")
			stopping = nil
		}
		killed = true
		e.killTree(pid, e.token)
	}
	finishedAt := time.Now()
	if killed {
		// Processes forked while the first kill was under way.
		e.killTree(pid, e.token)
	}
	// Frees the pidfd now rather than at garbage collection: the reaper
	// took the status, so Wait, which would free it, is never called.
	_ = e.cmd.Process.Release()
	e.closeStdin()

	awaitPumps(&wg, log, outR, errR)
	e.endTree(e.token, killed)

	if res.err != nil {
		rec.fail(status.Errorf(codes.Internal, "collecting the exit status of pid %d: %v", pid, res.err))
	} else {
		exit := &agentpb.ExecExit{
			StdoutTruncated:  outTrunc,
			StderrTruncated:  errTrunc,
			StartedUnixNano:  rec.startedAt.UnixNano(),
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
			"timed_out", exit.TimedOut, "duration", finishedAt.Sub(rec.startedAt))
		rec.end(exit)
	}
	if rec.id != "" {
		e.journal.finished(rec)
	}
}

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

// pump records what the command writes to r, each read as soon as it
// arrives, up to the limit. Past it, it keeps reading and dropping so that
// the command never blocks on a full pipe, and reports truncation. Memory
// stays bounded by the limit however much the command prints.
func (e *execution) pump(r *os.File, stderr bool) (truncated bool) {
	buf := make([]byte, chunkSize)
	var kept int64
	for {
		n, err := r.Read(buf)
		if n > 0 {
			keep := min(int64(n), e.limit-kept)
			if keep < int64(n) {
				truncated = true
			}
			if keep > 0 {
				kept += keep
				// A fresh slice: followers send it as a message.
				e.rec.record(outputChunk{stderr: stderr, data: bytes.Clone(buf[:keep])})
			}
		}
		if err != nil {
			return truncated
		}
	}
}

// control handles what a client sends after start: stdin (only for e,
// the execution the stream started; nil for a reattached stream) and
// signals. SIGKILL kills the command's whole tree; other signals go to its
// process group. It ends when the stream does, which happens at the
// latest when Exec returns; then the command's stdin is closed.
func (s *Server) control(stream execStream, rec *execRecord, e *execution) {
	if e != nil {
		defer e.closeStdin()
	}
	for {
		req, err := stream.Recv()
		if err != nil {
			return // io.EOF: the client sent all it will; otherwise it is gone
		}
		switch m := req.GetMsg().(type) {
		case *agentpb.ExecRequest_Stdin:
			if e != nil && e.stdin != nil {
				// Blocks while the command does not read; a failed write
				// (it exited, or closed stdin) drops the data as a pipe
				// would.
				_, _ = e.stdin.Write(m.Stdin)
			}
		case *agentpb.ExecRequest_CloseStdin:
			if e != nil {
				e.closeStdin()
			}
		case *agentpb.ExecRequest_Signal:
			sig := syscall.Signal(m.Signal)
			switch {
			case sig <= 0 || sig > 64:
				s.log.Info("ignoring an invalid signal", "pid", rec.pid, "signal", m.Signal)
			case sig == syscall.SIGKILL:
				rec.requestKill("the caller sent SIGKILL")
			default:
				if err := signalGroup(rec.pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
					s.log.Info("cannot signal the command", "pid", rec.pid, "signal", unix.SignalName(sig), "err", err)
				}
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
