package agent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// startAgent serves an agent in-process on a unix socket and returns a
// client for it; both are stopped when the test ends.
func startAgent(t testing.TB, cfg ServerConfig) (*Client, *Server) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := Listen("unix://" + sock)
	require.NoError(t, err)
	srv := NewServer(cfg)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	c, err := NewClient(UnixDialer(sock))
	require.NoError(t, err)
	t.Cleanup(func() {
		c.Close()
		srv.Stop()
		require.NoError(t, <-served)
	})
	return c, srv
}

// TestServeAfterStop: Serve on a server already stopped returns nil, as
// after a Stop that came later, and closes its listener.
func TestServeAfterStop(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := Listen("unix://" + sock)
	require.NoError(t, err)
	srv := NewServer(ServerConfig{})
	srv.Stop()
	require.NoError(t, srv.Serve(l))
	_, err = l.Accept()
	require.Error(t, err, "the listener is closed")
}

// alive reports whether pid runs; a zombie has ended, whoever its parent is
// and however fast it reaps.
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// The state follows the command name, which is in parentheses.
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || (b[i+2] != 'Z' && b[i+2] != 'X')
}

// readPids reads the pids a test command wrote, one a line.
func readPids(t *testing.T, path string) []int {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		pid, err := strconv.Atoi(f)
		require.NoError(t, err)
		pids = append(pids, pid)
	}
	require.Len(t, pids, 2, "the command writes its own pid and its background child's")
	return pids
}

func requireAllGone(t *testing.T, pids []int) {
	t.Helper()
	require.Eventually(t, func() bool {
		for _, pid := range pids {
			if alive(pid) {
				return false
			}
		}
		return true
	}, 2*time.Second, 20*time.Millisecond, "processes of the command's group survived: %v", pids)
}

func sh(script string) types.Command {
	return types.Command{Cmd: "sh", Args: []string{"-c", script}}
}

func TestInfo(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	info, err := c.Info(t.Context())
	require.NoError(t, err)
	require.Equal(t, Version, info.GetVersion())
	require.EqualValues(t, protocolRevision, info.GetProtocol())
	require.NotEmpty(t, info.GetKernel())
	require.Positive(t, info.GetUptimeSeconds())
	host, _ := os.Hostname()
	require.Equal(t, host, info.GetHostname())
	require.False(t, info.GetPid1())

	info, err = c.WaitReady(t.Context())
	require.NoError(t, err)
	require.Equal(t, Version, info.GetVersion())
}

func TestExec(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	tests := []struct {
		name   string
		cmd    types.Command
		root   bool // needs an agent running as root
		code   int
		stdout string
		stderr string
		signal string
	}{
		{name: "exit code and separate streams", cmd: sh("echo out; echo err >&2; exit 3"), code: 3, stdout: "out\n", stderr: "err\n"},
		{name: "success", cmd: types.Command{Cmd: "true"}},
		{name: "args are not split", cmd: types.Command{Cmd: "echo", Args: []string{"a  b", "c"}}, stdout: "a  b c\n"},
		{name: "stdin", cmd: types.Command{Cmd: "cat", Stdin: []byte("hello\nworld")}, stdout: "hello\nworld"},
		{name: "no stdin reads /dev/null", cmd: types.Command{Cmd: "cat"}},
		{name: "env overrides defaults", cmd: types.Command{Cmd: "sh", Args: []string{"-c", `echo "$FOO $HOME"`}, Env: map[string]string{"FOO": "bar", "HOME": "/h"}}, stdout: "bar /h\n"},
		{name: "default path", cmd: sh(`echo "$PATH"`), stdout: defaultPath + "\n"},
		{name: "agent env is not inherited", cmd: sh(`echo "${GOPATH:-unset}"`), stdout: "unset\n"},
		{name: "cwd", cmd: types.Command{Cmd: "pwd", Cwd: dir}, stdout: dir + "\n"},
		{name: "relative program resolved in cwd", cmd: types.Command{Cmd: "./true", Cwd: "/bin"}},
		{name: "killed by signal", cmd: sh("kill -KILL $$"), code: 137, signal: "SIGKILL"},
		{name: "numeric uid without passwd entry", cmd: types.Command{Cmd: "sh", Args: []string{"-c", "echo $(id -u) $(id -g)"}, User: "54321"}, root: true, stdout: "54321 0\n"},
		{name: "user by name", cmd: types.Command{Cmd: "id", Args: []string{"-un"}, User: "root"}, root: true, stdout: "root\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.root && os.Geteuid() != 0 {
				testenv.Skip(t, "switching users needs root; run the tests as root")
			}
			var out, errOut bytes.Buffer
			res, err := c.Exec(t.Context(), tt.cmd, &out, &errOut)
			require.NoError(t, err)
			require.Equal(t, tt.code, res.ExitCode, "stderr: %s", res.Stderr)
			require.Equal(t, tt.stdout, string(res.Stdout))
			require.Equal(t, tt.stderr, string(res.Stderr))
			require.Equal(t, tt.stdout, out.String(), "streamed stdout")
			require.Equal(t, tt.stderr, errOut.String(), "streamed stderr")
			require.Equal(t, tt.signal, res.Signal)
			require.False(t, res.TimedOut)
			require.False(t, res.StdoutTruncated || res.StderrTruncated)
			require.False(t, res.StartedAt.IsZero())
			require.False(t, res.FinishedAt.Before(res.StartedAt))
		})
	}
}

