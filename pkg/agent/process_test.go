package agent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os/user"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// followed is what a process stream delivered up to its end.
type followed struct {
	pid            uint32
	stdout, stderr bytes.Buffer
	keepalives     int
	end            *ProcessEnd
}

// follow reads s until its end, failing the test after 10s or on an
// error; the first event must be the start.
func follow(t *testing.T, s ProcessStream) *followed {
	t.Helper()
	return followFrom(t, s, 0)
}

// followStarted is follow for a stream whose start, pid, was read.
func followStarted(t *testing.T, s ProcessStream, pid uint32) *followed {
	t.Helper()
	return followFrom(t, s, pid)
}

func followFrom(t *testing.T, s ProcessStream, pid uint32) *followed {
	t.Helper()
	got := make(chan *followed, 1)
	errc := make(chan error, 1)
	go func() {
		f := &followed{pid: pid}
		for {
			ev, err := s.Recv()
			if err == io.EOF {
				got <- f
				return
			}
			if err != nil {
				errc <- err
				return
			}
			switch {
			case ev.PID != 0:
				if f.pid != 0 {
					errc <- errors.New("a second start event")
					return
				}
				f.pid = ev.PID
			case f.pid == 0:
				errc <- errors.New("an event before the start")
				return
			case ev.Stdout != nil:
				f.stdout.Write(ev.Stdout)
			case ev.Stderr != nil:
				f.stderr.Write(ev.Stderr)
			case ev.Keepalive:
				f.keepalives++
			case ev.End != nil:
				f.end = ev.End
			}
		}
	}()
	select {
	case f := <-got:
		require.NotNil(t, f.end, "io.EOF came without an end")
		return f
	case err := <-errc:
		t.Fatalf("following the process: %v", err)
	case <-time.After(10 * time.Second):
		s.Close()
		t.Fatal("the process did not end within 10s")
	}
	return nil
}

// startedPID starts spec and returns its stream and pid, leaving the start
// event consumed.
func startedPID(t *testing.T, c *Client, ctx context.Context, spec ProcessSpec) (ProcessStream, uint32) {
	t.Helper()
	s, err := c.StartProcess(ctx, spec)
	require.NoError(t, err)
	ev, err := s.Recv()
	require.NoError(t, err)
	require.NotZero(t, ev.PID, "the first event is the start")
	return s, ev.PID
}

// recvStdout reads s until its stdout so far is want.
func recvStdout(t *testing.T, s ProcessStream, want string) {
	t.Helper()
	var got strings.Builder
	for got.Len() < len(want) {
		ev, err := s.Recv()
		require.NoError(t, err)
		require.Nil(t, ev.End, "ended before printing %q; got %q", want, got.String())
		got.Write(ev.Stdout)
	}
	require.Equal(t, want, got.String())
}

