package qemu_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

const initMarker = testenv.RawBootMarker

// rawBoot is testenv.RawQEMUBoot with this backend's binary and clock
// arguments: the baseline of the boot figures.
func rawBoot(b *testing.B, kernel, initrd, accel string) time.Duration {
	return testenv.RawQEMUBoot(b, qemu.DefaultBinary, kernel, initrd, accel, qemu.ClockArgs(accel)...)
}

// waitFor polls until cond holds and returns when it first did.
func waitFor(ctx context.Context, cond func() bool) time.Time {
	for ctx.Err() == nil {
		if cond() {
			return time.Now()
		}
		time.Sleep(time.Millisecond)
	}
	return time.Time{}
}

// BenchmarkBootVsRaw measures, alternating in one run, a raw QEMU boot of
// the same kernel and initramfs to /init, and the backend's create-to-ready
// (CreateVM + StartVM until the agent answers) split into create+spawn
// (until QEMU's monitor socket exists), boot (until /init's first line
// reaches the console log) and agent (until the agent answers).
func BenchmarkBootVsRaw(b *testing.B) {
	o := newOrchestrator(b, runDir(b))
	img := testenv.GuestImage(b)
	accel := o.Accel().Name
	var raw, total, spawn, boot, ready []time.Duration
	for b.Loop() {
		raw = append(raw, rawBoot(b, img.KernelPath(), img.InitrdPath(), accel))

		sp := vmmtest.NewSpec(b)
		sp.VCPUs, sp.MemoryMB = 1, 256
		dir := o.RunDir(sp.ID)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		marks := make(chan [2]time.Time, 1)
		go func() {
			qmp := waitFor(ctx, func() bool { _, err := os.Stat(filepath.Join(dir, "run", "qmp.sock")); return err == nil })
			mark := waitFor(ctx, func() bool {
				c, _ := os.ReadFile(filepath.Join(dir, "console.log"))
				return bytes.Contains(c, []byte(initMarker))
			})
			marks <- [2]time.Time{qmp, mark}
		}()
		start := time.Now()
		_, err := o.CreateVM(ctx, sp)
		require.NoError(b, err)
		require.NoError(b, o.StartVM(ctx, sp.ID))
		end := time.Now()
		m := <-marks
		cancel()
		total = append(total, end.Sub(start))
		spawn = append(spawn, m[0].Sub(start))
		boot = append(boot, m[1].Sub(m[0]))
		ready = append(ready, end.Sub(m[1]))
		require.NoError(b, o.DeleteVM(context.Background(), sp.ID))
	}
	med := func(d []time.Duration) float64 {
		slices.Sort(d)
		return float64(d[len(d)/2].Microseconds()) / 1000
	}
	r, t := med(raw), med(total)
	b.ReportMetric(r, "raw-boot-median-ms")
	b.ReportMetric(t, "create-to-ready-median-ms")
	b.ReportMetric(med(spawn), "create+spawn-median-ms")
	b.ReportMetric(med(boot), "boot-median-ms")
	b.ReportMetric(med(ready), "agent-ready-median-ms")
	b.ReportMetric((t/r-1)*100, "overhead-%")
}

// BenchmarkExecTrue is the exec round trip over the serial channel: ExecuteCommand
// of `true` on a running VM, and for scale the agent's Info RPC, the same
// path without a process in the guest.
func BenchmarkExecTrue(b *testing.B) {
	o := newOrchestrator(b, runDir(b))
	b.Cleanup(func() { deleteAll(b, o) })
	id := vmmtest.StartVM(b, o, vmmtest.NewSpec(b))
	ctx := context.Background()
	b.Run("exec-true", func(b *testing.B) {
		testenv.Measure(b, func() {
			res, err := o.ExecuteCommand(ctx, id, types.Command{Cmd: "true"}, vmm.ExecIO{})
			if err != nil || res.ExitCode != 0 {
				b.Fatalf("exec: %v %+v", err, res)
			}
		})
	})
	b.Run("info-rpc", func(b *testing.B) {
		c, err := o.Agent(id)
		require.NoError(b, err)
		testenv.Measure(b, func() {
			if _, err := c.Info(ctx); err != nil {
				b.Fatal(err)
			}
		})
	})
}

// BenchmarkIdleMemory reports the resident memory of an idle VM's host
// process, QEMU, 3 s after the agent answered.
func BenchmarkIdleMemory(b *testing.B) {
	o := newOrchestrator(b, runDir(b))
	b.Cleanup(func() { deleteAll(b, o) })
	var rss []float64
	for b.Loop() {
		sp := vmmtest.NewSpec(b)
		sp.VCPUs, sp.MemoryMB = 1, 256
		id := vmmtest.StartVM(b, o, sp)
		time.Sleep(3 * time.Second)
		kb := 0
		for _, f := range []string{"qemu.pid"} {
			pb, err := os.ReadFile(filepath.Join(o.RunDir(id), f))
			require.NoError(b, err)
			kb += vmRSS(b, strings.TrimSpace(string(pb)))
		}
		rss = append(rss, float64(kb)/1024)
		require.NoError(b, o.DeleteVM(context.Background(), id))
	}
	slices.Sort(rss)
	b.ReportMetric(rss[len(rss)/2], "rss-median-MiB")
}

func vmRSS(b *testing.B, pid string) int {
	st, err := os.ReadFile("/proc/" + pid + "/status")
	require.NoError(b, err)
	for _, l := range strings.Split(string(st), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, err := strconv.Atoi(strings.Fields(v)[0])
			require.NoError(b, err)
			return n
		}
	}
	b.Fatalf("no VmRSS for pid %s", pid)
	return 0
}
