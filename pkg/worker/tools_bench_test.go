package worker_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/tools/toolstest"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// BenchmarkCreateWithTools measures create-to-ready (CreateVMTask until
// its task succeeded: the agent answers) of docker VMs without tools and
// with a tool set already in the host cache (the tool and mise),
// alternating on one stack so the two see the same machine. Deleting each
// VM is left out of the timing. Reports medians, as docs/benchmarks.md
// quotes.
//
//	go test -run '^$' -bench BenchmarkCreateWithTools -benchtime 20x ./pkg/worker
func BenchmarkCreateWithTools(b *testing.B) {
	srv := toolstest.NewServer(b)
	s := stack.Start(b, stack.Options{Tools: newInstaller(b)})
	ctx := context.Background()
	n := 0
	create := func(specs []string) time.Duration {
		n++
		start := time.Now()
		id, err := s.Service.CreateVMTaskWithOptions(ctx, service.CreateVMOptions{Name: fmt.Sprintf("bench-%d", n), VCPUs: 1, MemoryMB: 256, Tools: specs})
		require.NoError(b, err)
		t, err := s.Service.WaitTask(ctx, id)
		require.NoError(b, err)
		require.Equal(b, types.TaskSucceeded, t.State, t.Error)
		took := time.Since(start)
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
	require.Equal(b, 1, srv.Requests(), "one download in all")
}