// TestExecCannotStart: a request that cannot run as given is an error of
// kind ErrInvalid, not an exit code.
func TestExecCannotStart(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	tests := []struct {
		name string
		cmd  types.Command
		msg  string
	}{
		{name: "missing cwd", cmd: types.Command{Cmd: "true", Cwd: "/nosuch"}, msg: "working directory"},
		{name: "relative cwd", cmd: types.Command{Cmd: "true", Cwd: "tmp"}, msg: "absolute"},
		{name: "unknown user", cmd: types.Command{Cmd: "true", User: "no-such-user"}, msg: "no-such-user"},
		{name: "empty command", cmd: types.Command{}, msg: "command is empty"},
		{name: "bad env name", cmd: types.Command{Cmd: "true", Env: map[string]string{"A=B": "c"}}, msg: "A=B"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := c.Exec(t.Context(), tt.cmd, nil, nil)
			require.ErrorIs(t, err, types.ErrInvalid)
			require.ErrorContains(t, err, tt.msg)
			require.Nil(t, res)
		})
	}
}

// TestExecProgramCannotRun: a program that does not exist exits 127 and
// one that exists but cannot be executed exits 126, with the reason on
// stderr, as shells and `docker exec` report them.
func TestExecProgramCannotRun(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, []byte(content), mode))
		return p
	}
	bin := filepath.Join(dir, "bin")
	require.NoError(t, os.Mkdir(bin, 0o755))
	write("bin/noexec", "#!/bin/sh\necho ran\n", 0o644)
	require.NoError(t, os.Mkdir(filepath.Join(bin, "adir"), 0o755))
	garbage := write("garbage", "\x00\x01 not a program\n", 0o755)
	badInterp := write("badinterp", "#!/no/such/interpreter\n", 0o755)
	inPath := func(name string) types.Command {
		return types.Command{Cmd: name, Env: map[string]string{"PATH": bin + ":/usr/bin:/bin"}}
	}

	tests := []struct {
		name   string
		cmd    types.Command
		code   int
		stderr string
	}{
		{name: "no such program", cmd: types.Command{Cmd: "nosuch"}, code: 127, stderr: "aetherium: nosuch: command not found\n"},
		{name: "no such path", cmd: types.Command{Cmd: "/nosuch/prog"}, code: 127, stderr: "aetherium: /nosuch/prog: no such file or directory\n"},
		{name: "no such relative path", cmd: types.Command{Cmd: "./nosuch", Cwd: dir}, code: 127, stderr: "aetherium: ./nosuch: no such file or directory\n"},
		{name: "a directory in PATH is not a program", cmd: inPath("adir"), code: 127, stderr: "aetherium: adir: command not found\n"},
		{name: "not executable", cmd: types.Command{Cmd: "/etc/passwd"}, code: 126, stderr: "aetherium: /etc/passwd: permission denied\n"},
		{name: "not executable in PATH", cmd: inPath("noexec"), code: 126, stderr: "aetherium: " + bin + "/noexec: permission denied\n"},
		{name: "a directory", cmd: types.Command{Cmd: dir}, code: 126, stderr: "aetherium: " + dir + ": is a directory\n"},
		{name: "relative directory", cmd: types.Command{Cmd: "./bin", Cwd: dir}, code: 126, stderr: "aetherium: ./bin: is a directory\n"},
		{name: "not a program", cmd: types.Command{Cmd: garbage}, code: 126, stderr: "aetherium: " + garbage + ": exec format error\n"},
		{name: "bad interpreter", cmd: types.Command{Cmd: badInterp}, code: 126, stderr: "aetherium: " + badInterp + ": bad interpreter or dynamic loader: no such file or directory\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			res, err := c.Exec(t.Context(), tt.cmd, nil, &stderr)
			require.NoError(t, err)
			require.Equal(t, tt.code, res.ExitCode)
			require.Equal(t, tt.stderr, string(res.Stderr))
			require.Equal(t, tt.stderr, stderr.String(), "the caller's stderr gets the reason too")
			require.Empty(t, res.Stdout)
			require.False(t, res.StartedAt.IsZero())
		})
	}

	// The handle of a program that never started has ended already.
	p, err := c.Start(t.Context(), types.Command{Cmd: "nosuch"}, nil, nil, nil)
	require.NoError(t, err)
	require.Zero(t, p.Pid)
	require.ErrorIs(t, p.Signal(syscall.SIGTERM), types.ErrConflict)
	res, err := p.Wait()
	require.NoError(t, err)
	require.Equal(t, 127, res.ExitCode)
}

