package qemu_test

import (
	"encoding/json"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/jail"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

// statusField returns a field of /proc/PID/status.
func statusField(t testing.TB, pid int, field string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	require.NoError(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return ""
}

func pidOf(t testing.TB, o *qemu.Orchestrator, id, file string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(o.RunDir(id), file))
	require.NoError(t, err)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	require.NoError(t, err)
	return pid
}

// cgroupFile is a control file of the cgroup a controller's hierarchy
// (v1) or the unified one (v2) holds cg in.
func cgroupFile(cg, controller, file string) string {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return filepath.Join("/sys/fs/cgroup", cg, file)
	}
	return filepath.Join("/sys/fs/cgroup", controller, cg, file)
}

func readTrim(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return strings.TrimSpace(string(b))
}

// TestJailConfinesVMMs: each VM's QEMU runs under the
// VM's own non-zero uid, behind seccomp with no_new_privs and no
// capabilities, in a jail root holding only what they need, in the VM's
// cgroup with its limits; a guest spinning every vCPU stays within its
// quota; one VM's uid cannot reach another's disk or sockets; and delete
// leaves no cgroup, lease, uid-owned file or process.
func TestJailConfinesVMMs(t *testing.T) {
	dir := runDir(t)
	o := newOrchestrator(t, dir)
	t.Cleanup(func() { deleteAll(t, o) })
	ctx := t.Context()

	sp1 := vmmtest.NewSpec(t)
	sp1.VCPUs, sp1.MemoryMB = 1, 256
	sp2 := vmmtest.NewSpec(t)
	sp2.VCPUs, sp2.MemoryMB = 2, 256
	ids := []string{vmmtest.StartVM(t, o, sp1), vmmtest.StartVM(t, o, sp2)}
	specs := map[string]int{ids[0]: sp1.VCPUs, ids[1]: sp2.VCPUs}

	jails := map[string]*vmm.JailInfo{}
	for _, id := range ids {
		st, err := o.GetVMStatus(ctx, id)
		require.NoError(t, err)
		require.NotNil(t, st.Jail, "a confined VM reports its jail")
		require.NotZero(t, st.Jail.UID)
		require.Equal(t, "/"+jail.DefaultCgroupParent+"/"+id, st.Jail.Cgroup)
		jails[id] = st.Jail
		for _, f := range []string{"qemu.pid"} {
			pid := pidOf(t, o, id, f)
			uid := strconv.Itoa(st.Jail.UID)
			require.Equal(t, strings.Join([]string{uid, uid, uid, uid}, "\t"), statusField(t, pid, "Uid"), f)
			require.Equal(t, "2", statusField(t, pid, "Seccomp"), f)
			require.Equal(t, "1", statusField(t, pid, "NoNewPrivs"), f)
			require.Equal(t, "0000000000000000", statusField(t, pid, "CapEff"), f)
			require.Equal(t, "0000000000000000", statusField(t, pid, "CapBnd"), f)
			// Neither VM has a TAP: both VMMs are in a network namespace
			// of their own, not the host's.
			hostNet, err := os.Readlink("/proc/self/ns/net")
			require.NoError(t, err)
			vmmNet, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/ns/net")
			require.NoError(t, err)
			require.NotEqual(t, hostNet, vmmNet, "%s of %s is in the host's network namespace", f, id)
			root := "/proc/" + strconv.Itoa(pid) + "/root"
			// The jail is a tmpfs holding the VMM's libraries, the guest
			// image and the VM's own directory: not the host's root.
			for _, absent := range []string{"/etc/passwd", "/etc/shadow", "/home", "/root", "/proc", "/sys", "/var/lib/aetherium/jail"} {
				_, err := os.Lstat(root + absent)
				require.ErrorIs(t, err, fs.ErrNotExist, "%s of %s sees %s", f, id, absent)
			}
			require.DirExists(t, root+o.RunDir(id))
			for _, other := range ids {
				if other != id {
					require.NoDirExists(t, root+o.RunDir(other), "%s of %s sees another VM", f, id)
				}
			}
			cg := readTrim(t, "/proc/"+strconv.Itoa(pid)+"/cgroup")
			require.Contains(t, cg, st.Jail.Cgroup, f)
		}
		require.Equal(t, strconv.Itoa((specs[id]*1000+jail.DefaultCPUOverheadMillis)*100), cgLimit(t, st.Jail.Cgroup, "cpu"), "vCPUs plus the VMM's share")
		require.Equal(t, strconv.Itoa((256+jail.DefaultMemoryOverheadMB)<<20), cgLimit(t, st.Jail.Cgroup, "memory"))
		require.Equal(t, strconv.Itoa(jail.DefaultPidsMax), cgLimit(t, st.Jail.Cgroup, "pids"))
	}
	require.NotEqual(t, jails[ids[0]].UID, jails[ids[1]].UID, "two VMs share a uid")

	// One VM's uid cannot open the other's disk or sockets, though it can
	// open its own (so the parents are traversable and the check can fail).
	require.NoError(t, os.Chmod(dir, 0o755))
	asUID := func(ji *vmm.JailInfo, argv ...string) error {
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(ji.UID), Gid: uint32(ji.GID)}}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Logf("as uid %d: %v: %s", ji.UID, argv, out)
		}
		return err
	}
	mine, theirs := o.RunDir(ids[0]), o.RunDir(ids[1])
	require.NoError(t, asUID(jails[ids[0]], "/usr/bin/head", "-c1", filepath.Join(mine, "overlay.qcow2")))
	require.NoError(t, asUID(jails[ids[0]], "/usr/bin/ls", filepath.Join(mine, "run")))
	require.Error(t, asUID(jails[ids[0]], "/usr/bin/head", "-c1", filepath.Join(theirs, "overlay.qcow2")))
	require.Error(t, asUID(jails[ids[0]], "/usr/bin/ls", filepath.Join(theirs, "run")))
	require.Error(t, asUID(jails[ids[0]], "/usr/bin/head", "-c1", filepath.Join(mine, "vm.json")), "vm.json is root's")

	// The VM's uid owns run/, so it can swap its agent socket for a link
	// to another VM's; the root worker must then refuse to dial, not reach
	// the other VM's agent.
	// The channel's session is made afresh, so the dial goes to the socket.
	o.ResetChannel(ids[0])
	sock := filepath.Join(mine, "run", "agent.sock")
	require.NoError(t, os.Rename(sock, sock+".real"))
	require.NoError(t, os.Symlink(filepath.Join(theirs, "run", "agent.sock"), sock))
	_, err := o.DialAgent(ctx, ids[0])
	require.ErrorContains(t, err, "agent.sock", "the worker followed a swapped socket")
	require.NoError(t, os.Remove(sock))
	require.NoError(t, os.Rename(sock+".real", sock))
	conn, err := o.DialAgent(ctx, ids[0])
	require.NoError(t, err, "the VM's own socket works again")
	conn.Close()

	// The kernel holds the VM to its cgroup's CPU quota: with the quota
	// lowered to half a CPU (the configured one, a vCPU and a quarter, is
	// more than a 1-vCPU TCG guest can use on this small host, so it would
	// not show), a guest spinning its vCPU is throttled and stays near
	// half a CPU. Without the VMM in its cgroup, or the cgroup not
	// enforced, it would use a whole CPU.
	id := ids[0]
	cg := jails[id].Cgroup
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		require.NoError(t, os.WriteFile(cgroupFile(cg, "cpu", "cpu.max"), []byte("50000 100000"), 0o644))
	} else {
		require.NoError(t, os.WriteFile(cgroupFile(cg, "cpu", "cpu.cfs_quota_us"), []byte("50000"), 0o644))
	}
	vmmtest.Sh(t, o, id, "yes >/dev/null 2>&1 & echo started")
	time.Sleep(time.Second) // the spinner reaches full speed
	before, err := o.Usage(ctx, id)
	require.NoError(t, err)
	throttledBefore := throttled(t, cg)
	start := time.Now()
	time.Sleep(4 * time.Second)
	after, err := o.Usage(ctx, id)
	require.NoError(t, err)
	cpus := float64(after.CPUNanos-before.CPUNanos) / float64(time.Since(start).Nanoseconds())
	t.Logf("vm spinning under a 0.5-CPU quota used %.2f CPUs, memory %d MiB, throttled in %d periods", cpus, after.MemoryBytes>>20, throttled(t, cg)-throttledBefore)
	require.LessOrEqual(t, cpus, 0.6, "over its CPU quota")
	require.Greater(t, cpus, 0.1, "the VM did not spin at all: the measurement is void")
	require.Greater(t, throttled(t, cg), throttledBefore, "the quota never throttled the spinning VM")
	require.NotZero(t, after.MemoryBytes)

	// Delete leaves nothing of either VM: no cgroup, lease, process or
	// file of its uid.
	for _, id := range ids {
		require.NoError(t, o.DeleteVM(ctx, id))
		ji := jails[id]
		require.NoDirExists(t, cgroupFile(ji.Cgroup, "cpu", ""))
		require.NoDirExists(t, cgroupFile(ji.Cgroup, "memory", ""))
		requireNoLease(t, ji.UID, o.RunDir(id))
		requireNothingOwned(t, dir, ji.UID)
	}
	_, err = o.Usage(ctx, ids[0])
	require.Error(t, err)
}

