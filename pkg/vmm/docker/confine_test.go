package docker_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/docker"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

// capBits are the bits of the capabilities a test may expect.
var capBits = map[string]uint{
	"CAP_CHOWN":        unix.CAP_CHOWN,
	"CAP_DAC_OVERRIDE": unix.CAP_DAC_OVERRIDE,
	"CAP_FOWNER":       unix.CAP_FOWNER,
	"CAP_FSETID":       unix.CAP_FSETID,
	"CAP_KILL":         unix.CAP_KILL,
	"CAP_SETGID":       unix.CAP_SETGID,
	"CAP_SETUID":       unix.CAP_SETUID,
}

// keptMask is the capability set, as /proc/PID/status prints it, of a
// root process in a VM's container.
func keptMask(t *testing.T) string {
	var m uint64
	for _, c := range docker.KeptCapabilities {
		bit, ok := capBits[c]
		require.True(t, ok, "capability %s has no bit in capBits", c)
		m |= 1 << bit
	}
	return fmt.Sprintf("%016x", m)
}

// procStatus returns the fields of /proc/<pid>/status in VM id.
func procStatus(t *testing.T, o vmm.VMOrchestrator, id, pid string) map[string]string {
	out := vmmtest.Sh(t, o, id, "cat /proc/"+pid+"/status")
	f := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			f[k] = strings.TrimSpace(v)
		}
	}
	return f
}

// pidsFile is a script that prints the path of the container's pids
// cgroup file name, on cgroup v1 and v2.
func pidsFile(name string) string {
	return fmt.Sprintf("f=/sys/fs/cgroup/pids/%[1]s; [ -e $f ] || f=/sys/fs/cgroup/%[1]s; echo $f", name)
}

// TestConfinement: a VM's container keeps only the named capabilities,
// runs with no-new-privileges under the default seccomp profile and a pids
// limit, and has a read-only root with writable tmpfs and home
// directories, as the engine reports it and as the guest sees it.
func TestConfinement(t *testing.T) {
	t.Parallel()
	cfg := config(t)
	cfg.PidsLimit = 64
	o := newOrchestrator(t, cfg)
	id := vmmtest.StartVM(t, o, vmmtest.NewSpec(t))
	mask := keptMask(t)

	t.Run("Inspect", func(t *testing.T) {
		ins, err := o.Client().ContainerInspect(t.Context(), "aetherium-"+id)
		require.NoError(t, err)
		hc := ins.HostConfig
		require.Equal(t, []string{"ALL"}, []string(hc.CapDrop))
		require.ElementsMatch(t, docker.KeptCapabilities, []string(hc.CapAdd))
		require.Contains(t, hc.SecurityOpt, "no-new-privileges")
		for _, o := range hc.SecurityOpt {
			require.NotContains(t, o, "seccomp", "the default seccomp profile must apply")
		}
		require.NotNil(t, hc.PidsLimit)
		require.Equal(t, int64(64), *hc.PidsLimit)
		require.True(t, hc.ReadonlyRootfs)
	})

	t.Run("Agent", func(t *testing.T) {
		st := procStatus(t, o, id, "1")
		require.Equal(t, mask, st["CapEff"], "the agent's effective capabilities")
		require.Equal(t, mask, st["CapPrm"])
		require.Equal(t, mask, st["CapBnd"])
		require.Equal(t, "0000000000000000", st["CapAmb"])
		require.Equal(t, "1", st["NoNewPrivs"])
		require.Equal(t, "2", st["Seccomp"], "seccomp filter mode")
		require.Equal(t, "64\n", vmmtest.Sh(t, o, id, "cat $("+pidsFile("pids.max")+")"))
	})

	t.Run("RootFS", func(t *testing.T) {
		res := vmmtest.Exec(t, o, id, types.Command{Cmd: "sh", Args: []string{"-c", "echo x > /etc/x"}})
		require.NotEqual(t, 0, res.ExitCode)
		require.Contains(t, string(res.Stderr), "Read-only file system")
		_, err := o.WriteFile(t.Context(), id, "/usr/x", strings.NewReader("x"), types.FileOptions{})
		require.Error(t, err, "the agent writes into the read-only root")
		for _, d := range []string{"/tmp", "/var/tmp", "/run", "/root", "/home"} {
			vmmtest.Sh(t, o, id, "echo x > "+d+"/w && rm "+d+"/w")
		}
		// Programs run from the writable places, as on a VM.
		vmmtest.Sh(t, o, id, "printf '#!/bin/sh\\necho ran\\n' > /tmp/s.sh && chmod +x /tmp/s.sh")
		require.Equal(t, "ran\n", vmmtest.Sh(t, o, id, "/tmp/s.sh"))
	})

	// Every kept capability does what its comment says.
	t.Run("OtherUser", func(t *testing.T) {
		res := vmmtest.Exec(t, o, id, types.Command{Cmd: "sh", Args: []string{"-c", "id -u; id -g; grep CapEff /proc/self/status"}, User: "65534"})
		require.Equal(t, 0, res.ExitCode, "%s", res.Stderr)
		require.Equal(t, "65534\n65534\nCapEff:\t0000000000000000\n", string(res.Stdout), "SETUID and SETGID")

		_, err := o.WriteFile(t.Context(), id, "/home/nobody/f", strings.NewReader("x"), types.FileOptions{User: "65534", Mode: 0o600, MakeParents: true})
		require.NoError(t, err)
		require.Equal(t, "65534 65534 600\n", vmmtest.Sh(t, o, id, "stat -c '%u %g %a' /home/nobody/f"), "CHOWN")
		vmmtest.Sh(t, o, id, "chmod 700 /home/nobody && cat /home/nobody/f >/dev/null && echo y >> /home/nobody/f") // DAC_OVERRIDE
		vmmtest.Sh(t, o, id, "chmod 644 /home/nobody/f")                                                            // FOWNER

		// The agent kills a timed-out command of another user (KILL).
		start := time.Now()
		res, err = o.ExecuteCommand(t.Context(), id, types.Command{Cmd: "sleep", Args: []string{"30"}, User: "65534", Timeout: time.Second}, vmm.ExecIO{})
		require.NoError(t, err)
		require.True(t, res.TimedOut, "%+v", res)
		require.Less(t, time.Since(start), 10*time.Second)
		require.Eventually(t, func() bool {
			return vmmtest.Sh(t, o, id, "ps -o user,args | grep -c '^nobody.*sleep 30' || true") == "0\n"
		}, 5*time.Second, 100*time.Millisecond, "the timed-out command survived")
	})

	// A fork bomb ends at the pids limit and the VM recovers. Last: the
	// cgroup's counter of refused forks is checked.
	t.Run("ForkBomb", func(t *testing.T) {
		// Only builtins once the bomb went off: every fork fails then.
		script := "cur=$(" + pidsFile("pids.current") + "); ev=$(" + pidsFile("pids.events") + ")\n" +
			"( while :; do sleep 60 </dev/null >/dev/null 2>&1 & done ) 2>/dev/null\n" +
			"read n < $cur; read e < $ev; echo \"$n|$e\"\n"
		ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
		defer cancel()
		res, err := o.ExecuteCommand(ctx, id, types.Command{Cmd: "sh", Args: []string{"-c", script}, Timeout: 30 * time.Second}, vmm.ExecIO{})
		require.NoError(t, err)
		require.False(t, res.TimedOut, "the fork loop was not stopped by the pids limit")
		n, e, _ := strings.Cut(strings.TrimSpace(string(res.Stdout)), "|")
		cur, err := strconv.Atoi(n)
		require.NoError(t, err, "stdout %q stderr %q", res.Stdout, res.Stderr)
		require.LessOrEqual(t, cur, 64)
		require.Greater(t, cur, 32, "the bomb should have filled the limit")
		refused, err := strconv.Atoi(strings.TrimPrefix(e, "max "))
		require.NoError(t, err, "pids.events %q", e)
		require.Positive(t, refused)

		// The agent survives and runs commands again once the bomb's
		// processes are gone.
		require.Eventually(t, func() bool {
			res, err := o.ExecuteCommand(t.Context(), id, types.Command{Cmd: "sh", Args: []string{"-c", "pkill -f 'sleep 60'; echo alive"}}, vmm.ExecIO{})
			return err == nil && string(res.Stdout) == "alive\n"
		}, 20*time.Second, 200*time.Millisecond)
	})
}