func TestStartProcess(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	me, err := user.Current()
	require.NoError(t, err)
	tests := []struct {
		name           string
		spec           ProcessSpec
		stdout, stderr string
		end            ProcessEnd
	}{
		{
			name:   "output and exit status",
			spec:   ProcessSpec{Cmd: "sh", Args: []string{"-c", "echo out; echo err >&2; exit 3"}},
			stdout: "out\n", stderr: "err\n",
			end: ProcessEnd{ExitCode: 3, Exited: true, Status: "exit status 3", Error: "exit status 3"},
		},
		{
			name: "success",
			spec: ProcessSpec{Cmd: "true"},
			end:  ProcessEnd{ExitCode: 0, Exited: true, Status: "exit status 0"},
		},
		{
			name: "killed by a signal",
			spec: ProcessSpec{Cmd: "sh", Args: []string{"-c", "kill -KILL $$"}},
			end:  ProcessEnd{ExitCode: -1, Status: "signal: killed", Error: "signal: killed"},
		},
		{
			name:   "env over the defaults",
			spec:   ProcessSpec{Cmd: "sh", Args: []string{"-c", `echo "$FOO $HOME $USER $PATH"`}, Env: map[string]string{"FOO": "bar", "HOME": "/h"}},
			stdout: "bar /h " + me.Username + " " + defaultPath + "\n",
			end:    ProcessEnd{Exited: true, Status: "exit status 0"},
		},
		{
			name:   "absolute cwd",
			spec:   ProcessSpec{Cmd: "pwd", Cwd: dir},
			stdout: dir + "\n",
			end:    ProcessEnd{Exited: true, Status: "exit status 0"},
		},
		{
			name:   "no cwd is the home",
			spec:   ProcessSpec{Cmd: "pwd"},
			stdout: me.HomeDir + "\n",
			end:    ProcessEnd{Exited: true, Status: "exit status 0"},
		},
		{
			// A uid without a passwd entry has the home "/".
			name:   "relative cwd against the user's home",
			spec:   ProcessSpec{Cmd: "sh", Args: []string{"-c", "pwd; id -u"}, Cwd: "tmp", User: "54321"},
			stdout: "/tmp\n54321\n",
			end:    ProcessEnd{Exited: true, Status: "exit status 0"},
		},
		{
			name:   "tilde cwd",
			spec:   ProcessSpec{Cmd: "pwd", Cwd: "~/tmp", User: "54321"},
			stdout: "/tmp\n",
			end:    ProcessEnd{Exited: true, Status: "exit status 0"},
		},
		{
			name: "no stdin reads /dev/null",
			spec: ProcessSpec{Cmd: "cat"},
			end:  ProcessEnd{Exited: true, Status: "exit status 0"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := c.StartProcess(t.Context(), tt.spec)
			require.NoError(t, err)
			f := follow(t, s)
			require.NotZero(t, f.pid)
			require.Equal(t, tt.stdout, f.stdout.String())
			require.Equal(t, tt.stderr, f.stderr.String())
			require.Equal(t, tt.end, *f.end)
			ev, err := s.Recv()
			require.Nil(t, ev)
			require.Equal(t, io.EOF, err, "io.EOF after the end")
			require.NoError(t, s.Close())
		})
	}
}

func TestStartProcessCannotStart(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	tests := []struct {
		name string
		spec ProcessSpec
		kind error
		msg  string
	}{
		{name: "missing cwd", spec: ProcessSpec{Cmd: "true", Cwd: "/nosuch"}, kind: types.ErrInvalid, msg: "cwd '/nosuch' does not exist"},
		{name: "missing relative cwd", spec: ProcessSpec{Cmd: "true", Cwd: "nosuch", User: "54321"}, kind: types.ErrInvalid, msg: "cwd '/nosuch' does not exist"},
		{name: "no such program", spec: ProcessSpec{Cmd: "nosuch"}, kind: types.ErrInvalid, msg: "nosuch: command not found"},
		{name: "not executable", spec: ProcessSpec{Cmd: "/etc/passwd"}, kind: types.ErrInvalid, msg: "permission denied"},
		{name: "unknown user", spec: ProcessSpec{Cmd: "true", User: "no-such-user"}, kind: types.ErrInvalid, msg: "no-such-user"},
		{name: "empty command", spec: ProcessSpec{}, kind: types.ErrInvalid, msg: "command is empty"},
		{name: "bad env", spec: ProcessSpec{Cmd: "true", Env: map[string]string{"A=B": "c"}}, kind: types.ErrInvalid, msg: "A=B"},
		{name: "negative timeout", spec: ProcessSpec{Cmd: "true", Timeout: -time.Second}, kind: types.ErrInvalid, msg: "negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := c.StartProcess(t.Context(), tt.spec)
			require.ErrorIs(t, err, tt.kind)
			require.ErrorContains(t, err, tt.msg)
			require.Nil(t, s)
		})
	}
}

func TestProcessTimeoutKillsGroup(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	pidFile := filepath.Join(t.TempDir(), "pids")
	begin := time.Now()
	s, err := c.StartProcess(t.Context(), ProcessSpec{
		Cmd:     "sh",
		Args:    []string{"-c", `echo $$ > ` + pidFile + `; sleep 60 & echo $! >> ` + pidFile + `; wait`},
		Timeout: 500 * time.Millisecond,
	})
	require.NoError(t, err)
	f := follow(t, s)
	require.Less(t, time.Since(begin), 5*time.Second)
	require.Equal(t, ProcessEnd{ExitCode: -1, Status: "signal: killed", Error: "signal: killed"}, *f.end)
	requireAllGone(t, readPids(t, pidFile))
}

