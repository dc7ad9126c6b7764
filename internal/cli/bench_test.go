package cli_test

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/apikey"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
)

// BenchmarkCLIExecTrue times `aether-cli exec ID -- true` as a whole
// process (what a script pays per command), in local mode (PostgreSQL and
// Redis directly) and in remote mode (through aether-api), beside `docker
// exec CONTAINER true` on the very container that backs the VM. Each
// sub-benchmark reports median, p90 and p99; local and remote also report
// their median as a multiple of docker's (x-docker).
//
//	go test ./internal/cli -run '^$' -bench BenchmarkCLIExecTrue -benchtime 200x
func BenchmarkCLIExecTrue(b *testing.B) {
	docker, err := exec.LookPath("docker")
	if err != nil {
		testenv.Skip(b, "the docker command line is not installed; install docker-ce-cli (or docker.io) to compare with docker exec")
	}
	s := stack.Start(b, stack.Options{})
	cfg := s.ConfigFile(b)
	api := s.StartAPI(b, stack.APIOptions{})
	key := api.Key(b, apikey.Options{Admin: true})
	bin := testenv.BuildBinary(b, "aether-cli")

	ctx := b.Context()
	id, err := s.Service.CreateVMTask(ctx, "bench-true", 1, 256)
	require.NoError(b, err)
	task, err := s.Service.WaitTask(ctx, id)
	require.NoError(b, err)
	require.Empty(b, task.Error)
	out, err := exec.Command(docker, "-H", s.DockerHost, "ps", "--filter", "label=io.aetherium.vm-id="+id.String(), "-q").Output()
	require.NoError(b, err)
	container := strings.TrimSpace(string(out))
	require.NotEmpty(b, container, "no container backs vm %s", id)

	base := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "AETHERIUM_") })
	cases := []struct {
		name string
		argv []string
		env  []string
	}{
		{"docker-exec", []string{docker, "-H", s.DockerHost, "exec", container, "true"}, base},
		{"cli-local", []string{bin, "--config", cfg, "exec", id.String(), "--", "true"}, base},
		{"cli-remote", []string{bin, "--config", cfg, "exec", id.String(), "--", "true"},
			append(slices.Clone(base), "AETHERIUM_API_URL="+api.URL, "AETHERIUM_API_KEY="+key)},
	}
	var mu sync.Mutex
	medians := map[string]time.Duration{}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			var durs []time.Duration
			testenv.Measure(b, func() {
				cmd := exec.Command(c.argv[0], c.argv[1:]...)
				cmd.Env = c.env
				start := time.Now()
				out, err := cmd.CombinedOutput()
				durs = append(durs, time.Since(start))
				if err != nil {
					b.Fatalf("%s: %v\n%s", strings.Join(c.argv, " "), err, out)
				}
			})
			slices.Sort(durs)
			mu.Lock()
			defer mu.Unlock()
			medians[c.name] = durs[(len(durs)-1)/2]
			if d := medians["docker-exec"]; d > 0 && c.name != "docker-exec" {
				b.ReportMetric(float64(medians[c.name])/float64(d), "x-docker")
			}
		})
	}
	b.Logf("medians: %v", medians)
}

