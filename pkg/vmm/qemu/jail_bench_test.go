package qemu_test

import (
	"context"
	"io"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

// BenchmarkJailColdStart measures cold create + boot + first exec of
// `true` with confinement on and off, interleaved in one run (on, off, off,
// on, ...) so that both see the same host load, and reports each median and
// their ratio (docs/benchmarks.md; the goal is at most 3%).
//
//	go test ./pkg/vmm/qemu -run '^$' -bench BenchmarkJailColdStart -benchtime 8x
func BenchmarkJailColdStart(b *testing.B) {
	requireHost(b)
	img := testenv.GuestImage(b)
	off := false
	mk := func(jailed bool) *qemu.Orchestrator {
		cfg := qemu.Config{KernelPath: img.KernelPath(), InitrdPath: img.InitrdPath(), RootfsPath: img.RootfsPath(),
			RunDir: runDir(b), Jail: jailConfig(b), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
		if !jailed {
			cfg.Jail.Enabled = &off
		}
		o, err := qemu.New(context.Background(), cfg)
		require.NoError(b, err)
		b.Cleanup(func() { deleteAll(b, o); o.Close() })
		return o
	}
	on, plain := mk(true), mk(false)
	cold := func(o *qemu.Orchestrator) time.Duration {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		sp := vmmtest.NewSpec(b)
		sp.VCPUs, sp.MemoryMB = 1, 256
		start := time.Now()
		_, err := o.CreateVM(ctx, sp)
		require.NoError(b, err)
		require.NoError(b, o.StartVM(ctx, sp.ID))
		res, err := o.ExecuteCommand(ctx, sp.ID, types.Command{Cmd: "true"}, vmm.ExecIO{})
		require.NoError(b, err)
		require.Equal(b, 0, res.ExitCode)
		d := time.Since(start)
		require.NoError(b, o.DeleteVM(ctx, sp.ID))
		return d
	}
	var ons, offs []time.Duration
	i := 0
	for b.Loop() {
		if i%2 == 0 {
			ons, offs = append(ons, cold(on)), append(offs, cold(plain))
		} else {
			offs, ons = append(offs, cold(plain)), append(ons, cold(on))
		}
		i++
	}
	med := func(d []time.Duration) float64 {
		slices.Sort(d)
		return float64(d[len(d)/2].Microseconds()) / 1000
	}
	mOn, mOff := med(ons), med(offs)
	b.ReportMetric(mOn, "jail-on-median-ms")
	b.ReportMetric(mOff, "jail-off-median-ms")
	b.ReportMetric((mOn/mOff-1)*100, "overhead-%")
}

// BenchmarkJailExec measures the round trip of `exec true` on a running VM
// with confinement on and off, alternating between one VM of each kind so
// that both see the same host load, and reports the medians and their
// ratio (docs/benchmarks.md; the goal is at most 3%).
//
//	go test ./pkg/vmm/qemu -run '^$' -bench BenchmarkJailExec -benchtime 200x
func BenchmarkJailExec(b *testing.B) {
	requireHost(b)
	img := testenv.GuestImage(b)
	off := false
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	boot := func(jailed bool) (*qemu.Orchestrator, string) {
		cfg := qemu.Config{KernelPath: img.KernelPath(), InitrdPath: img.InitrdPath(), RootfsPath: img.RootfsPath(),
			RunDir: runDir(b), Jail: jailConfig(b), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
		if !jailed {
			cfg.Jail.Enabled = &off
		}
		o, err := qemu.New(ctx, cfg)
		require.NoError(b, err)
		b.Cleanup(func() { deleteAll(b, o); o.Close() })
		sp := vmmtest.NewSpec(b)
		sp.VCPUs, sp.MemoryMB = 1, 256
		_, err = o.CreateVM(ctx, sp)
		require.NoError(b, err)
		require.NoError(b, o.StartVM(ctx, sp.ID))
		return o, sp.ID
	}
	on, onID := boot(true)
	plain, plainID := boot(false)
	exec := func(o *qemu.Orchestrator, id string) time.Duration {
		start := time.Now()
		res, err := o.ExecuteCommand(ctx, id, types.Command{Cmd: "true"}, vmm.ExecIO{})
		require.NoError(b, err)
		require.Equal(b, 0, res.ExitCode)
		return time.Since(start)
	}
	for range 5 { // warm both agents' connections
		exec(on, onID)
		exec(plain, plainID)
	}
	var ons, offs []time.Duration
	for b.Loop() {
		ons, offs = append(ons, exec(on, onID)), append(offs, exec(plain, plainID))
	}
	med := func(d []time.Duration) float64 {
		slices.Sort(d)
		return float64(d[len(d)/2].Microseconds()) / 1000
	}
	mOn, mOff := med(ons), med(offs)
	b.ReportMetric(mOn, "jail-on-median-ms")
	b.ReportMetric(mOff, "jail-off-median-ms")
	b.ReportMetric((mOn/mOff-1)*100, "overhead-%")
}