func TestProcessKeepalive(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	s, err := c.StartProcess(t.Context(), ProcessSpec{Cmd: "sleep", Args: []string{"1"}, KeepaliveInterval: 100 * time.Millisecond})
	require.NoError(t, err)
	f := follow(t, s)
	require.GreaterOrEqual(t, f.keepalives, 5, "about one keepalive per 100ms of silence")
	require.LessOrEqual(t, f.keepalives, 11)

	s, err = c.StartProcess(t.Context(), ProcessSpec{Cmd: "sleep", Args: []string{"0.5"}})
	require.NoError(t, err)
	require.Zero(t, follow(t, s).keepalives, "no keepalives unless asked")

	// On a connected stream, with its own interval.
	start, pid := startedPID(t, c, t.Context(), ProcessSpec{Cmd: "sleep", Args: []string{"1"}})
	defer start.Close()
	s, err = c.ConnectProcess(t.Context(), ProcessSelector{PID: pid}, 100*time.Millisecond)
	require.NoError(t, err)
	require.GreaterOrEqual(t, follow(t, s).keepalives, 4)
}

func TestSignalProcess(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	tests := []struct {
		name string
		sel  func(pid uint32) ProcessSelector
	}{
		{name: "by pid", sel: func(pid uint32) ProcessSelector { return ProcessSelector{PID: pid} }},
		{name: "by tag", sel: func(uint32) ProcessSelector { return ProcessSelector{Tag: "sleeper"} }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, pid := startedPID(t, c, t.Context(), ProcessSpec{Cmd: "sleep", Args: []string{"60"}, Tag: "sleeper"})
			require.NoError(t, c.SignalProcess(t.Context(), tt.sel(pid), syscall.SIGTERM))
			f := followStarted(t, s, pid)
			require.Equal(t, ProcessEnd{ExitCode: -1, Status: "signal: terminated", Error: "signal: terminated"}, *f.end)
			require.ErrorIs(t, c.SignalProcess(t.Context(), ProcessSelector{PID: pid}, syscall.SIGTERM), types.ErrNotFound, "an ended process")
		})
	}
	require.ErrorIs(t, c.SignalProcess(t.Context(), ProcessSelector{PID: 999999}, syscall.SIGTERM), types.ErrNotFound)
	require.ErrorIs(t, c.SignalProcess(t.Context(), ProcessSelector{Tag: "nosuch"}, syscall.SIGTERM), types.ErrNotFound)
	require.ErrorIs(t, c.SignalProcess(t.Context(), ProcessSelector{}, syscall.SIGTERM), types.ErrInvalid)

	s, pid := startedPID(t, c, t.Context(), ProcessSpec{Cmd: "sleep", Args: []string{"60"}})
	require.ErrorIs(t, c.SignalProcess(t.Context(), ProcessSelector{PID: pid}, syscall.Signal(99)), types.ErrInvalid)
	require.NoError(t, c.SignalProcess(t.Context(), ProcessSelector{PID: pid}, syscall.SIGKILL))
	require.Equal(t, "signal: killed", followStarted(t, s, pid).end.Status)
}

