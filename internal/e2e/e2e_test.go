// Package e2e runs the real binaries (bin/worker, bin/aether-api,
// bin/aether-cli) as separate processes against private PostgreSQL, Redis
// and dockerd, the way `make up` does, and drives them over HTTP as a user
// would. It also measures what only separate processes can show: the peak
// memory of the API and the worker while a large file streams through.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// deployment is a worker and an API running as processes.
type deployment struct {
	t       testing.TB
	dir     string
	cfgPath string
	apiURL  string
	key     string
	cli     string
	procs   map[string]*exec.Cmd
	env     []string
}

func start(t testing.TB) *deployment {
	t.Helper()
	dsn := testenv.Postgres(t)
	redisAddr := testenv.Redis(t)
	dockerHost := testenv.Dockerd(t)
	bins := map[string]string{}
	for _, b := range []string{"worker", "aether-api", "aether-cli", "fc-agent"} {
		bins[b] = testenv.BuildBinary(t, b)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	require.NoError(t, postgres.MigrateUp(ctx, dsn))

	dir, err := os.MkdirTemp("", "ae-e2e-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	u, err := url.Parse(dsn)
	require.NoError(t, err)
	pass, _ := u.User.Password()
	apiPort := testenv.FreePort(t)
	cfg := fmt.Sprintf(`vmm:
  provider: docker
  docker:
    host: %s
    agent_path: %s
    socket_dir: %s
queue:
  redis_addr: %s
storage:
  host: %s
  port: %s
  database: %s
  user: %s
  password: %q
worker:
  id: e2e
  data_listen: 127.0.0.1:0
  metrics_listen: 127.0.0.1:%d
  heartbeat_interval: 1s
  ready_file: %s
api:
  listen: 127.0.0.1:%d
  ready_file: %s
  shutdown_timeout: 5s
cluster:
  token: %s
log:
  level: warn
`, dockerHost, bins["fc-agent"], filepath.Join(dir, "vms"), redisAddr, u.Hostname(), u.Port(),
		strings.TrimPrefix(u.Path, "/"), u.User.Username(), pass, testenv.FreePort(t),
		filepath.Join(dir, "worker.ready"), apiPort, filepath.Join(dir, "api.ready"), strconv.FormatUint(rand.Uint64(), 36)+"x"+strconv.FormatUint(rand.Uint64(), 36))
	d := &deployment{t: t, dir: dir, cfgPath: filepath.Join(dir, "aetherium.yaml"),
		apiURL: fmt.Sprintf("http://127.0.0.1:%d", apiPort), cli: bins["aether-cli"], procs: map[string]*exec.Cmd{}}
	require.NoError(t, os.WriteFile(d.cfgPath, []byte(cfg), 0o600))
	d.env = append(os.Environ(), "AETHERIUM_CONFIG="+d.cfgPath)
	d.run(bins["worker"], "worker.ready")
	d.run(bins["aether-api"], "api.ready")

	out, err := d.cliCmd(nil, "apikey", "create", "e2e").Output()
	require.NoError(t, err, "apikey create")
	d.key = strings.TrimSpace(string(out))
	require.True(t, strings.HasPrefix(d.key, "aek_"), "the plain output of apikey create is the key alone: %q", out)
	return d
}

// run starts a daemon and waits for its ready file; cleanup stops it by
// its pid.
func (d *deployment) run(bin, ready string) {
	t := d.t
	name := filepath.Base(bin)
	logf, err := os.Create(filepath.Join(d.dir, name+".log"))
	require.NoError(t, err)
	cmd := exec.Command(bin)
	cmd.Env, cmd.Stdout, cmd.Stderr = d.env, logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, cmd.Start())
	d.procs[name] = cmd
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited); logf.Close() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(d.dir, ready)); err == nil {
			return
		}
		select {
		case <-exited:
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("%s exited before it was ready:\n%s", name, b)
		default:
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("%s not ready after 60s:\n%s", name, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (d *deployment) cliCmd(env []string, args ...string) *exec.Cmd {
	cmd := exec.Command(d.cli, args...)
	cmd.Env = append(append([]string{}, d.env...), env...)
	return cmd
}

// do sends a request with the key and returns the response.
func (d *deployment) do(method, path string, body io.Reader, hdr ...string) *http.Response {
	d.t.Helper()
	req, err := http.NewRequest(method, d.apiURL+path, body)
	require.NoError(d.t, err)
	req.Header.Set("Authorization", "Bearer "+d.key)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(d.t, err)
	return resp
}

func (d *deployment) doJSON(method, path string, body any, wantStatus int, out any) {
	d.t.Helper()
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		require.NoError(d.t, err)
		r = bytes.NewReader(b)
	}
	resp := d.do(method, path, r, "Content-Type", "application/json")
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	require.Equal(d.t, wantStatus, resp.StatusCode, "%s %s: %s", method, path, b)
	if out != nil {
		require.NoError(d.t, json.Unmarshal(b, out), "%s", b)
	}
}

// peakRSS returns a process's peak resident memory in MiB (VmHWM).
func peakRSS(t testing.TB, pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, err := strconv.ParseFloat(f[1], 64)
			require.NoError(t, err)
			return kb / 1024
		}
	}
	t.Fatalf("no VmHWM in /proc/%d/status", pid)
	return 0
}

// randomReader yields n deterministic pseudo-random bytes without holding
// them.
func randomReader(n int64) io.Reader {
	return io.LimitReader(rand.NewChaCha8([32]byte{1, 2, 3}), n)
}

type vmJSON struct {
	ID    string `json:"id"`
	State string `json:"state"`
}

func (d *deployment) createVM(name string) string {
	var vm vmJSON
	d.doJSON("POST", "/v1/vms?wait=true", map[string]any{"name": name}, http.StatusCreated, &vm)
	require.Equal(d.t, "running", vm.State)
	return vm.ID
}