func TestExecTimeoutKillsGroup(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	pidFile := filepath.Join(t.TempDir(), "pids")
	cmd := sh(`echo $$ > ` + pidFile + `; sleep 60 & echo $! >> ` + pidFile + `; wait`)
	cmd.Timeout = 2 * time.Second

	begin := time.Now()
	res, err := c.Exec(t.Context(), cmd, nil, nil)
	require.NoError(t, err)
	require.Less(t, time.Since(begin), 5*time.Second)
	require.True(t, res.TimedOut)
	require.Equal(t, 124, res.ExitCode)
	require.Equal(t, "SIGKILL", res.Signal)
	requireAllGone(t, readPids(t, pidFile))
}

func TestExecCancelKillsGroup(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	pidFile := filepath.Join(t.TempDir(), "pids")
	// The pids are written before the marker line on stdout.
	cmd := sh(`echo $$ > ` + pidFile + `; sleep 60 & echo $! >> ` + pidFile + `; echo ready; wait`)

	ctx, cancel := context.WithCancel(t.Context())
	w := newSignalWriter()
	done := make(chan error, 1)
	go func() {
		_, err := c.Exec(ctx, cmd, w, nil)
		done <- err
	}()
	select {
	case <-w.first:
	case <-time.After(5 * time.Second):
		t.Fatal("the command did not start")
	}
	pids := readPids(t, pidFile)
	cancel()
	select {
	case err := <-done:
		require.ErrorIs(t, err, context.Canceled)
	case <-time.After(5 * time.Second):
		t.Fatal("Exec did not return after its context was cancelled")
	}
	requireAllGone(t, pids)
}

// signalWriter closes first, and notes the time, on its first write. The
// client calls it from one goroutine, before Exec returns.
type signalWriter struct {
	first chan struct{}
	at    time.Time
}

func newSignalWriter() *signalWriter { return &signalWriter{first: make(chan struct{})} }

func (w *signalWriter) Write(b []byte) (int, error) {
	if w.at.IsZero() {
		w.at = time.Now()
		close(w.first)
	}
	return len(b), nil
}

// lockedWriter is a buffer that a test reads while the client writes.
type lockedWriter struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (w *lockedWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(b)
}

