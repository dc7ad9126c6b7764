package qemu_test

import (
	"context"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

// BenchmarkSnapshotOps times the Snapshotter's operations on a 512 MiB VM
// with about 150 MiB of its memory touched (random bytes in /dev/shm, so
// the saved state cannot shrink them away): pause, resume of a paused VM,
// suspend, resume of a suspended one (until its agent answers), snapshot,
// and a clone's create+start+first exec side by side with a cold VM's in
// the same run. Run it with
//
//	go test ./pkg/vmm/qemu -run '^$' -bench SnapshotOps -benchtime 3x
func BenchmarkSnapshotOps(b *testing.B) {
	o := newOrchestrator(b, runDir(b))
	b.Cleanup(func() { deleteAll(b, o) })
	ctx := context.Background()
	spec := func() types.VMSpec {
		sp := vmmtest.NewSpec(b)
		sp.VCPUs, sp.MemoryMB = 1, 512
		return sp
	}
	firstExec := func(id string) {
		res, err := o.ExecuteCommand(ctx, id, types.Command{Cmd: "true"}, vmm.ExecIO{})
		require.NoError(b, err)
		require.Equal(b, 0, res.ExitCode)
	}
	times := map[string][]time.Duration{}
	timed := func(name string, fn func() error) {
		start := time.Now()
		require.NoError(b, fn(), name)
		times[name] = append(times[name], time.Since(start))
	}
	var stateMiB []float64
	for b.Loop() {
		id := vmmtest.StartVM(b, o, spec())
		vmmtest.Sh(b, o, id, "dd if=/dev/urandom of=/dev/shm/fill bs=1M count=150 2>/dev/null && echo ok")
		timed("pause", func() error { return o.Pause(ctx, id) })
		timed("resume-paused", func() error { return o.Resume(ctx, id) })
		timed("suspend", func() error { return o.Suspend(ctx, id) })
		if fi, err := os.Stat(o.RunDir(id) + "/state"); err == nil {
			stateMiB = append(stateMiB, float64(fi.Size())/(1<<20))
		}
		timed("resume-suspended", func() error { return o.Resume(ctx, id) })
		dir := b.TempDir()
		timed("snapshot", func() error { _, err := o.Snapshot(ctx, id, dir); return err })

		cl := spec()
		cl.FromSnapshot = dir
		timed("clone-start-exec", func() error {
			if _, err := o.CreateVM(ctx, cl); err != nil {
				return err
			}
			if err := o.StartVM(ctx, cl.ID); err != nil {
				return err
			}
			firstExec(cl.ID)
			return nil
		})
		cold := spec()
		timed("cold-start-exec", func() error {
			if _, err := o.CreateVM(ctx, cold); err != nil {
				return err
			}
			if err := o.StartVM(ctx, cold.ID); err != nil {
				return err
			}
			firstExec(cold.ID)
			return nil
		})
		for _, v := range []string{cl.ID, cold.ID, id} {
			require.NoError(b, o.DeleteVM(ctx, v))
		}
	}
	med := func(d []time.Duration) float64 {
		slices.Sort(d)
		return float64(d[len(d)/2].Microseconds()) / 1000
	}
	for name, d := range times {
		b.ReportMetric(med(d), name+"-median-ms")
	}
	b.ReportMetric(med(times["clone-start-exec"])/med(times["cold-start-exec"]), "clone/cold")
	if len(stateMiB) > 0 {
		slices.Sort(stateMiB)
		b.ReportMetric(stateMiB[len(stateMiB)/2], "state-MiB")
	}
}
