package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// breakableAgent serves an agent in-process and returns a client whose
// connections the test can cut (breakConns), as a crashed host or a broken
// vsock would, and the server.
func breakableAgent(t *testing.T, cfg ServerConfig) (c *Client, srv *Server, breakConns func(), dial Dialer) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := Listen("unix://" + sock)
	require.NoError(t, err)
	srv = NewServer(cfg)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	dial = UnixDialer(sock)
	c, err = NewClient(func(ctx context.Context) (net.Conn, error) {
		conn, err := dial(ctx)
		if err == nil {
			mu.Lock()
			conns = append(conns, conn)
			mu.Unlock()
		}
		return conn, err
	})
	require.NoError(t, err)
	t.Cleanup(func() {
		c.Close()
		srv.Stop()
		require.NoError(t, <-served)
	})
	return c, srv, func() {
		mu.Lock()
		defer mu.Unlock()
		for _, conn := range conns {
			conn.Close()
		}
		conns = nil
	}, dial
}

// newClient is another host's client of the same agent.
func newClient(t *testing.T, dial Dialer) *Client {
	t.Helper()
	c, err := NewClient(dial)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// countLines counts the lines of path; a missing file has none.
func countLines(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0
	}
	require.NoError(t, err)
	return bytes.Count(b, []byte("\n"))
}

// TestExecJournalSurvivesDisconnect: a command with an execution id runs
// on when its caller's connection breaks; a second Exec with the id runs
// nothing, replays the output from the start, follows the rest and
// reports the real exit.
func TestExecJournalSurvivesDisconnect(t *testing.T) {
	c, _, breakConns, dial := breakableAgent(t, ServerConfig{})
	dir := t.TempDir()
	runs, marks := filepath.Join(dir, "runs"), filepath.Join(dir, "marks")
	cmd := sh(fmt.Sprintf(`echo run >> %s; echo start; echo oops >&2; sleep 1; echo mark >> %s; sleep 1; echo after; exit 7`, runs, marks))

	var out lockedWriter
	started := make(chan int, 1)
	p, err := c.StartWith(t.Context(), cmd, ExecOptions{
		ExecutionID: "job-1",
		Stdout:      &out,
		Started: func(pid int, reattached bool) {
			require.False(t, reattached)
			started <- pid
		},
	})
	require.NoError(t, err)
	pid := <-started
	require.Equal(t, p.Pid, pid)
	require.Eventually(t, func() bool { return out.String() == "start\n" }, 5*time.Second, 10*time.Millisecond)
	require.Zero(t, countLines(t, marks), "the command reached its mark before the disconnect; the test proves nothing")
	breakConns()
	_, err = p.Wait()
	require.Error(t, err)

	// It runs on after the disconnect.
	require.Eventually(t, func() bool { return countLines(t, marks) == 1 }, 5*time.Second, 20*time.Millisecond)
	require.True(t, alive(pid), "the command died with its caller's connection")

	var stdout, stderr lockedWriter
	var reattached bool
	res, err := newClient(t, dial).ExecWith(t.Context(), cmd, ExecOptions{
		ExecutionID: "job-1",
		Stdout:      &stdout,
		Stderr:      &stderr,
		Started: func(p int, r bool) {
			require.Equal(t, pid, p)
			reattached = r
		},
	})
	require.NoError(t, err)
	require.True(t, reattached)
	require.Equal(t, 7, res.ExitCode)
	require.Equal(t, "start\nafter\n", string(res.Stdout))
	require.Equal(t, "oops\n", string(res.Stderr))
	require.Equal(t, "start\nafter\n", stdout.String(), "the sink gets the replay and the live output")
	require.Equal(t, "oops\n", stderr.String())
	require.Equal(t, 1, countLines(t, runs), "the command ran more than once")
	require.Equal(t, 1, countLines(t, marks))
}

