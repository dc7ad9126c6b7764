package worker_test

import (
	"bufio"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/worker"
)

// scrape reads a Prometheus text exposition into series -> value, a
// series being written as in the exposition: name{label="v",...}.
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	series := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		require.NoError(t, err, line)
		series[line[:i]] = v
	}
	require.NoError(t, sc.Err())
	return series
}

func TestMetrics(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	vmID := createVM(t, s, "metrics")
	execWait(t, s, vmID, types.Command{Cmd: "sleep", Args: []string{"0.2"}})
	w := s.Workers["w1"]
	require.NotEmpty(t, w.MetricsAddr())
	m := scrape(t, "http://"+w.MetricsAddr()+"/metrics")

	tests := []struct {
		series   string
		min, max float64
	}{
		{`aetherium_vm_create_duration_seconds_count{provider="docker"}`, 1, 1},
		{`aetherium_vm_create_duration_seconds_sum{provider="docker"}`, 0.001, 120},
		{`aetherium_exec_duration_seconds_count{provider="docker"}`, 1, 1},
		{`aetherium_exec_duration_seconds_sum{provider="docker"}`, 0.2, 10},
		{`aetherium_tasks_total{outcome="succeeded",type="vm:create"}`, 1, 1},
		{`aetherium_tasks_total{outcome="succeeded",type="vm:execute"}`, 1, 1},
		{`aetherium_task_queue_latency_seconds_count{type="vm:create"}`, 1, 1},
		{`aetherium_task_queue_latency_seconds_count{type="vm:execute"}`, 1, 1},
		{`aetherium_task_queue_latency_seconds_sum{type="vm:execute"}`, 0, 10},
		{`aetherium_task_queue_latency_seconds_bucket{type="vm:execute",le="+Inf"}`, 1, 1},
	}
	for _, tt := range tests {
		v, ok := m[tt.series]
		require.True(t, ok, "series %s is missing", tt.series)
		require.GreaterOrEqual(t, v, tt.min, tt.series)
		require.LessOrEqual(t, v, tt.max, tt.series)
	}
	_, ok := m[`aetherium_tasks_total{outcome="failed",type="vm:create"}`]
	require.False(t, ok, "nothing failed")

	// MetricsHandler serves the same registry as the listener.
	rec := httptest.NewRecorder()
	w.MetricsHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	require.Equal(t, http.StatusOK, rec.Code)
	require.Contains(t, rec.Body.String(), `aetherium_tasks_total{outcome="succeeded",type="vm:execute"} 1`)
}

// TestListeners: the data plane's address goes out with every heartbeat;
// without a cluster token there is no data plane, and the worker still
// works; Start and Stop stay idempotent with the listeners.
func TestListeners(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := t.Context()
	w := s.Workers["w1"]
	rec, err := s.Store.GetWorker(ctx, "w1")
	require.NoError(t, err)
	require.NotEmpty(t, w.DataAddr())
	require.Equal(t, w.DataAddr(), rec.DataAddr)

	w.Stop()
	w.Stop()
	require.Empty(t, w.DataAddr())
	require.Empty(t, w.MetricsAddr())
	require.NoError(t, w.Start(ctx))
	require.NoError(t, w.Start(ctx))
	require.NotEmpty(t, w.DataAddr())
	rec, err = s.Store.GetWorker(ctx, "w1")
	require.NoError(t, err)
	require.Equal(t, w.DataAddr(), rec.DataAddr, "a restart advertises the new address")

	bare, err := worker.New(worker.Config{ID: "w-notoken", Redis: queue.RedisConfig{Addr: s.RedisAddr}, DataListen: "127.0.0.1:0",
		MetricsListen: worker.Off}, s.Store, s.VMMs["w1"], nil, nil)
	require.NoError(t, err)
	require.NoError(t, bare.Start(ctx))
	t.Cleanup(bare.Stop)
	require.Empty(t, bare.DataAddr(), "no token, no data plane")
	require.Empty(t, bare.MetricsAddr())
	rec, err = s.Store.GetWorker(ctx, "w-notoken")
	require.NoError(t, err)
	require.Empty(t, rec.DataAddr)
}

// TestVMUsageMetrics: with a backend that confines each VM in a cgroup
// (qemu), the worker exports every running VM's CPU time and memory from
// it; a deleted VM's series go with it.
func TestVMUsageMetrics(t *testing.T) {
	s := stack.Start(t, stack.Options{Provider: "qemu"})
	vmID := createVM(t, s, "usage")
	execWait(t, s, vmID, types.Command{Cmd: "sh", Args: []string{"-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"}})
	w := s.Workers["w1"]
	m := scrape(t, "http://"+w.MetricsAddr()+"/metrics")
	cpu, ok := m[`aetherium_vm_cpu_seconds_total{vm_id="`+vmID.String()+`"}`]
	require.True(t, ok, "the VM's cpu series is missing")
	require.Greater(t, cpu, 0.5, "booting under TCG alone takes more than half a CPU second")
	mem, ok := m[`aetherium_vm_memory_bytes{vm_id="`+vmID.String()+`"}`]
	require.True(t, ok, "the VM's memory series is missing")
	require.Greater(t, mem, float64(32<<20), "QEMU and the touched guest memory")
	require.Less(t, mem, float64(2<<30))

	// The VM's row says how its VMM is confined (vm get --json shows it).
	vm, err := s.Service.GetVM(t.Context(), vmID)
	require.NoError(t, err)
	var delID uuid.UUID
	require.NotNil(t, vm.Confinement, "the worker records the confinement")
	require.GreaterOrEqual(t, vm.Confinement.UID, 900000)
	require.Contains(t, vm.Confinement.Cgroup, vmID.String())

	delID, err = s.Service.DeleteVMTask(t.Context(), vmID.String())
	require.NoError(t, err)
	waitOK(t, s.Service, delID)
	m = scrape(t, "http://"+w.MetricsAddr()+"/metrics")
	_, ok = m[`aetherium_vm_cpu_seconds_total{vm_id="`+vmID.String()+`"}`]
	require.False(t, ok, "a deleted VM has no series")
}
