package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// testCgroupRoot returns a fresh ExecCgroupRoot on the host's cgroup v2
// hierarchy (/sys/fs/cgroup on a pure v2 host, /sys/fs/cgroup/unified on
// a hybrid one), removed when t ends.
func testCgroupRoot(t testing.TB) string {
	t.Helper()
	if os.Geteuid() != 0 {
		testenv.Skip(t, "making cgroups needs root; run the tests as root")
	}
	var mount string
	for _, m := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
		var st unix.Statfs_t
		if unix.Statfs(m, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
			mount = m
			break
		}
	}
	if mount == "" {
		testenv.Skip(t, "no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified; mount one (mount -t cgroup2 none /sys/fs/cgroup/unified)")
	}
	root := filepath.Join(mount, fmt.Sprintf("aetherium-test-%d-%d", os.Getpid(), time.Now().UnixNano()))
	t.Cleanup(func() {
		entries, _ := os.ReadDir(root)
		for _, e := range entries {
			if e.IsDir() {
				_ = os.WriteFile(filepath.Join(root, e.Name(), "cgroup.kill"), []byte("1"), 0)
				require.Eventually(t, func() bool { return unix.Rmdir(filepath.Join(root, e.Name())) == nil }, 5*time.Second, 10*time.Millisecond)
			}
		}
		_ = unix.Rmdir(root)
	})
	return root
}

// noCgroupsIn reports whether root holds no command cgroup.
func noCgroupsIn(root string) func() bool {
	return func() bool {
		entries, err := os.ReadDir(root)
		if err != nil {
			return false
		}
		for _, e := range entries {
			if e.IsDir() {
				return false
			}
		}
		return true
	}
}

// TestExecKillsEscapedTree: a process that cleared its environment (so
// it has no token), left the command's session and whose parent exited
// (so no parent link leads to it) is still killed with the command,
// because it never left the command's cgroup. The cgroup is gone when
// the command has ended.
func TestExecKillsEscapedTree(t *testing.T) {
	root := testCgroupRoot(t)
	c, srv := startAgent(t, ServerConfig{ExecCgroupRoot: root})
	require.NotNil(t, srv.cgroups, "the agent must use the cgroup root")

	n := time.Now().UnixNano() % 1e6
	args := []string{fmt.Sprintf("305.%06d", n), fmt.Sprintf("306.%06d", n)}
	t.Cleanup(func() {
		for _, pid := range sleepers(args...) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	cmd := sh(fmt.Sprintf(`(env -i setsid sh -c "exec sleep %s" &); sleep %s`, args[0], args[1]))
	cmd.Timeout = 2 * time.Second
	p, err := c.Start(t.Context(), cmd, nil, nil, nil)
	require.NoError(t, err)
	require.Eventually(t, func() bool { return len(sleepers(args...)) == 2 }, 5*time.Second, 10*time.Millisecond,
		"the two sleeps did not start")
	for _, pid := range sleepers(args[0]) {
		env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		require.NoError(t, err)
		require.NotContains(t, string(env), ExecTokenEnv, "the escaped sleep must carry no token")
	}
	res, err := p.Wait()
	require.NoError(t, err)
	require.True(t, res.TimedOut)
	require.Eventually(t, func() bool { return len(sleepers(args...)) == 0 }, 3*time.Second, 20*time.Millisecond,
		"processes of the command survived")
	require.Eventually(t, noCgroupsIn(root), 3*time.Second, 20*time.Millisecond, "the command's cgroup is left in %s", root)
}

// TestExecCgroupKeepsBackground: a command that leaves a process running
// in the background on a normal exit keeps it (as without cgroups); its
// cgroup stays while the process lives and is swept after.
func TestExecCgroupKeepsBackground(t *testing.T) {
	root := testCgroupRoot(t)
	c, srv := startAgent(t, ServerConfig{ExecCgroupRoot: root})
	require.NotNil(t, srv.cgroups)
	n := time.Now().UnixNano() % 1e6
	arg := fmt.Sprintf("307.%06d", n)
	t.Cleanup(func() {
		for _, pid := range sleepers(arg) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	res, err := c.Exec(t.Context(), sh(fmt.Sprintf(`setsid sleep %s >/dev/null 2>&1 </dev/null &`, arg)), nil, nil)
	require.NoError(t, err)
	require.Equal(t, 0, res.ExitCode)
	require.Eventually(t, func() bool { return len(sleepers(arg)) == 1 }, 5*time.Second, 10*time.Millisecond)
	time.Sleep(100 * time.Millisecond)
	require.Len(t, sleepers(arg), 1, "a background process of an ended command lives on")

	syscall.Kill(sleepers(arg)[0], syscall.SIGKILL)
	require.Eventually(t, func() bool { return len(sleepers(arg)) == 0 }, 3*time.Second, 10*time.Millisecond)
	// The next command's start sweeps the empty cgroup.
	_, err = c.Exec(t.Context(), sh("true"), nil, nil)
	require.NoError(t, err)
	require.Eventually(t, noCgroupsIn(root), 3*time.Second, 20*time.Millisecond, "cgroups are left in %s", root)
}

// TestExecCgroupsConcurrent: commands started at once each start in a
// cgroup of their own; one's sweep never takes another's cgroup before
// its command is in it (which failed such starts with ENOENT).
func TestExecCgroupsConcurrent(t *testing.T) {
	root := testCgroupRoot(t)
	c, _ := startAgent(t, ServerConfig{ExecCgroupRoot: root})
	rel := "/" + strings.TrimPrefix(strings.TrimPrefix(root, "/sys/fs/cgroup/unified"), "/sys/fs/cgroup") + "/"
	var wg sync.WaitGroup
	errs := make(chan error, 8*25)
	for range 8 {
		wg.Go(func() {
			for range 25 {
				res, err := c.Exec(t.Context(), sh("cat /proc/self/cgroup"), nil, nil)
				switch {
				case err != nil:
					errs <- err
				case res.ExitCode != 0:
					errs <- fmt.Errorf("exit %d: %s", res.ExitCode, res.Stderr)
				case !strings.Contains(string(res.Stdout), "0::"+strings.ReplaceAll(rel, "//", "/")):
					errs <- fmt.Errorf("the command ran outside its cgroup: %s", res.Stdout)
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// BenchmarkExecCgroup: `exec true` through an agent that gives each
// command a cgroup, against one that does not, alternating in one loop;
// it reports both medians and their ratio.
func BenchmarkExecCgroup(b *testing.B) {
	root := testCgroupRoot(b)
	with, _ := startAgent(b, ServerConfig{ExecCgroupRoot: root})
	without, _ := startAgent(b, ServerConfig{})
	cmd := types.Command{Cmd: "true"}
	run := func(c *Client) time.Duration {
		start := time.Now()
		res, err := c.Exec(b.Context(), cmd, nil, nil)
		if err != nil || res.ExitCode != 0 {
			b.Fatalf("exec true: %v %+v", err, res)
		}
		return time.Since(start)
	}
	var dw, dn []time.Duration
	for b.Loop() {
		dw = append(dw, run(with))
		dn = append(dn, run(without))
	}
	median := func(d []time.Duration) time.Duration {
		slices.Sort(d)
		return d[len(d)/2]
	}
	mw, mn := median(dw), median(dn)
	b.ReportMetric(float64(mw.Microseconds())/1000, "cgroup-ms")
	b.ReportMetric(float64(mn.Microseconds())/1000, "token-only-ms")
	b.ReportMetric(float64(mw)/float64(mn), "ratio")
}