// BenchmarkCreateVsRaw times, side by side in one run on qemu, as whole
// aether-cli processes: `vm create --template T --wait` then the first
// `exec ID -- true` (a restored clone), the same with a cold boot (`vm
// create --wait`), and a raw QEMU boot of the same kernel and initramfs
// to /init (testenv.RawQEMUBoot). It reports the medians and each as a
// multiple of the raw boot (x-raw), then the wall time of 10 concurrent
// clone creates as a multiple of one (x-single).
//
//	go test ./internal/cli -run '^$' -bench BenchmarkCreateVsRaw -benchtime 20x
func BenchmarkCreateVsRaw(b *testing.B) {
	s := stack.Start(b, stack.Options{Provider: qemu.Provider})
	cfg := s.ConfigFile(b)
	bin := testenv.BuildBinary(b, "aether-cli")
	img := testenv.GuestImage(b)
	orch, ok := s.VMMs["w1"].(*qemu.Orchestrator)
	require.True(b, ok)
	accel := orch.Accel().Name
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "AETHERIUM_") })
	cli := func(args ...string) (string, time.Duration) {
		cmd := exec.Command(bin, append([]string{"--config", cfg}, args...)...)
		cmd.Env = env
		start := time.Now()
		out, err := cmd.Output()
		took := time.Since(start)
		if err != nil {
			var stderr []byte
			if ee, ok := err.(*exec.ExitError); ok {
				stderr = ee.Stderr
			}
			b.Fatalf("aether-cli %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr)
		}
		return strings.TrimSpace(string(out)), took
	}
	cli("template", "create", "bench", "--vcpus", "1", "--memory", "256", "--wait")
	n := 0
	// createExec returns the create's time and the create's and the first
	// exec's together.
	createExec := func(extra ...string) (time.Duration, time.Duration) {
		n++
		id, create := cli(append([]string{"vm", "create", "--name", fmt.Sprintf("bench-%d", n), "--wait"}, extra...)...)
		_, exe := cli("exec", id, "--", "true")
		cli("vm", "delete", id, "--wait")
		return create, create + exe
	}
	var raw, clone, cloneCreate, cold, coldCreate []time.Duration
	for b.Loop() {
		raw = append(raw, testenv.RawQEMUBoot(b, qemu.DefaultBinary, img.KernelPath(), img.InitrdPath(), accel, qemu.ClockArgs(accel)...))
		cc, c := createExec("--template", "bench")
		clone, cloneCreate = append(clone, c), append(cloneCreate, cc)
		kc, k := createExec("--vcpus", "1", "--memory", "256")
		cold, coldCreate = append(cold, k), append(coldCreate, kc)
	}
	med := func(d []time.Duration) time.Duration {
		slices.Sort(d)
		return d[(len(d)-1)/2]
	}
	r, c, k := med(raw), med(clone), med(cold)
	cc, kc := med(cloneCreate), med(coldCreate)
	b.ReportMetric(float64(r.Milliseconds()), "raw-ms")
	b.ReportMetric(float64(c.Milliseconds()), "template-create+exec-ms")
	b.ReportMetric(float64(cc.Milliseconds()), "template-create-ms")
	b.ReportMetric(float64(k.Milliseconds()), "cold-create+exec-ms")
	b.ReportMetric(float64(kc.Milliseconds()), "cold-create-ms")
	b.ReportMetric(float64(c)/float64(r), "template-x-raw")
	b.ReportMetric(float64(kc)/float64(r), "cold-create-x-raw")
	b.ReportMetric(float64(k)/float64(r), "cold+exec-x-raw")

	// 10 clones at once against one. The host's CPU use over each says
	// whether the wall time is bound by its CPUs: the 10 clones cannot
	// finish sooner than their CPU time over the host's CPUs.
	cpu0 := hostCPU(b)
	_, single := cli("vm", "create", "--name", "bench-single", "--template", "bench", "--wait")
	cpu1 := hostCPU(b)
	start := time.Now()
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cli("vm", "create", "--name", fmt.Sprintf("bench-many-%d", i), "--template", "bench", "--wait")
		}()
	}
	wg.Wait()
	many := time.Since(start)
	cpu2 := hostCPU(b)
	singleCPU, manyCPU := cpu1.sub(cpu0), cpu2.sub(cpu1)
	b.ReportMetric(float64(many.Milliseconds()), "10-concurrent-ms")
	b.ReportMetric(float64(many)/float64(single), "10-concurrent-x-single")
	b.ReportMetric(manyCPU.busyFraction()*100, "10-concurrent-host-cpu-busy-%")
	b.ReportMetric(float64(manyCPU.busy.Milliseconds())/10, "cpu-ms-per-concurrent-clone")
	b.ReportMetric(float64(singleCPU.busy.Milliseconds()), "cpu-ms-single-clone")
	b.Logf("raw boot %v, template create+exec %v (%.2fx), cold create %v (%.2fx), cold create+exec %v (%.2fx); one clone create %v using %v of host CPU, 10 at once %v (%.2fx) using %v of CPU (%.0f%% of the host's %d CPUs busy)",
		r, c, float64(c)/float64(r), kc, float64(kc)/float64(r), k, float64(k)/float64(r), single, singleCPU.busy, many, float64(many)/float64(single),
		manyCPU.busy, manyCPU.busyFraction()*100, runtime.NumCPU())
}

// cpuTimes are the host's CPU times since boot, all CPUs summed.
type cpuTimes struct{ busy, total time.Duration }

func (c cpuTimes) sub(o cpuTimes) cpuTimes { return cpuTimes{c.busy - o.busy, c.total - o.total} }

func (c cpuTimes) busyFraction() float64 {
	if c.total <= 0 {
		return 0
	}
	return float64(c.busy) / float64(c.total)
}

// hostCPU reads the host's CPU times from /proc/stat's "cpu" line (in
// USER_HZ, 100 a second on Linux): busy is all but idle and iowait.
func hostCPU(tb testing.TB) cpuTimes {
	tb.Helper()
	b, err := os.ReadFile("/proc/stat")
	require.NoError(tb, err)
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	require.True(tb, len(f) > 5 && f[0] == "cpu", "unexpected /proc/stat: %q", line)
	var t cpuTimes
	for i, v := range f[1:] {
		n, err := strconv.ParseInt(v, 10, 64)
		require.NoError(tb, err)
		d := time.Duration(n) * 10 * time.Millisecond
		t.total += d
		if i != 3 && i != 4 { // idle, iowait
			t.busy += d
		}
	}
	return t
}
