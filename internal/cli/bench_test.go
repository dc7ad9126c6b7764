package cli_test

import (
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/apikey"
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
