package testenv

import (
	"slices"
	"testing"
	"time"
)

// Measure runs op for every benchmark iteration, timing each call, and
// reports the median, p90 and p99 besides Go's mean: these machines are
// noisy, so medians are what docs/benchmarks.md quotes.
func Measure(b *testing.B, op func()) {
	durs := make([]time.Duration, 0, b.N)
	for b.Loop() {
		start := time.Now()
		op()
		durs = append(durs, time.Since(start))
	}
	if len(durs) == 0 {
		return
	}
	slices.Sort(durs)
	pct := func(p float64) float64 {
		return float64(durs[int(float64(len(durs)-1)*p)].Microseconds()) / 1000
	}
	b.ReportMetric(pct(0.5), "median-ms")
	b.ReportMetric(pct(0.9), "p90-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
}