// TestJailReconcile: a VM whose worker died and whose directory was then
// removed leaves a cgroup and a uid lease, which the next orchestrator's
// reconcile removes.
func TestJailReconcile(t *testing.T) {
	dir := runDir(t)
	o1 := newOrchestrator(t, dir)
	id := vmmtest.StartVM(t, o1, vmmtest.NewSpec(t))
	st, err := o1.GetVMStatus(t.Context(), id)
	require.NoError(t, err)
	require.NotNil(t, st.Jail)
	require.NoError(t, o1.Close())
	for _, f := range []string{"qemu.pid"} {
		pid := pidOf(t, o1, id, f)
		require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
		waitGone(t, pid)
	}
	require.DirExists(t, cgroupFile(st.Jail.Cgroup, "cpu", ""), "the dead VM's cgroup is left")
	require.NoError(t, os.RemoveAll(o1.RunDir(id)))

	o2 := newOrchestrator(t, dir) // New reconciles
	t.Cleanup(func() { deleteAll(t, o2) })
	require.NoDirExists(t, cgroupFile(st.Jail.Cgroup, "cpu", ""))
	require.NoDirExists(t, cgroupFile(st.Jail.Cgroup, "memory", ""))
	requireNoLease(t, st.Jail.UID, o1.RunDir(id))
	require.NoError(t, o2.Reconcile(t.Context()), "reconcile is idempotent")
}

