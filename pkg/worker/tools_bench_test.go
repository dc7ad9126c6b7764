package worker_test

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/tools/toolstest"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// BenchmarkCreateWithTools measures create-to-ready (CreateVMTask until
// its task succeeded: the agent answers) of VMs without tools and with a
// tool set already in the host cache (the tool and mise), alternating on
// one stack so the two see the same machine. Deleting each VM is left out
// of the timing. Reports medians, as docs/benchmarks.md quotes, and the
// disk a VM's own directory takes with the tool set over without it (the
// tools are shared read-only, so ~0). The backend is docker, or
// AETHERIUM_BENCH_PROVIDER (qemu).
//
//	go test -run '^$' -bench BenchmarkCreateWithTools -benchtime 20x ./pkg/worker
//	AETHERIUM_BENCH_PROVIDER=qemu go test -run '^$' -bench BenchmarkCreateWithTools -benchtime 8x ./pkg/worker
func BenchmarkCreateWithTools(b *testing.B) {
	srv := toolstest.NewServer(b)
	s := stack.Start(b, stack.Options{Provider: os.Getenv("AETHERIUM_BENCH_PROVIDER"), Tools: newInstaller(b)})
	ctx := context.Background()
	n := 0
	var diskNone, diskWith []int64
	create := func(specs []string) time.Duration {
		n++
		start := time.Now()
		id, err := s.Service.CreateVMTaskWithOptions(ctx, service.CreateVMOptions{Name: fmt.Sprintf("bench-%d", n), VCPUs: 1, MemoryMB: 256, Tools: specs})
		require.NoError(b, err)
		t, err := s.Service.WaitTask(ctx, id)
		require.NoError(b, err)
		require.Equal(b, types.TaskSucceeded, t.State, t.Error)
		took := time.Since(start)
		if s.Provider != "docker" {
			// What the VM's own directory holds on disk (its overlay,
			// logs, sockets): allocated blocks, not apparent sizes.
			used := diskUsed(b, filepath.Join(s.SocketDirs["w1"], id.String()))
			if specs == nil {
				diskNone = append(diskNone, used)
			} else {
				diskWith = append(diskWith, used)
			}
		}
		did, err := s.Service.DeleteVMTask(ctx, id.String())
		require.NoError(b, err)
		_, err = s.Service.WaitTask(ctx, did)
		require.NoError(b, err)
		return took
	}
	cached := []string{srv.Spec("1.0.0")}
	first := create(cached) // fills the cache
	var none, with []time.Duration
	for b.Loop() {
		none = append(none, create(nil))
		with = append(with, create(cached))
	}
	median := func(d []time.Duration) float64 {
		slices.Sort(d)
		return float64(d[len(d)/2].Microseconds()) / 1000
	}
	b.ReportMetric(median(none), "none-median-ms")
	b.ReportMetric(median(with), "cached-median-ms")
	b.ReportMetric(float64(first.Microseconds())/1000, "first-install-ms")
	b.ReportMetric((median(with)/median(none)-1)*100, "cached-vs-none-%")
	if len(diskWith) > 0 {
		mid := func(v []int64) int64 { slices.Sort(v); return v[len(v)/2] }
		b.ReportMetric(float64(mid(diskWith)-mid(diskNone))/1024, "extra-disk-per-vm-KiB")
	}
	require.Equal(b, 1, srv.Requests(), "one download in all")
}

// diskUsed sums the blocks allocated to the files under dir.
func diskUsed(b *testing.B, dir string) int64 {
	var total int64
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st syscall.Stat_t
		if err := syscall.Lstat(path, &st); err != nil {
			return err
		}
		total += st.Blocks * 512
		return nil
	})
	require.NoError(b, err)
	return total
}