// TestBinaries is the README's HTTP session against the real binaries:
// create, exec buffered and streamed, a file up and down, the remote CLI,
// a graceful stop of the API with a stream open, and delete.
func TestBinaries(t *testing.T) {
	d := start(t)
	id := d.createVM("e2e")

	var ex struct {
		ExitCode int    `json:"exit_code"`
		Stdout   string `json:"stdout"`
		Stderr   string `json:"stderr"`
	}
	d.doJSON("POST", "/v1/vms/"+id+"/exec", map[string]any{"command": "sh", "args": []string{"-c", "echo out; echo err >&2; exit 3"}}, http.StatusOK, &ex)
	require.Equal(t, 3, ex.ExitCode)
	require.Equal(t, "out\n", ex.Stdout)
	require.Equal(t, "err\n", ex.Stderr)

	// A file up and down, byte for byte.
	content := []byte("binary\x00\xff\xfe content\n")
	resp := d.do("PUT", "/v1/vms/"+id+"/files?path=/tmp/f.bin&mode=0600", bytes.NewReader(content))
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", b)
	resp = d.do("GET", "/v1/vms/"+id+"/files?path=/tmp/f.bin", nil)
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", got)
	require.Equal(t, content, got)

	// The remote CLI: same output and exit code as local mode.
	remote := []string{"AETHERIUM_API_URL=" + d.apiURL, "AETHERIUM_API_KEY=" + d.key}
	cmd := d.cliCmd(remote, "exec", id, "--", "sh", "-c", "cat /tmp/f.bin | wc -c; exit 7")
	out, err := cmd.Output()
	require.Error(t, err)
	require.Equal(t, 7, cmd.ProcessState.ExitCode())
	require.Equal(t, fmt.Sprint(len(content)), strings.TrimSpace(string(out)))

	// SIGTERM with a stream open: the stream ends cleanly, the API exits,
	// and the command still ends and is recorded.
	resp = d.do("POST", "/v1/vms/"+id+"/exec", strings.NewReader(`{"command":"sh","args":["-c","echo first; sleep 2; echo second"]}`),
		"Accept", "application/x-ndjson", "Content-Type", "application/json")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	sc := bufio.NewScanner(resp.Body)
	var lines []map[string]any
	for sc.Scan() {
		var ev map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &ev), sc.Text())
		lines = append(lines, ev)
		if ev["type"] == "stdout" {
			break
		}
	}
	require.Equal(t, "start", lines[0]["type"])
	execID, _ := lines[0]["execution_id"].(string)
	api := d.procs["aether-api"]
	stopped := time.Now()
	require.NoError(t, api.Process.Signal(syscall.SIGTERM))
	rest, _ := io.ReadAll(resp.Body) // ends when the API closes the stream
	resp.Body.Close()
	require.NotEmpty(t, rest)
	require.Eventually(t, func() bool { return api.ProcessState != nil }, 10*time.Second, 20*time.Millisecond, "aether-api exited after SIGTERM")
	t.Logf("aether-api drained and exited %s after SIGTERM; stream tail: %s", time.Since(stopped).Round(time.Millisecond), bytes.TrimSpace(rest))
	require.Equal(t, 0, api.ProcessState.ExitCode(), "a drained API exits 0")

	// Bring the API back; the command ran to its end and was recorded.
	_ = os.Remove(filepath.Join(d.dir, "api.ready")) // the API removes it itself on exit
	d.run(api.Path, "api.ready")
	require.Eventually(t, func() bool {
		r := d.do("GET", "/v1/executions/"+execID, nil)
		defer r.Body.Close()
		var e struct{ Stdout string }
		return r.StatusCode == http.StatusOK && json.NewDecoder(r.Body).Decode(&e) == nil && e.Stdout == "first\nsecond\n"
	}, 15*time.Second, 100*time.Millisecond, "the execution was recorded in full")

	resp = d.do("DELETE", "/v1/vms/"+id+"?wait=true", nil)
	resp.Body.Close()
	require.Equal(t, http.StatusNoContent, resp.StatusCode)
}

// BenchmarkFileTransfer streams a 100 MiB file up and down through
// aether-api, the worker's data plane and the guest agent, and reports
// MB/s each way and the peak RSS of the API and the worker processes.
func BenchmarkFileTransfer(b *testing.B) {
	const size = 100 << 20
	d := start(b)
	id := d.createVM("bench-files")
	var up, down []float64
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		resp := d.do("PUT", "/v1/vms/"+id+"/files?path=/tmp/big.bin", randomReader(size))
		msg, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		require.Equal(b, http.StatusOK, resp.StatusCode, "%s", msg)
		up = append(up, size/1e6/time.Since(t0).Seconds())

		t0 = time.Now()
		resp = d.do("GET", "/v1/vms/"+id+"/files?path=/tmp/big.bin", nil)
		h := sha256.New()
		n, err := io.Copy(h, resp.Body)
		resp.Body.Close()
		require.NoError(b, err)
		require.EqualValues(b, size, n)
		down = append(down, size/1e6/time.Since(t0).Seconds())
		want := sha256.New()
		_, _ = io.Copy(want, randomReader(size))
		require.Equal(b, want.Sum(nil), h.Sum(nil), "the download is what was uploaded")
	}
	b.ReportMetric(median(up), "upload-MB/s")
	b.ReportMetric(median(down), "download-MB/s")
	b.ReportMetric(peakRSS(b, d.procs["aether-api"].Process.Pid), "api-peak-rss-MiB")
	b.ReportMetric(peakRSS(b, d.procs["worker"].Process.Pid), "worker-peak-rss-MiB")
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}