func cgLimit(t testing.TB, cg, controller string) string {
	v2 := func() bool { _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); return err == nil }()
	files := map[string][2]string{"cpu": {"cpu.cfs_quota_us", "cpu.max"}, "memory": {"memory.limit_in_bytes", "memory.max"}, "pids": {"pids.max", "pids.max"}}
	if v2 {
		v, _, _ := strings.Cut(readTrim(t, cgroupFile(cg, controller, files[controller][1])), " ")
		return v
	}
	return readTrim(t, cgroupFile(cg, controller, files[controller][0]))
}

func throttled(t testing.TB, cg string) int {
	for _, line := range strings.Split(readTrim(t, cgroupFile(cg, "cpu", "cpu.stat")), "\n") {
		if v, ok := strings.CutPrefix(line, "nr_throttled "); ok {
			n, _ := strconv.Atoi(v)
			return n
		}
	}
	return 0
}

func requireNoLease(t testing.TB, uid int, holder string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(jail.DefaultStateDir, "uids", strconv.Itoa(uid)))
	if err == nil {
		require.NotEqual(t, holder, string(b), "uid %d is still leased to the deleted VM", uid)
	}
}

// requireNothingOwned checks that no file under dir and no process belongs
// to uid.
func requireNothingOwned(t testing.TB, dir string, uid int) {
	t.Helper()
	require.NoError(t, filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err == nil && fi.Sys().(*syscall.Stat_t).Uid == uint32(uid) {
			t.Errorf("%s is still owned by uid %d", p, uid)
		}
		return nil
	}))
	procs, _ := filepath.Glob("/proc/[0-9]*/status")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && strings.Contains(string(b), "\nUid:\t"+strconv.Itoa(uid)+"\t") {
			t.Errorf("a process of uid %d still runs: %s", uid, p)
		}
	}
}

// TestToolDisks: a VM made with tool volumes gets each image as a
// read-only disk (bind-mounted into the jail), mounted by the guest at its
// Dir, and the root disk stays the root.
func TestToolDisks(t *testing.T) {
	o := newOrchestrator(t, runDir(t))
	t.Cleanup(func() { deleteAll(t, o) })
	const root = "/opt/aet-tools"
	vol := types.ToolVolume{Key: "hello-1.0.0-test", Spec: "hello@1.0.0", Dir: root + "/hello-1.0.0-test", BinPaths: []string{root + "/hello-1.0.0-test/bin"}}
	src := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(src, "bin"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(src, "bin", "hello"), []byte("#!/bin/sh\necho hello from a tool disk\n"), 0o755))
	marker, err := json.Marshal(vol)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(src, types.ToolMarkerFile), marker, 0o644))
	img := filepath.Join(t.TempDir(), "hello.ext4")
	out, err := exec.Command("mkfs.ext4", "-q", "-d", src, img, "8M").CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.NoError(t, os.Chmod(img, 0o644))
	vol.Image = img

	sp := vmmtest.NewSpec(t)
	sp.Tools = &types.ToolSet{Root: root, Volumes: []types.ToolVolume{vol}}
	id := vmmtest.StartVM(t, o, sp)
	mounts := vmmtest.Sh(t, o, id, "cat /proc/mounts")
	// The guest's PATH handling is the agent's (tested there); the disk
	// and its mount are this backend's.
	require.Equal(t, "hello from a tool disk\n", vmmtest.Sh(t, o, id, vol.BinPaths[0]+"/hello"), mounts)
	require.Equal(t, "hello from a tool disk\n", vmmtest.Sh(t, o, id, "hello"), "the tool runs by name: the agent puts its bin dir on PATH")
	require.Regexp(t, vol.Dir+` ext4 ro[,\s]`, mounts)
	require.Contains(t, vmmtest.Sh(t, o, id, "touch "+vol.Dir+"/x 2>&1; echo rc=$?"), "Read-only")
	require.Contains(t, vmmtest.Sh(t, o, id, "df / | tail -1"), "/dev/vda", "the root is still the root disk")
}
