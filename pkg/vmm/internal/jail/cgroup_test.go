package jail

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// fakeV2 makes a cgroup v2 root in a temporary directory, as the kernel
// shows one: cgroup.controllers lists what can be enabled.
func fakeV2(t *testing.T, controllers string) string {
	root := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(root, "cgroup.controllers"), []byte(controllers+"\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), nil, 0o644))
	return root
}

func read(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return strings.TrimSpace(string(b))
}

func TestCgroupsV2FakeTree(t *testing.T) {
	root := fakeV2(t, "cpuset cpu io memory hugetlb pids rdma misc")
	c, err := NewCgroups(root, CgroupAuto, "aetherium/vms")
	require.NoError(t, err)
	require.Equal(t, CgroupV2, c.Version(), "auto picks v2 on a pure v2 root")
	c.rmdir = os.RemoveAll // a fake tree's directories hold plain files

	dirs, err := c.Create("vm1", Limits{CPUMillis: 2250, MemoryBytes: 896 << 20, PidsMax: 512, IOWeight: 300})
	require.NoError(t, err)
	dir := filepath.Join(root, "aetherium", "vms", "vm1")
	require.Equal(t, []string{dir}, dirs)
	for _, p := range []string{root, filepath.Join(root, "aetherium"), filepath.Join(root, "aetherium", "vms")} {
		require.Equal(t, "+cpu +memory +pids +io", read(t, filepath.Join(p, "cgroup.subtree_control")), "controllers enabled down to the parent: %s", p)
	}
	require.Equal(t, "225000 100000", read(t, filepath.Join(dir, "cpu.max")))
	require.Equal(t, "939524096", read(t, filepath.Join(dir, "memory.max")))
	require.Equal(t, "512", read(t, filepath.Join(dir, "pids.max")))
	require.Equal(t, "default 300", read(t, filepath.Join(dir, "io.weight")))
	require.Equal(t, "/aetherium/vms/vm1", c.Path("vm1"))

	// Usage as the kernel reports it.
	require.NoError(t, os.WriteFile(filepath.Join(dir, "cpu.stat"), []byte("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 9\nnr_throttled 4\nthrottled_usec 77\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "memory.current"), []byte("123456\n"), 0o644))
	u, err := c.Usage("vm1")
	require.NoError(t, err)
	require.Equal(t, Usage{CPUNanos: 1500000, MemoryBytes: 123456, Throttled: 4}, u)

	_, err = c.Create("vm2", Limits{CPUMillis: 1000})
	require.NoError(t, err)
	names, err := c.List()
	require.NoError(t, err)
	require.Equal(t, []string{"vm1", "vm2"}, names)

	// A cgroup with a task is kept by Reap; an empty dead one goes.
	require.NoError(t, os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte("999999999\n"), 0o644))
	reaped, err := c.Reap(func(string) bool { return false }, func(string) time.Duration { return time.Hour })
	require.NoError(t, err)
	require.Empty(t, reaped, "cgroups younger than the grace may be another worker's VM being made")
	reaped, err = c.Reap(func(string) bool { return false }, func(string) time.Duration { return 0 })
	require.NoError(t, err)
	require.Equal(t, []string{"vm2"}, reaped)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "cgroup.procs"), nil, 0o644))
	require.NoError(t, c.Remove("vm1"))
	require.NoError(t, c.Remove("vm1"), "idempotent")
	_, err = c.Usage("vm1")
	require.ErrorIs(t, err, types.ErrNotFound)

	_, err = c.Create("../x", Limits{})
	require.ErrorIs(t, err, types.ErrInvalid)
}

func TestCgroupsV2MissingController(t *testing.T) {
	_, err := NewCgroups(fakeV2(t, "cpu pids"), CgroupV2, "aetherium")
	require.ErrorIs(t, err, types.ErrUnavailable)
	require.ErrorContains(t, err, `"memory"`)
	// A hybrid root (no cgroup.controllers at the top) is not v2.
	_, err = NewCgroups(t.TempDir(), CgroupV2, "aetherium")
	require.ErrorIs(t, err, types.ErrUnavailable)
}

// TestCgroupsReal makes a VM cgroup on this host's real cgroup file system
// (v1 on a hybrid host, v2 on a pure one), puts a process in it, reads its
// usage and removes it with the process still inside.
func TestCgroupsReal(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Skip(t, "making cgroups needs root; run the test as root")
	}
	c, err := NewCgroups(DefaultCgroupRoot, CgroupAuto, "aetherium-test")
	require.NoError(t, err)
	if _, err := os.Stat(filepath.Join(DefaultCgroupRoot, "cgroup.controllers")); err != nil {
		require.Equal(t, CgroupV1, c.Version(), "a hybrid host is v1")
	}
	name := "jailtest-" + filepath.Base(t.TempDir())
	dirs, err := c.Create(name, Limits{CPUMillis: 1000, MemoryBytes: 64 << 20, PidsMax: 16})
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Remove(name) })
	t.Cleanup(func() {
		for _, d := range dirs {
			_ = os.Remove(filepath.Dir(d)) // the test's parent, once empty
		}
	})
	// Busy first, so that there is CPU time to measure once it is in.
	cmd := exec.Command("sh", "-c", "sleep 0.2; i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 60")
	require.NoError(t, cmd.Start())
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	for _, d := range dirs {
		require.NoError(t, os.WriteFile(filepath.Join(d, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644))
	}
	pids, err := c.Procs(name)
	require.NoError(t, err)
	require.Contains(t, pids, cmd.Process.Pid)
	require.Eventually(t, func() bool {
		u, err := c.Usage(name)
		require.NoError(t, err)
		return u.CPUNanos > 0
	}, 10*time.Second, 50*time.Millisecond, "the cgroup's CPU usage grows")
	cg, err := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/cgroup")
	require.NoError(t, err)
	require.Contains(t, string(cg), c.Path(name))

	require.NoError(t, c.Remove(name), "Remove kills what is left")
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the process in the removed cgroup still runs")
	}
	for _, d := range dirs {
		require.NoDirExists(t, d)
	}
}

// TestHostCgroupVersion: auto is v2 only where the root is a v2 mount; a
// hybrid host (v1 controllers, v2 at unified/) is v1.
func TestHostCgroupVersion(t *testing.T) {
	hybrid := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(hybrid, "unified"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(hybrid, "unified", "cgroup.controllers"), nil, 0o644))
	require.Equal(t, CgroupV1, HostCgroupVersion(hybrid))
	v2 := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(v2, "cgroup.controllers"), []byte("cpu memory pids\n"), 0o644))
	require.Equal(t, CgroupV2, HostCgroupVersion(v2))
}