// TestExecJournalReplaysEnded: an execution that ended is reported again,
// with the original times, and not run again.
func TestExecJournalReplaysEnded(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	runs := filepath.Join(t.TempDir(), "runs")
	cmd := sh(fmt.Sprintf(`echo run >> %s; echo out; echo err >&2; exit 3`, runs))
	first, err := c.ExecWith(t.Context(), cmd, ExecOptions{ExecutionID: "done-1"})
	require.NoError(t, err)
	require.Equal(t, 3, first.ExitCode)

	for _, only := range []bool{false, true} {
		var got []bool
		again, err := c.ExecWith(t.Context(), cmd, ExecOptions{
			ExecutionID:  "done-1",
			ReattachOnly: only,
			Started:      func(_ int, r bool) { got = append(got, r) },
		})
		require.NoError(t, err)
		require.Equal(t, []bool{true}, got)
		require.Equal(t, first, again)
	}
	require.Equal(t, 1, countLines(t, runs))

	// A program that could not start is journaled like one that ran.
	missing := types.Command{Cmd: "no-such-program-xyz"}
	for range 2 {
		res, err := c.ExecWith(t.Context(), missing, ExecOptions{ExecutionID: "missing-1"})
		require.NoError(t, err)
		require.Equal(t, 127, res.ExitCode)
		require.Contains(t, string(res.Stderr), "command not found")
	}
	// A request that cannot run is not journaled: nothing ran.
	bad := types.Command{Cmd: "true", Cwd: "relative"}
	_, err = c.ExecWith(t.Context(), bad, ExecOptions{ExecutionID: "bad-1"})
	require.ErrorIs(t, err, types.ErrInvalid)
	_, err = c.ExecWith(t.Context(), bad, ExecOptions{ExecutionID: "bad-1", ReattachOnly: true})
	require.ErrorIs(t, err, ErrUnknownExecution)
}

// TestExecJournalConcurrentStarts: of two Execs with one new id, exactly
// one starts the command; the other reattaches and gets the same result.
func TestExecJournalConcurrentStarts(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	dir := t.TempDir()
	for i := range 10 {
		runs := filepath.Join(dir, "runs"+strconv.Itoa(i))
		cmd := sh(fmt.Sprintf(`echo run >> %s; echo hello; sleep 0.2; echo bye`, runs))
		id := "race-" + strconv.Itoa(i)
		var (
			wg         sync.WaitGroup
			mu         sync.Mutex
			reattached []bool
			results    [2]*types.ExecResult
		)
		for k := range 2 {
			wg.Go(func() {
				res, err := c.ExecWith(t.Context(), cmd, ExecOptions{
					ExecutionID: id,
					Started: func(_ int, r bool) {
						mu.Lock()
						reattached = append(reattached, r)
						mu.Unlock()
					},
				})
				require.NoError(t, err)
				results[k] = res
			})
		}
		wg.Wait()
		require.Equal(t, 1, countLines(t, runs), "both calls ran the command")
		require.ElementsMatch(t, []bool{false, true}, reattached)
		require.Equal(t, "hello\nbye\n", string(results[0].Stdout))
		require.Equal(t, results[0], results[1])
	}
}

func TestExecJournalReattachOnlyUnknown(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	called := false
	_, err := c.ExecWith(t.Context(), sh("echo never"), ExecOptions{
		ExecutionID:  "never-started",
		ReattachOnly: true,
		Started:      func(int, bool) { called = true },
	})
	require.ErrorIs(t, err, ErrUnknownExecution)
	require.ErrorIs(t, err, types.ErrNotFound)
	require.ErrorContains(t, err, `no execution "never-started" is journaled`)
	require.False(t, called)

	_, err = c.ExecWith(t.Context(), sh("true"), ExecOptions{ReattachOnly: true})
	require.ErrorIs(t, err, types.ErrInvalid)
	_, err = c.ExecWith(t.Context(), sh("true"), ExecOptions{Detach: make(chan struct{})})
	require.ErrorIs(t, err, types.ErrInvalid)
}