func (w *lockedWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

func TestExecStreamsOutput(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	w := newSignalWriter()
	begin := time.Now()
	res, err := c.Exec(t.Context(), sh("for i in 1 2 3; do echo $i; sleep 1; done"), w, nil)
	require.NoError(t, err)
	require.Equal(t, "1\n2\n3\n", string(res.Stdout))
	require.False(t, w.at.IsZero())
	require.Less(t, w.at.Sub(begin), 1500*time.Millisecond, "the first line must arrive before the command ends")
	require.Greater(t, time.Since(begin), 2500*time.Millisecond)
}

func TestExecTruncates(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	const limit = 1 << 20
	tests := []struct {
		name    string
		cmd     types.Command
		trunc   bool
		wantLen int
	}{
		{name: "over the limit", cmd: types.Command{Cmd: "head", Args: []string{"-c", "5242880", "/dev/zero"}, MaxOutputBytes: limit}, trunc: true, wantLen: limit},
		{name: "exactly the limit", cmd: types.Command{Cmd: "head", Args: []string{"-c", strconv.Itoa(limit), "/dev/zero"}, MaxOutputBytes: limit}, wantLen: limit},
		{name: "default limit", cmd: types.Command{Cmd: "head", Args: []string{"-c", "2000000", "/dev/zero"}}, trunc: true, wantLen: types.DefaultMaxOutputBytes},
		{name: "tiny limit", cmd: types.Command{Cmd: "head", Args: []string{"-c", "10", "/dev/zero"}, MaxOutputBytes: 4}, trunc: true, wantLen: 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var streamed countWriter
			res, err := c.Exec(t.Context(), tt.cmd, &streamed, nil)
			require.NoError(t, err)
			require.Zero(t, res.ExitCode)
			require.Len(t, res.Stdout, tt.wantLen)
			require.EqualValues(t, tt.wantLen, streamed, "the agent forwards no more than the limit")
			require.Equal(t, tt.trunc, res.StdoutTruncated)
			require.False(t, res.StderrTruncated)
		})
	}

	// The streams are capped independently.
	res, err := c.Exec(t.Context(), types.Command{Cmd: "sh", Args: []string{"-c", "echo 0123456789; echo ab >&2"}, MaxOutputBytes: 4}, nil, nil)
	require.NoError(t, err)
	require.Equal(t, "0123", string(res.Stdout))
	require.Equal(t, "ab\n", string(res.Stderr))
	require.True(t, res.StdoutTruncated)
	require.False(t, res.StderrTruncated)
}

type countWriter int64

func (w *countWriter) Write(b []byte) (int, error) {
	*w += countWriter(len(b))
	return len(b), nil
}

func TestExecMemoryBounded(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{MaxOutputBytes: 1 << 20})
	// Warm up the connection so that its buffers are not counted.
	_, err := c.Exec(t.Context(), types.Command{Cmd: "true"}, nil, nil)
	require.NoError(t, err)

	heap := func() uint64 {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	runtime.GC()
	before := heap()
	peak := before
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			peak = max(peak, heap())
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	res, err := c.Exec(t.Context(), types.Command{Cmd: "head", Args: []string{"-c", "52428800", "/dev/zero"}}, nil, nil)
	close(stop)
	<-sampled
	require.NoError(t, err)
	require.True(t, res.StdoutTruncated)
	require.Len(t, res.Stdout, types.DefaultMaxOutputBytes)
	t.Logf("heap grew by at most %d KiB while the command printed 50 MiB", (int64(peak)-int64(before))>>10)
	require.Less(t, int64(peak)-int64(before), int64(16<<20), "heap grew while a command printed 50 MiB")
}

func TestProcessSignal(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	p, err := c.Start(t.Context(), types.Command{Cmd: "sleep", Args: []string{"60"}}, nil, nil, nil)
	require.NoError(t, err)
	require.Positive(t, p.Pid)
	require.NoError(t, p.Signal(syscall.SIGTERM))
	res, err := p.Wait()
	require.NoError(t, err)
	require.Equal(t, 143, res.ExitCode)
	require.Equal(t, "SIGTERM", res.Signal)
	require.False(t, res.TimedOut)

	again, err := p.Wait()
	require.NoError(t, err)
	require.Same(t, res, again)
	require.ErrorIs(t, p.Signal(syscall.SIGTERM), types.ErrConflict)
}

func TestProcessStreamsStdin(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	r, w := io.Pipe()
	outw := &lockedWriter{}
	p, err := c.Start(t.Context(), types.Command{Cmd: "cat", Stdin: []byte("first\n")}, r, outw, nil)
	require.NoError(t, err)
	_, err = w.Write([]byte("second\n"))
	require.NoError(t, err)
	require.Eventually(t, func() bool { return outw.String() == "first\nsecond\n" }, 5*time.Second, 10*time.Millisecond,
		"stdin is forwarded as it is written")
	require.NoError(t, w.Close())
	res, err := p.Wait()
	require.NoError(t, err)
	require.Zero(t, res.ExitCode)
	require.Equal(t, "first\nsecond\n", string(res.Stdout))
}

