package firecracker_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/vmm/firecracker"
	"github.com/aetherium/aetherium-core/pkg/vmm/firecracker/fcfake"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

// TestJailerCgroupLimits: every jailed VM's cgroup gets the qemu
// backend's limits through the jailer's --cgroup flags, named for the
// configured cgroup version. A VM of 2 vCPUs and 512 MiB gets a quota of
// 2 CPUs plus the 0.25 CPU overhead (jail.DefaultCPUOverheadMillis) per
// 100 ms period, 512 MiB plus the 384 MiB overhead
// (jail.DefaultMemoryOverheadMB) = 896 MiB, and 512 tasks
// (jail.DefaultPidsMax).
func TestJailerCgroupLimits(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		version int
		parent  string
		want    []string
	}{
		{"v2", 2, "", []string{"cpu.max=225000 100000", "memory.max=939524096", "pids.max=512"}},
		{"v1 under a parent", 1, "aetherium/firecracker", []string{
			"cpu.cfs_period_us=100000", "cpu.cfs_quota_us=225000", "memory.limit_in_bytes=939524096", "pids.max=512",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := jailedConfig(t)
			cfg.Jailer.CgroupVersion = tc.version
			cfg.Jailer.ParentCgroup = tc.parent
			cfg.MaxVCPUs, cfg.MaxMemoryMB = 4, 1024
			o := newOrchestrator(t, cfg)
			sp := vmmtest.NewSpec(t)
			sp.VCPUs, sp.MemoryMB = 2, 512
			id := vmmtest.StartVM(t, o, sp)

			var args fcfake.JailerArgs
			readJSON(t, filepath.Join(cfg.Jailer.ChrootBaseDir, "firecracker", id, fcfake.JailerArgsFile), &args)
			require.Equal(t, tc.want, args.Cgroups)
			require.Equal(t, []string{"--api-sock", "/api.sock"}, args.Extra)
			require.Equal(t, strconv.Itoa(tc.version), args.CgroupVersion)
			require.Equal(t, tc.parent, args.ParentCgroup)
		})
	}
}

// TestFakeJailerRejectsBadCgroups: the fake jailer refuses what
// Firecracker's jailer refuses (src/jailer/src/env.rs and cgroup.rs), so
// a malformed flag fails a test here rather than a VM start on a real
// host.
func TestFakeJailerRejectsBadCgroups(t *testing.T) {
	t.Parallel()
	cfg := jailedConfig(t)
	jailer := cfg.Jailer.Binary
	base := []string{"--id", "vm1", "--exec-file", cfg.Binary, "--uid", "910000", "--gid", "910000",
		"--chroot-base-dir", cfg.Jailer.ChrootBaseDir, "--cgroup-version", "2"}
	for _, tc := range []struct {
		extra []string
		msg   string
	}{
		{[]string{"--cgroup", "cpu.max"}, "invalid --cgroup"},
		{[]string{"--cgroup", "memory.max="}, "invalid --cgroup"},
		{[]string{"--cgroup", "memory.max=1=2"}, "invalid --cgroup"},
		{[]string{"--cgroup", "memory=1"}, "invalid --cgroup"},
		{[]string{"--cgroup", "cpu.max.x=1"}, "invalid --cgroup"},
		{[]string{"--cgroup", ".max=1"}, "invalid --cgroup"},
		{[]string{"--cgroup", "pids.max=512", "--cgroup", "cpu.max"}, "invalid --cgroup"},
		{[]string{"--parent-cgroup", "../escape"}, "invalid --parent-cgroup"},
		{[]string{"--parent-cgroup", "/abs"}, "invalid --parent-cgroup"},
		{[]string{"--cgroup-version", "3"}, "invalid --cgroup-version"},
	} {
		args := append(append(append([]string{}, base...), tc.extra...), "--", "--api-sock", "/api.sock")
		out, err := exec.Command(jailer, args...).CombinedOutput()
		require.Error(t, err, "%q must be refused", tc.extra)
		require.Contains(t, string(out), tc.msg, "%q", tc.extra)
	}
	require.NoDirExists(t, filepath.Join(cfg.Jailer.ChrootBaseDir, "firecracker", "vm1"), "nothing is built for a refused command line")
}

// TestDiagnoseCgroupVersion: doctor reports a configured cgroup version
// this host does not have, since the jailer would fail every start.
func TestDiagnoseCgroupVersion(t *testing.T) {
	t.Parallel()
	cfg := jailedConfig(t)
	cfg.Jailer.CgroupVersion = 1
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err != nil {
		cfg.Jailer.CgroupVersion = 2 // not a pure v2 host
	}
	for _, c := range firecracker.Diagnose(t.Context(), cfg) {
		if c.Name == "jailer cgroups" {
			t.Logf("%s: %s", c.Name, c.Detail)
			require.False(t, c.OK, "cgroup v%d is not this host's", cfg.Jailer.CgroupVersion)
			require.Contains(t, c.Fix, "vmm.firecracker.jailer.cgroup_version")
			return
		}
	}
	t.Fatal("no jailer cgroups check")
}