func TestProcessStdin(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	// It outlives the end of its input, to tell a closed stdin from an
	// ended process.
	s, pid := startedPID(t, c, t.Context(), ProcessSpec{Cmd: "sh", Args: []string{"-c", "cat; echo EOF; exec sleep 60"}, Stdin: true, Tag: "cat"})
	sel := ProcessSelector{PID: pid}
	require.NoError(t, c.WriteStdin(t.Context(), sel, []byte("hello\n")))
	recvStdout(t, s, "hello\n")
	big := bytes.Repeat([]byte("x"), 3*chunkSize+5)
	require.NoError(t, c.WriteStdin(t.Context(), ProcessSelector{Tag: "cat"}, big))
	recvStdout(t, s, string(big))
	require.NoError(t, c.CloseStdin(t.Context(), sel))
	recvStdout(t, s, "EOF\n")
	require.NoError(t, c.CloseStdin(t.Context(), sel), "closing twice is harmless")
	require.ErrorIs(t, c.WriteStdin(t.Context(), sel, []byte("late")), types.ErrInvalid, "stdin is closed")
	require.NoError(t, c.SignalProcess(t.Context(), sel, syscall.SIGKILL))
	followStarted(t, s, pid)
	require.ErrorIs(t, c.WriteStdin(t.Context(), sel, []byte("x")), types.ErrNotFound, "an ended process")
	require.NoError(t, c.CloseStdin(t.Context(), sel), "closing the stdin of an ended process is harmless")

	s, pid = startedPID(t, c, t.Context(), ProcessSpec{Cmd: "sleep", Args: []string{"60"}})
	defer c.SignalProcess(context.Background(), ProcessSelector{PID: pid}, syscall.SIGKILL)
	defer s.Close()
	err := c.WriteStdin(t.Context(), ProcessSelector{PID: pid}, []byte("x"))
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "without stdin")
	require.ErrorIs(t, c.CloseStdin(t.Context(), ProcessSelector{PID: pid}), types.ErrInvalid)
	require.ErrorIs(t, c.WriteStdin(t.Context(), ProcessSelector{PID: 999999}, []byte("x")), types.ErrNotFound)
	require.ErrorIs(t, c.CloseStdin(t.Context(), ProcessSelector{Tag: "nosuch"}), types.ErrNotFound)
}

func TestProcessFanOut(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	first, pid := startedPID(t, c, t.Context(), ProcessSpec{Cmd: "cat", Stdin: true, Tag: "fan"})
	var streams []ProcessStream
	for _, sel := range []ProcessSelector{{PID: pid}, {Tag: "fan"}} {
		s, err := c.ConnectProcess(t.Context(), sel, 0)
		require.NoError(t, err)
		ev, err := s.Recv()
		require.NoError(t, err)
		require.Equal(t, pid, ev.PID, "a connected stream starts with the start")
		streams = append(streams, s)
	}
	streams = append(streams, first)
	require.NoError(t, c.WriteStdin(t.Context(), ProcessSelector{PID: pid}, []byte("to all\n")))
	for _, s := range streams {
		recvStdout(t, s, "to all\n")
	}
	// A late stream sees only what comes after it.
	late, err := c.ConnectProcess(t.Context(), ProcessSelector{PID: pid}, 0)
	require.NoError(t, err)
	streams = append(streams, late)
	require.NoError(t, c.WriteStdin(t.Context(), ProcessSelector{PID: pid}, []byte("again\n")))
	require.NoError(t, c.CloseStdin(t.Context(), ProcessSelector{PID: pid}))
	for i, s := range streams {
		var f *followed
		if s == late {
			f = follow(t, s)
		} else {
			f = followStarted(t, s, pid)
		}
		require.Equal(t, pid, f.pid, "stream %d", i)
		require.Equal(t, "again\n", f.stdout.String())
		require.Equal(t, "exit status 0", f.end.Status)
	}
}

func TestProcessSlowReaderIsCutOff(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	// The reader on the start stream reads all; the connected one reads
	// nothing until the process has printed far more than it may lag.
	start, pid := startedPID(t, c, t.Context(), ProcessSpec{Cmd: "sh", Args: []string{"-c", "read x; head -c 104857600 /dev/zero"}, Stdin: true})
	slow, err := c.ConnectProcess(t.Context(), ProcessSelector{PID: pid}, 0)
	require.NoError(t, err)
	defer slow.Close()
	begin := time.Now()
	require.NoError(t, c.WriteStdin(t.Context(), ProcessSelector{PID: pid}, []byte("go\n")))
	f := followStarted(t, start, pid)
	require.Less(t, time.Since(begin), subscriberStall+5*time.Second, "the slow reader held the process up once at most")
	require.Equal(t, 100<<20, f.stdout.Len(), "a slow reader does not hold the process or the others back")
	require.Equal(t, "exit status 0", f.end.Status)

	var got int
	for {
		ev, err := slow.Recv()
		if err != nil {
			require.NotErrorIs(t, err, io.EOF)
			require.ErrorContains(t, err, "behind")
			break
		}
		require.Nil(t, ev.End, "the slow reader must be cut off, not see an end after a gap")
		got += len(ev.Stdout)
	}
	require.Less(t, got, 100<<20)
}