func TestExecBackgroundProcessDoesNotHoldExit(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	begin := time.Now()
	// The background sleep keeps stdout open after the shell exits.
	res, err := c.Exec(t.Context(), sh("sleep 30 & echo $!"), nil, nil)
	require.NoError(t, err)
	require.Less(t, time.Since(begin), 3*time.Second)
	require.Zero(t, res.ExitCode)
	pid, err := strconv.Atoi(strings.TrimSpace(string(res.Stdout)))
	require.NoError(t, err)
	// Background processes of a command that exits on its own are left
	// alone: a sandbox user may start a server that way.
	require.True(t, alive(pid))
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
}

func TestStop(t *testing.T) {
	c, srv := startAgent(t, ServerConfig{})
	p, err := c.Start(t.Context(), types.Command{Cmd: "sleep", Args: []string{"60"}}, nil, nil, nil)
	require.NoError(t, err)

	stopped := make(chan struct{})
	go func() {
		srv.Stop()
		close(stopped)
	}()
	srv.Stop() // concurrently with the first
	<-stopped
	srv.Stop() // and once more after it

	res, err := p.Wait()
	if err == nil {
		require.Equal(t, "SIGKILL", res.Signal, "Stop kills running commands")
	} else {
		require.ErrorIs(t, err, types.ErrUnavailable)
	}
	require.False(t, alive(p.Pid))
	_, err = c.Info(t.Context())
	require.ErrorIs(t, err, types.ErrUnavailable)
}

func TestShutdown(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := Listen("unix://" + sock)
	require.NoError(t, err)
	called := make(chan bool, 1)
	srv := NewServer(ServerConfig{OnShutdown: func(reboot bool) { called <- reboot }})
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	c, err := NewClient(UnixDialer(sock))
	require.NoError(t, err)
	defer c.Close()

	require.NoError(t, c.Shutdown(t.Context(), true))
	select {
	case reboot := <-called:
		require.True(t, reboot)
	case <-time.After(10 * time.Second):
		t.Fatal("OnShutdown was not called")
	}
	require.NoError(t, <-served)
	srv.Stop()
}

func TestUnreachable(t *testing.T) {
	c, err := NewClient(UnixDialer(filepath.Join(t.TempDir(), "nobody-listens.sock")))
	require.NoError(t, err)
	defer c.Close()

	_, err = c.Info(t.Context())
	require.ErrorIs(t, err, types.ErrUnavailable)
	_, err = c.Exec(t.Context(), types.Command{Cmd: "true"}, nil, nil)
	require.ErrorIs(t, err, types.ErrUnavailable)
	_, err = c.ReadFile(t.Context(), "/etc/hostname", 0)
	require.ErrorIs(t, err, types.ErrUnavailable)

	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	_, err = c.WaitReady(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.ErrorIs(t, err, types.ErrUnavailable, "the last attempt's error is kept")
}

func TestWaitReadyWaitsForLateAgent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	c, err := NewClient(UnixDialer(sock))
	require.NoError(t, err)
	defer c.Close()

	srv := NewServer(ServerConfig{})
	defer srv.Stop()
	time.AfterFunc(300*time.Millisecond, func() {
		l, err := Listen("unix://" + sock)
		if err != nil {
			t.Error(err)
			return
		}
		go srv.Serve(l)
	})
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	begin := time.Now()
	info, err := c.WaitReady(ctx)
	require.NoError(t, err)
	require.Equal(t, Version, info.GetVersion())
	require.Less(t, time.Since(begin), 1500*time.Millisecond, "backoff is capped at 200ms")
}

func TestClientNeedsDialer(t *testing.T) {
	_, err := NewClient(nil)
	require.True(t, errors.Is(err, types.ErrInvalid))
}

func BenchmarkExecTrue(b *testing.B) {
	c, _ := startAgent(b, ServerConfig{})
	cmd := types.Command{Cmd: "true"}
	for b.Loop() {
		res, err := c.Exec(b.Context(), cmd, nil, nil)
		if err != nil || res.ExitCode != 0 {
			b.Fatalf("exec true: %v %+v", err, res)
		}
	}
}
