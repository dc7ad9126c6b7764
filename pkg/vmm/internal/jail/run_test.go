package jail

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
)

// TestMain makes this test binary the jailer when the manager starts it
// with a jailer command line.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "--uid" {
		os.Exit(Main(os.Args[1:], os.Stderr))
	}
	os.Exit(m.Run())
}

func TestProgramAssembles(t *testing.T) {
	raw, err := Program()
	require.NoError(t, err)
	require.Greater(t, len(raw), len(deniedSyscalls), "one test per denied syscall at least")
	require.Less(t, len(raw), 4096, "BPF programs are limited to 4096 instructions")
}

// jailHost returns a manager whose jailer is this test binary, and a
// fresh VM-like directory layout: a root-owned dir with the jail's mount
// point and a read-write directory for the "VM".
func jailHost(t *testing.T) (*Manager, string) {
	t.Helper()
	if os.Geteuid() != 0 {
		testenv.Skip(t, "the jailer needs root; run the test as root")
	}
	self, err := os.Executable()
	require.NoError(t, err)
	m, err := New(Config{Binary: self, StateDir: t.TempDir(), CgroupParent: "aetherium-test"})
	require.NoError(t, err)
	dir, err := os.MkdirTemp("", "jt")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Mkdir(filepath.Join(dir, "root"), 0o700))
	require.NoError(t, os.Mkdir(filepath.Join(dir, "rw"), 0o700))
	return m, dir
}

func jailed(m *Manager, dir string, ids IDs, cgroups []string, argv ...string) (*exec.Cmd, *bytes.Buffer, error) {
	cmd, err := m.Command(Spec{UID: ids.UID, GID: ids.GID, Root: filepath.Join(dir, "root"),
		ReadOnly: []string{"/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache"}, ReadWrite: []string{filepath.Join(dir, "rw")},
		Devices: []string{"/dev/null"}, Cgroups: cgroups, Argv: argv})
	if err != nil {
		return nil, nil, err
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	return cmd, &out, nil
}

func TestJailConfinesProcess(t *testing.T) {
	m, dir := jailHost(t)
	ids, err := m.Leases().Acquire(dir)
	require.NoError(t, err)
	require.NoError(t, os.Chown(filepath.Join(dir, "rw"), ids.UID, ids.GID))
	name := "jt-" + filepath.Base(dir)
	cgs, err := m.Cgroups().Create(name, m.Limits(1, 64))
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = m.Cgroups().Remove(name)
		for _, d := range cgs {
			_ = os.Remove(filepath.Dir(d))
		}
	})

	cmd, out, err := jailed(m, dir, ids, cgs, "/usr/bin/sleep", "30")
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	pid := strconv.Itoa(cmd.Process.Pid)
	// The jailer exec()s the VMM: the pid started is the sleep's.
	require.Eventually(t, func() bool {
		b, _ := os.ReadFile("/proc/" + pid + "/cmdline")
		return strings.HasPrefix(string(b), "/usr/bin/sleep\x00")
	}, 5*time.Second, 10*time.Millisecond, "jailer output: %s", out)

	status, err := os.ReadFile("/proc/" + pid + "/status")
	require.NoError(t, err)
	for _, want := range []string{
		"Uid:\t" + strings.Repeat(strconv.Itoa(ids.UID)+"\t", 3) + strconv.Itoa(ids.UID),
		"Gid:\t" + strings.Repeat(strconv.Itoa(ids.GID)+"\t", 3) + strconv.Itoa(ids.GID),
		"Groups:\t \n", "NoNewPrivs:\t1", "Seccomp:\t2",
		"CapPrm:\t0000000000000000", "CapEff:\t0000000000000000", "CapBnd:\t0000000000000000", "CapAmb:\t0000000000000000",
	} {
		require.Contains(t, string(status), want)
	}
	// Its root is the jail: the tmpfs with only what was bound.
	ents, err := os.ReadDir("/proc/" + pid + "/root/")
	require.NoError(t, err)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	require.ElementsMatch(t, []string{"usr", "lib", "lib64", "bin", "etc", "dev", strings.Split(strings.TrimPrefix(dir, "/"), "/")[0]}, names)
	require.NoFileExists(t, "/proc/"+pid+"/root/etc/passwd")
	require.FileExists(t, "/proc/"+pid+"/root/etc/ld.so.cache")
	require.DirExists(t, "/proc/"+pid+"/root"+filepath.Join(dir, "rw"))
	// Its devices are its own nodes, not the host's.
	fi, err := os.Stat("/proc/" + pid + "/root/dev/null")
	require.NoError(t, err)
	require.Equal(t, os.ModeDevice|os.ModeCharDevice, fi.Mode().Type())
	require.EqualValues(t, ids.UID, fi.Sys().(*syscall.Stat_t).Uid)
	cg, err := os.ReadFile("/proc/" + pid + "/cgroup")
	require.NoError(t, err)
	require.Contains(t, string(cg), m.Cgroups().Path(name))
}

func TestJailDenies(t *testing.T) {
	m, dir := jailHost(t)
	ids, err := m.Leases().Acquire(dir)
	require.NoError(t, err)
	require.NoError(t, os.Chown(filepath.Join(dir, "rw"), ids.UID, ids.GID))
	run := func(argv ...string) (string, error) {
		cmd, out, err := jailed(m, dir, ids, nil, argv...)
		require.NoError(t, err)
		err = cmd.Run()
		return out.String(), err
	}
	out, err := run("/usr/bin/touch", filepath.Join(dir, "rw", "ok"))
	require.NoError(t, err, out)
	require.FileExists(t, filepath.Join(dir, "rw", "ok"))
	for _, tc := range []struct {
		argv []string
		want string
	}{
		{[]string{"/usr/bin/touch", "/usr/x"}, "Read-only file system"},
		{[]string{"/usr/bin/unshare", "-m", "/usr/bin/true"}, "Operation not permitted"},        // seccomp: unshare
		{[]string{"/usr/bin/sh", "-c", "/usr/bin/true"}, "fork"},                                // seccomp: clone without CLONE_THREAD
		{[]string{"/usr/bin/setpriv", "--reuid=0", "/usr/bin/true"}, "Operation not permitted"}, // seccomp and no capability
		{[]string{"/usr/bin/cat", "/proc/self/status"}, "No such file"},                         // no /proc
	} {
		out, err := run(tc.argv...)
		require.Error(t, err, "%v: %s", tc.argv, out)
		require.Contains(t, out, tc.want, "%v", tc.argv)
	}
	// The jailer's own errors reach stderr, with a non-zero exit.
	out, err = run("/nonexistent/vmm")
	require.Error(t, err)
	require.Contains(t, out, "aether-jailer: executing /nonexistent/vmm in the jail")
}