// TestExecJournalCancelKills: cancelling ctx kills a journaled command
// (its connection would not) and returns its exit with the context's
// error.
func TestExecJournalCancelKills(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	ctx, cancel := context.WithCancel(t.Context())
	started := make(chan int, 1)
	go func() {
		pid := <-started
		require.True(t, alive(pid))
		cancel()
	}()
	res, err := c.ExecWith(ctx, sh("sleep 300"), ExecOptions{
		ExecutionID: "cancel-1",
		Started:     func(pid int, _ bool) { started <- pid },
	})
	require.ErrorIs(t, err, context.Canceled)
	require.NotNil(t, res, "the exit of the killed command came within killWait")
	require.Equal(t, "SIGKILL", res.Signal)
	require.Equal(t, 137, res.ExitCode)

	// The journal reports the same.
	again, err := c.ExecWith(t.Context(), sh("sleep 300"), ExecOptions{ExecutionID: "cancel-1", ReattachOnly: true})
	require.NoError(t, err)
	require.Equal(t, 137, again.ExitCode)
}

// TestExecJournalDetach: Detach ends the call, not the command, which a
// later call reattaches to.
func TestExecJournalDetach(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	detach := make(chan struct{})
	var pid int
	res, err := func() (*types.ExecResult, error) {
		return c.ExecWith(t.Context(), sh("echo one; sleep 1; echo two"), ExecOptions{
			ExecutionID: "detach-1",
			Detach:      detach,
			Started: func(p int, _ bool) {
				pid = p
				close(detach)
			},
		})
	}()
	require.ErrorIs(t, err, ErrDetached)
	require.Nil(t, res)
	require.True(t, alive(pid), "detaching killed the command")

	res, err = c.ExecWith(t.Context(), sh("not run"), ExecOptions{ExecutionID: "detach-1", ReattachOnly: true})
	require.NoError(t, err)
	require.Equal(t, 0, res.ExitCode)
	require.Equal(t, "one\ntwo\n", string(res.Stdout))
}

// TestExecJournalBounds: the journal forgets the oldest ended executions
// past its count and byte bounds, and any after the retention.
func TestExecJournalBounds(t *testing.T) {
	c, srv := startAgent(t, ServerConfig{MaxEndedExecs: 2, MaxEndedExecBytes: 1000})
	known := func(id string) bool {
		_, err := c.ExecWith(t.Context(), sh("exit 9"), ExecOptions{ExecutionID: id, ReattachOnly: true})
		if errors.Is(err, ErrUnknownExecution) {
			return false
		}
		require.NoError(t, err)
		return true
	}
	for _, id := range []string{"a", "b", "c"} {
		_, err := c.ExecWith(t.Context(), sh("echo "+id), ExecOptions{ExecutionID: id})
		require.NoError(t, err)
	}
	require.False(t, known("a"), "past the count bound the oldest goes first")
	require.True(t, known("b"))
	require.True(t, known("c"))

	// 600 bytes each: two exceed the byte bound, so only the newest stays.
	_, err := c.ExecWith(t.Context(), sh("head -c 600 /dev/zero"), ExecOptions{ExecutionID: "big1"})
	require.NoError(t, err)
	_, err = c.ExecWith(t.Context(), sh("head -c 600 /dev/zero"), ExecOptions{ExecutionID: "big2"})
	require.NoError(t, err)
	require.False(t, known("b"))
	require.False(t, known("c"))
	require.False(t, known("big1"))
	require.True(t, known("big2"))

	srv.journal.mu.Lock()
	srv.journal.retention = 50 * time.Millisecond
	srv.journal.mu.Unlock()
	time.Sleep(100 * time.Millisecond)
	require.False(t, known("big2"), "kept past the retention")
	require.Zero(t, srv.journal.len())
}

// sleepers lists the pids of processes whose command line is sleep with
// one of args.
func sleepers(args ...string) []int {
	pids, _ := listPids()
	var found []int
	for _, pid := range pids {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		if err != nil || !alive(pid) {
			continue
		}
		f := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if len(f) == 2 && filepath.Base(f[0]) == "sleep" {
			for _, a := range args {
				if f[1] == a {
					found = append(found, pid)
				}
			}
		}
	}
	return found
}

