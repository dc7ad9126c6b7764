// Package dataplanetest holds checks that tests of the data plane and of
// its callers share.
package dataplanetest

import (
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/dataplane"
)

// SpliceGoroutines counts the goroutines of this process that splice an
// agent tunnel (in tests the workers run in the test's process).
func SpliceGoroutines() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Count(string(buf[:n]), "dataplane.(*tunnel).splice")
		}
		buf = make([]byte, 2*len(buf))
	}
}

// RequireNoTunnels waits up to 10s for every agent tunnel of the process,
// and its goroutines, to be gone.
func RequireNoTunnels(t testing.TB) {
	t.Helper()
	require.Eventually(t, func() bool {
		return dataplane.OpenTunnels() == 0 && SpliceGoroutines() == 0
	}, 10*time.Second, 5*time.Millisecond, "tunnels left open: %d, splicing goroutines: %d", dataplane.OpenTunnels(), SpliceGoroutines())
}