func TestProcessOutlivesItsStream(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	ctx, cancel := context.WithCancel(t.Context())
	s, pid := startedPID(t, c, ctx, ProcessSpec{Cmd: "sh", Args: []string{"-c", "while :; do echo tick; sleep 0.05; done"}, Tag: "ticker"})
	recvStdout(t, s, "tick\n")
	cancel()
	_, err := s.Recv()
	require.ErrorIs(t, err, context.Canceled)
	time.Sleep(300 * time.Millisecond)
	require.True(t, alive(int(pid)), "cancelling the stream detaches only")

	s2, err := c.ConnectProcess(t.Context(), ProcessSelector{Tag: "ticker"}, 0)
	require.NoError(t, err)
	ev, err := s2.Recv()
	require.NoError(t, err)
	require.Equal(t, pid, ev.PID)
	recvStdout(t, s2, "tick\n")
	require.NoError(t, s2.Close())
	time.Sleep(100 * time.Millisecond)
	require.True(t, alive(int(pid)), "closing the stream detaches only")

	// Nobody follows it now: its output is dropped, and it runs on.
	require.NoError(t, c.SignalProcess(t.Context(), ProcessSelector{Tag: "ticker"}, syscall.SIGKILL))
	requireAllGone(t, []int{int(pid)})
}

func TestConnectEndedProcess(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	s, err := c.StartProcess(t.Context(), ProcessSpec{Cmd: "sh", Args: []string{"-c", "echo gone; exit 7"}, Tag: "short"})
	require.NoError(t, err)
	f := follow(t, s)
	require.Equal(t, "gone\n", f.stdout.String())
	for _, sel := range []ProcessSelector{{PID: f.pid}, {Tag: "short"}} {
		s, err := c.ConnectProcess(t.Context(), sel, 10*time.Millisecond)
		require.NoError(t, err)
		g := follow(t, s)
		require.Equal(t, f.pid, g.pid)
		require.Empty(t, g.stdout.String(), "the output is not replayed")
		require.Equal(t, ProcessEnd{ExitCode: 7, Exited: true, Status: "exit status 7", Error: "exit status 7"}, *g.end)
	}
	_, err = c.ConnectProcess(t.Context(), ProcessSelector{PID: 999999}, 0)
	require.ErrorIs(t, err, types.ErrNotFound)
	_, err = c.ConnectProcess(t.Context(), ProcessSelector{Tag: "nosuch"}, 0)
	require.ErrorIs(t, err, types.ErrNotFound)

	// The tag of an ended process can be used again.
	s, err = c.StartProcess(t.Context(), ProcessSpec{Cmd: "true", Tag: "short"})
	require.NoError(t, err)
	follow(t, s)
}