// escapeScript starts three sleeps with unique arguments: one that leaves
// the process group (setsid), one in a new session whose parent exits
// (re-parented away from the command) and one in the group.
func escapeScript(t *testing.T) (types.Command, []string) {
	n := time.Now().UnixNano() % 1e6
	args := []string{
		fmt.Sprintf("300.%06d", n), fmt.Sprintf("301.%06d", n), fmt.Sprintf("302.%06d", n),
	}
	t.Cleanup(func() {
		for _, pid := range sleepers(args...) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	return sh(fmt.Sprintf(`setsid sleep %s & (setsid sh -c "sleep %s" &); sleep %s`, args[0], args[1], args[2])), args
}

// TestExecKillsWholeTree: a timeout, an explicit SIGKILL and a caller
// that goes away kill every process the command started, also those
// that left its process group or were re-parented away.
func TestExecKillsWholeTree(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	for _, how := range []string{"timeout", "sigkill", "disconnect"} {
		t.Run(how, func(t *testing.T) {
			cmd, args := escapeScript(t)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			if how == "timeout" {
				cmd.Timeout = 2 * time.Second
			}
			p, err := c.Start(ctx, cmd, nil, nil, nil)
			require.NoError(t, err)
			require.Eventually(t, func() bool { return len(sleepers(args...)) == 3 }, 5*time.Second, 10*time.Millisecond,
				"the three sleeps did not start")
			switch how {
			case "sigkill":
				require.NoError(t, p.Signal(syscall.SIGKILL))
			case "disconnect":
				cancel()
			}
			res, err := p.Wait()
			switch how {
			case "timeout":
				require.NoError(t, err)
				require.True(t, res.TimedOut)
			case "sigkill":
				require.NoError(t, err)
				require.Equal(t, "SIGKILL", res.Signal)
			case "disconnect":
				require.ErrorIs(t, err, context.Canceled)
			}
			require.Eventually(t, func() bool { return len(sleepers(args...)) == 0 }, 3*time.Second, 20*time.Millisecond,
				"processes of the command survived")
		})
	}
}

// TestExecTokenReplaced: the command sees the agent's token, not one the
// request set.
func TestExecTokenReplaced(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	cmd := sh("echo $" + ExecTokenEnv)
	cmd.Env = map[string]string{ExecTokenEnv: "forged"}
	res, err := c.Exec(t.Context(), cmd, nil, nil)
	require.NoError(t, err)
	tok := strings.TrimSpace(string(res.Stdout))
	require.NotEqual(t, "forged", tok)
	require.Len(t, tok, 26)
}

// TestReattachOnlyOnOldAgent: an agent before protocol 5 journals nothing,
// so reattaching finds nothing, and the start is never sent (it would
// run the command).
func TestReattachOnlyOnOldAgent(t *testing.T) {
	c := oldAgentClient(t)
	_, err := c.ExecWith(t.Context(), sh("echo hi"), ExecOptions{ExecutionID: "x", ReattachOnly: true})
	require.ErrorIs(t, err, ErrUnknownExecution)
	require.ErrorContains(t, err, "predates protocol 5")
}

// TestProcessTimeoutKillsWholeTree: a table process's timeout kills what
// it started outside its group too.
func TestProcessTimeoutKillsWholeTree(t *testing.T) {
	c, _ := startAgent(t, ServerConfig{})
	cmd, args := escapeScript(t)
	s, err := c.StartProcess(t.Context(), ProcessSpec{Cmd: cmd.Cmd, Args: cmd.Args, Timeout: time.Second})
	require.NoError(t, err)
	defer s.Close()
	require.Eventually(t, func() bool { return len(sleepers(args...)) == 3 }, 5*time.Second, 10*time.Millisecond,
		"the three sleeps did not start")
	for {
		ev, err := s.Recv()
		require.NoError(t, err)
		if ev.End != nil {
			break
		}
	}
	require.Eventually(t, func() bool { return len(sleepers(args...)) == 0 }, 3*time.Second, 20*time.Millisecond,
		"processes of the table process survived")
}
