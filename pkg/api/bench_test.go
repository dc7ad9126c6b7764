package api_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/api"
	"github.com/aetherium/aetherium-core/pkg/apikey"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// benchAPI starts a stack and an API and returns a plain client (no
// contract checks: they would be measured too) and a running VM.
func benchAPI(b *testing.B, worker string) (*stack.Stack, *client, *types.VM) {
	s := stack.Start(b, stack.Options{Workers: []string{worker}})
	a := s.StartAPI(b, stack.APIOptions{})
	c := &client{t: b, base: a.URL, key: a.Key(b, apikey.Options{}), hc: &http.Client{Timeout: time.Minute}}
	return s, c, c.createVM("bench")
}

// pct returns the p-quantile of sorted durations in milliseconds.
func pct(durs []time.Duration, p float64) float64 {
	return float64(durs[int(float64(len(durs)-1)*p)].Microseconds()) / 1000
}

// BenchmarkAPIExecTrue times `true` through the API (request to the whole
// JSON answer) beside `docker exec C true` on the very container the
// docker backend made for the VM, alternating in one loop so that both
// see the same machine.
func BenchmarkAPIExecTrue(b *testing.B) {
	s, c, vm := benchAPI(b, "bexec")
	dockerBin, err := exec.LookPath("docker")
	if err != nil {
		testenv.Skip(b, "the docker CLI is not installed (%v); it is the baseline: install docker.io with `make setup`", err)
	}
	container := "aetherium-" + vm.ID // pkg/vmm/docker's containerName
	body, err := json.Marshal(api.ExecRequest{Command: "true"})
	require.NoError(b, err)
	apiExec := func() {
		req := c.request("POST", "/v1/vms/"+vm.ID+"/exec", nil)
		req.Body = io.NopCloser(bytes.NewReader(body))
		req.ContentLength = int64(len(body))
		resp := c.send(req)
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b.Fatalf("exec answered %d", resp.StatusCode)
		}
	}
	dockerExec := func() {
		cmd := exec.Command(dockerBin, "-H", s.DockerHost, "exec", container, "true")
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("docker exec: %v: %s", err, out)
		}
	}
	apiExec() // warm both paths up
	dockerExec()
	var apiD, dockerD []time.Duration
	for b.Loop() {
		t0 := time.Now()
		apiExec()
		t1 := time.Now()
		dockerExec()
		apiD, dockerD = append(apiD, t1.Sub(t0)), append(dockerD, time.Since(t1))
	}
	slices.Sort(apiD)
	slices.Sort(dockerD)
	b.ReportMetric(pct(apiD, 0.5), "api-p50-ms")
	b.ReportMetric(pct(apiD, 0.99), "api-p99-ms")
	b.ReportMetric(pct(dockerD, 0.5), "docker-exec-p50-ms")
	b.ReportMetric(pct(dockerD, 0.99), "docker-exec-p99-ms")
	b.ReportMetric(pct(apiD, 0.5)/pct(dockerD, 0.5), "p50-ratio")
}

// BenchmarkAPIStreamFirstByte times a streamed exec of `echo hi; sleep 5`
// from the request to its first stdout line; the command is then
// cancelled (not timed) so that sleeps do not pile up.
func BenchmarkAPIStreamFirstByte(b *testing.B) {
	_, c, vm := benchAPI(b, "bstream")
	body, err := json.Marshal(api.ExecRequest{Command: "sh", Args: []string{"-c", "echo hi; sleep 5"}})
	require.NoError(b, err)
	testenv.Measure(b, func() {
		req := c.request("POST", "/v1/vms/"+vm.ID+"/exec", nil)
		req.Body = io.NopCloser(bytes.NewReader(body))
		req.ContentLength = int64(len(body))
		req.Header.Set("Accept", api.NDJSON)
		resp := c.send(req)
		sc := bufio.NewScanner(resp.Body)
		var id string
		for sc.Scan() {
			var ev api.Event
			if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
				b.Fatal(err)
			}
			if ev.Type == "start" {
				id = ev.ExecutionID
			}
			if ev.Type == "stdout" {
				break
			}
			if ev.Type != "start" {
				b.Fatalf("unexpected event %q before stdout", ev.Type)
			}
		}
		b.StopTimer()
		resp.Body.Close()
		cancel := c.request("POST", "/v1/tasks/"+id+"/cancel", nil)
		r := c.send(cancel)
		r.Body.Close()
		b.StartTimer()
	})
}

// BenchmarkAPIListVMs measures GET /v1/vms over 1,000 VM rows with a few
// concurrent clients.
func BenchmarkAPIListVMs(b *testing.B) {
	s := stack.Start(b, stack.Options{Workers: []string{"blist"}})
	a := s.StartAPI(b, stack.APIOptions{})
	key := a.Key(b, apikey.Options{})
	ctx := context.Background()
	now := time.Now().UTC()
	for i := range 1000 {
		require.NoError(b, s.Store.CreateVM(ctx, &types.VM{ID: uuid.NewString(), Name: fmt.Sprintf("vm-%04d", i), VCPUs: 1, MemoryMB: 256,
			State: types.VMRunning, Provider: "docker", Tenant: apikey.DefaultTenant, Labels: map[string]string{"n": fmt.Sprint(i % 10)},
			CreatedAt: now, UpdatedAt: now}))
	}
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	var failed atomic.Int64
	get := func() {
		req, _ := http.NewRequest("GET", a.URL+"/v1/vms", nil)
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := hc.Do(req)
		if err != nil {
			failed.Add(1)
			return
		}
		n, err := io.Copy(io.Discard, resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK || n < 1000*100 {
			failed.Add(1)
		}
		resp.Body.Close()
	}
	var list api.VMList
	c := &client{t: b, base: a.URL, key: key, hc: hc}
	c.call("GET", "/v1/vms", nil, http.StatusOK, &list)
	require.Len(b, list.VMs, 1000)
	b.SetParallelism(2) // 2 x GOMAXPROCS clients
	start := time.Now()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			get()
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "req/s")
	require.Zero(b, failed.Load(), "requests failed")
}