func TestListProcesses(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	ps, err := c.ListProcesses(t.Context())
	require.NoError(t, err)
	require.Empty(t, ps)

	a, pidA := startedPID(t, c, t.Context(), ProcessSpec{Cmd: "sleep", Args: []string{"60"}, Env: map[string]string{"K": "v"}, Cwd: dir, Tag: "a"})
	b, pidB := startedPID(t, c, t.Context(), ProcessSpec{Cmd: "sleep", Args: []string{"61"}})
	_, err = c.StartProcess(t.Context(), ProcessSpec{Cmd: "true", Tag: "a"})
	require.ErrorIs(t, err, types.ErrConflict, "a running process has the tag")

	ps, err = c.ListProcesses(t.Context())
	require.NoError(t, err)
	me, err := user.Current()
	require.NoError(t, err)
	want := []ProcessInfo{
		{PID: pidA, Tag: "a", Cmd: "sleep", Args: []string{"60"}, Env: map[string]string{"K": "v"}, Cwd: dir},
		{PID: pidB, Cmd: "sleep", Args: []string{"61"}, Cwd: me.HomeDir},
	}
	if pidB < pidA {
		want[0], want[1] = want[1], want[0]
	}
	require.Equal(t, want, ps)

	require.NoError(t, c.SignalProcess(t.Context(), ProcessSelector{PID: pidA}, syscall.SIGKILL))
	followStarted(t, a, pidA)
	ps, err = c.ListProcesses(t.Context())
	require.NoError(t, err)
	require.Len(t, ps, 1, "ended processes are not listed")
	require.Equal(t, pidB, ps[0].PID)
	require.NoError(t, c.SignalProcess(t.Context(), ProcessSelector{PID: pidB}, syscall.SIGKILL))
	followStarted(t, b, pidB)
}

func TestStopKillsTableProcesses(t *testing.T) {
	c, srv := startAgent(t, ServerConfig{})
	s, pid := startedPID(t, c, t.Context(), ProcessSpec{Cmd: "sleep", Args: []string{"60"}})
	defer s.Close()
	srv.Stop()
	requireAllGone(t, []int{int(pid)})
	_, err := c.StartProcess(t.Context(), ProcessSpec{Cmd: "true"})
	require.ErrorIs(t, err, types.ErrUnavailable)
}

// oldAgent is an agent of protocol revision 2: it knows none of the calls
// of revision 3.
type oldAgent struct {
	agentpb.UnimplementedAgentServer
}

func (oldAgent) Info(context.Context, *agentpb.InfoRequest) (*agentpb.InfoResponse, error) {
	return &agentpb.InfoResponse{Version: "0.0.9", Protocol: 2}, nil
}

// oldAgentClient serves an oldAgent and returns a client for it.
func oldAgentClient(t *testing.T) *Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := Listen("unix://" + sock)
	require.NoError(t, err)
	gs := grpc.NewServer()
	agentpb.RegisterAgentServer(gs, oldAgent{})
	go gs.Serve(l)
	c, err := NewClient(UnixDialer(sock))
	require.NoError(t, err)
	t.Cleanup(func() {
		c.Close()
		gs.Stop()
	})
	return c
}

func TestNewCallsOnOldAgent(t *testing.T) {
	c := oldAgentClient(t)

	calls := map[string]func() error{
		"StartProcess": func() error {
			_, err := c.StartProcess(t.Context(), ProcessSpec{Cmd: "true"})
			return err
		},
		"ConnectProcess": func() error {
			_, err := c.ConnectProcess(t.Context(), ProcessSelector{PID: 1}, 0)
			return err
		},
		"ListProcesses": func() error {
			_, err := c.ListProcesses(t.Context())
			return err
		},
		"SignalProcess": func() error { return c.SignalProcess(t.Context(), ProcessSelector{PID: 1}, syscall.SIGTERM) },
		"WriteStdin":    func() error { return c.WriteStdin(t.Context(), ProcessSelector{PID: 1}, nil) },
		"CloseStdin":    func() error { return c.CloseStdin(t.Context(), ProcessSelector{PID: 1}) },
		"Stat": func() error {
			_, err := c.Stat(t.Context(), "/", "")
			return err
		},
		"ListDir": func() error {
			_, err := c.ListDir(t.Context(), "/", "", 1)
			return err
		},
		"MakeDir": func() error {
			_, _, err := c.MakeDir(t.Context(), "/x", "")
			return err
		},
		"Move": func() error {
			_, err := c.Move(t.Context(), "/x", "/y", "")
			return err
		},
		"Remove": func() error { return c.Remove(t.Context(), "/x", "") },
	}
	for name, call := range calls {
		t.Run(name, func(t *testing.T) {
			err := call()
			require.ErrorIs(t, err, types.ErrNotSupported)
			require.ErrorContains(t, err, "the guest agent is too old (fc-agent 0.0.9 speaks protocol 2; this call needs 3); rebuild the guest image")
		})
	}
}