// TestHomeSurvivesRestart: the home directories keep their files across a
// stop and start, as a VM's disk does, while /tmp is a fresh tmpfs; a
// deleted VM leaves no volume behind.
func TestHomeSurvivesRestart(t *testing.T) {
	t.Parallel()
	cfg := config(t)
	o := newOrchestrator(t, cfg)
	id := vmmtest.StartVM(t, o, vmmtest.NewSpec(t))
	vmmtest.Sh(t, o, id, "echo kept > /root/f && mkdir -p /home/user && echo kept > /home/user/f && echo gone > /tmp/f")
	require.NoError(t, o.StopVM(t.Context(), id, false))
	require.NoError(t, o.StartVM(t.Context(), id))
	require.Equal(t, "kept\nkept\n", vmmtest.Sh(t, o, id, "cat /root/f /home/user/f"))
	require.Equal(t, "no\n", vmmtest.Sh(t, o, id, "[ -e /tmp/f ] && echo yes || echo no"))

	ins, err := o.Client().ContainerInspect(t.Context(), "aetherium-"+id)
	require.NoError(t, err)
	var vols []string
	for _, m := range ins.Mounts {
		if m.Type == "volume" {
			vols = append(vols, m.Name)
		}
	}
	require.Len(t, vols, 2, "%+v", ins.Mounts)
	require.NoError(t, o.DeleteVM(t.Context(), id))
	for _, v := range vols {
		_, err := o.Client().VolumeInspect(t.Context(), v)
		require.Error(t, err, "volume %s outlived its VM", v)
	}
}

// TestPidsLimitInvalid: a pids limit the agent cannot live with is refused.
func TestPidsLimitInvalid(t *testing.T) {
	t.Parallel()
	cfg := config(t)
	cfg.PidsLimit = 5
	_, err := docker.New(t.Context(), cfg)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.Contains(t, err.Error(), "pids limit 5")
}
