package agent

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// TestReaperDispatch drives the reaper with a scripted wait4: statuses go to
// the registered pid only, unknown pids are discarded, EINTR is retried and
// the loop ends when nothing is left to reap.
func TestReaperDispatch(t *testing.T) {
	r := newReaper()
	ch := make(chan waitResult, 1)
	r.waiting[100] = ch

	exit3 := syscall.WaitStatus(3 << 8)
	script := []struct {
		pid    int
		status syscall.WaitStatus
		err    error
	}{
		{pid: 200, status: 0},           // an orphan
		{err: syscall.EINTR},            // retried
		{pid: 100, status: exit3},       // ours
		{pid: 0},                        // nothing else has ended
		{pid: 300, err: syscall.ECHILD}, // not reached
	}
	calls := 0
	r.reap(func(ws *syscall.WaitStatus) (int, error) {
		s := script[calls]
		calls++
		*ws = s.status
		return s.pid, s.err
	})
	require.Equal(t, 4, calls)
	require.EqualValues(t, 1, r.orphans.Load())
	require.Empty(t, r.waiting)
	select {
	case res := <-ch:
		require.NoError(t, res.err)
		require.Equal(t, 3, res.status.ExitStatus())
	default:
		t.Fatal("the registered pid got no status")
	}
}

// reaperChildEnv marks the test binary re-run as a child subreaper.
const reaperChildEnv = "AETHERIUM_AGENT_REAPER_CHILD"

// TestReaperAsSubreaper runs an agent in a child process that is made a
// child subreaper, so that orphans are re-parented to it as they are to PID
// 1. The reaper must reap them while commands still get their own exit
// status, which os/exec's Wait would not allow.
func TestReaperAsSubreaper(t *testing.T) {
	if os.Getenv(reaperChildEnv) == "1" {
		reaperChild(t)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestReaperAsSubreaper$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), reaperChildEnv+"=1")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "subreaper child failed:\n%s", out)
	require.Contains(t, string(out), "--- PASS: TestReaperAsSubreaper")
}

func reaperChild(t *testing.T) {
	require.False(t, needsReaper())
	require.NoError(t, unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0))
	require.True(t, needsReaper())

	c, srv := startAgent(t, ServerConfig{})
	_, ok := srv.waiter.(*reaper)
	require.True(t, ok, "a subreaper agent must reap")

	// Many commands ending at once: each gets its own status.
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Go(func() {
			res, err := c.Exec(t.Context(), sh(fmt.Sprintf("exit %d", i)), nil, nil)
			if !assertNoError(t, err) {
				return
			}
			if res.ExitCode != i {
				t.Errorf("command %d exited %d", i, res.ExitCode)
			}
		})
	}
	wg.Wait()

	// An orphan: re-parented to this process when the shell exits, and
	// reaped when it ends instead of lingering as a zombie.
	res, err := c.Exec(t.Context(), sh("sleep 0.2 >/dev/null 2>&1 & echo $!"), nil, nil)
	require.NoError(t, err)
	orphan, err := strconv.Atoi(strings.TrimSpace(string(res.Stdout)))
	require.NoError(t, err)
	// The pid vanishes as wait4 reaps it, a moment before the reaper
	// counts it: wait for both.
	require.Eventually(t, func() bool {
		_, err := os.Stat("/proc/" + strconv.Itoa(orphan))
		return os.IsNotExist(err) && sharedReaper().orphans.Load() > 0
	}, 5*time.Second, 20*time.Millisecond, "orphan %d was not reaped", orphan)

	// Timeouts and signals work the same with the reaper.
	res, err = c.Exec(t.Context(), types.Command{Cmd: "sleep", Args: []string{"60"}, Timeout: 200 * time.Millisecond}, nil, nil)
	require.NoError(t, err)
	require.True(t, res.TimedOut)
	require.Equal(t, 124, res.ExitCode)

	// Executable but not a program: execve itself fails (ENOEXEC).
	garbage := filepath.Join(t.TempDir(), "garbage")
	require.NoError(t, os.WriteFile(garbage, []byte("\x00\x01\n"), 0o755))
	res, err = c.Exec(t.Context(), types.Command{Cmd: garbage}, nil, nil)
	require.NoError(t, err)
	require.Equal(t, 126, res.ExitCode, "a failed exec is reported, not lost to the reaper")
	require.Contains(t, string(res.Stderr), "exec format error")

	// Table processes get their statuses from the reaper too, several at
	// once, and keep them for a later ConnectProcess.
	var streams []ProcessStream
	for i := range 10 {
		s, err := c.StartProcess(t.Context(), ProcessSpec{Cmd: "sh", Args: []string{"-c", fmt.Sprintf("exit %d", i)}})
		require.NoError(t, err)
		streams = append(streams, s)
	}
	for i, s := range streams {
		f := follow(t, s)
		want := ProcessEnd{ExitCode: int32(i), Exited: true, Status: fmt.Sprintf("exit status %d", i)}
		if i != 0 {
			want.Error = want.Status
		}
		require.Equal(t, want, *f.end)
		again, err := c.ConnectProcess(t.Context(), ProcessSelector{PID: f.pid}, 0)
		require.NoError(t, err)
		require.Equal(t, f.end, follow(t, again).end)
	}
	s, err := c.StartProcess(t.Context(), ProcessSpec{Cmd: "sleep", Args: []string{"60"}, Timeout: 200 * time.Millisecond})
	require.NoError(t, err)
	require.Equal(t, "signal: killed", follow(t, s).end.Status)
	_, err = c.StartProcess(t.Context(), ProcessSpec{Cmd: "/etc/passwd"})
	require.ErrorIs(t, err, types.ErrInvalid, "a failed start is reported, not lost to the reaper")
}

func assertNoError(t *testing.T, err error) bool {
	t.Helper()
	if err != nil {
		t.Error(err)
		return false
	}
	return true
}
