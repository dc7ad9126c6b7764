package e2b_test

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/apikey"
	processpb "github.com/aetherium/aetherium-core/pkg/e2b/gen/process"
	"github.com/aetherium/aetherium-core/pkg/e2b/gen/process/processconnect"
	"github.com/aetherium/aetherium-core/pkg/storage"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// minNode is the oldest Node the e2b SDK 2.51.0 runs on (its undici).
var minNode = [3]int{20, 18, 1}

// TestSDKDocker runs test/e2b/compat.mjs, the unmodified e2b SDK, against
// aether-api with a docker worker: every check of the compatibility suite.
func TestSDKDocker(t *testing.T) {
	a, key := runSDK(t, stack.Options{Workers: []string{"e2b"}}, "compat.mjs", nil)
	t.Run("HostRouting", func(t *testing.T) { testHostRouting(t, a, key) })
	t.Run("CloseEndsStreams", func(t *testing.T) { testCloseEndsStreams(t, a, key) }) // last: it closes the E2B server
}

// createSandbox makes a sandbox over plain HTTP and returns its id, token
// and domain.
func createSandbox(t *testing.T, a *stack.API, key string) (id, token, domain string) {
	req, err := http.NewRequest(http.MethodPost, a.URL+"/sandboxes", strings.NewReader(`{"templateID":"base","timeout":60}`))
	require.NoError(t, err)
	req.Header.Set("X-API-KEY", key)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	var sb struct {
		SandboxID       string `json:"sandboxID"`
		EnvdAccessToken string `json:"envdAccessToken"`
		Domain          string `json:"domain"`
	}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&sb))
	require.Equal(t, http.StatusCreated, resp.StatusCode)
	return sb.SandboxID, sb.EnvdAccessToken, sb.Domain
}

// testCloseEndsStreams: Close (aether-api draining) ends a process stream
// with unavailable at once, and the process runs on. The client here is
// connect-go's own, over the JSON codec, as another SDK would be.
func testCloseEndsStreams(t *testing.T, a *stack.API, key string) {
	id, token, _ := createSandbox(t, a, key)
	c := processconnect.NewProcessClient(http.DefaultClient, a.URL, connect.WithProtoJSON())
	req := connect.NewRequest(&processpb.StartRequest{Process: &processpb.ProcessConfig{Cmd: "/bin/sh", Args: []string{"-c", "sleep 30"}}})
	req.Header().Set("E2b-Sandbox-Id", id)
	req.Header().Set("X-Access-Token", token)
	stream, err := c.Start(t.Context(), req)
	require.NoError(t, err)
	defer stream.Close()
	require.True(t, stream.Receive(), "start event: %v", stream.Err())
	pid := stream.Msg().GetEvent().GetStart().GetPid()
	require.NotZero(t, pid)

	start := time.Now()
	a.E2B.Close()
	for stream.Receive() {
		require.NotNil(t, stream.Msg().GetEvent().GetKeepalive(), "only keepalives may come before the end: %v", stream.Msg())
	}
	require.Equal(t, connect.CodeUnavailable, connect.CodeOf(stream.Err()), "%v", stream.Err())
	require.Less(t, time.Since(start), 5*time.Second)

	list := connect.NewRequest(&processpb.ListRequest{})
	list.Header().Set("E2b-Sandbox-Id", id)
	list.Header().Set("X-Access-Token", token)
	_, err = c.List(t.Context(), list)
	require.Equal(t, connect.CodeUnavailable, connect.CodeOf(err), "after Close the sandbox plane answers unavailable: %v", err)
}

// testHostRouting: a request for host 49983-<id>.<e2b_domain> is served as
// that sandbox's envd, with its token only; other ports are refused.
func testHostRouting(t *testing.T, a *stack.API, key string) {
	var sb struct{ SandboxID, EnvdAccessToken string }
	var domain string
	sb.SandboxID, sb.EnvdAccessToken, domain = createSandbox(t, a, key)
	require.Equal(t, testDomain, domain)

	get := func(host, path, token string) (int, string) {
		req, err := http.NewRequest(http.MethodGet, a.URL+path, nil)
		require.NoError(t, err)
		req.Host = host
		if token != "" {
			req.Header.Set("X-Access-Token", token)
		}
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	host := "49983-" + sb.SandboxID + "." + testDomain
	code, _ := get(host, "/health", sb.EnvdAccessToken)
	require.Equal(t, http.StatusNoContent, code)
	code, body := get(host+":443", "/files?path=/etc/hostname", sb.EnvdAccessToken)
	require.Equal(t, http.StatusOK, code, body)
	code, _ = get(host, "/files?path=/etc/hostname", "")
	require.Equal(t, http.StatusUnauthorized, code, "no token")
	code, body = get("8080-"+sb.SandboxID+"."+testDomain, "/", sb.EnvdAccessToken)
	require.Equal(t, http.StatusBadGateway, code)
	require.Contains(t, body, "not served")
	code, _ = get("49983-"+uuid.NewString()+"."+testDomain, "/health", sb.EnvdAccessToken)
	require.Equal(t, http.StatusBadGateway, code, "unknown sandbox")
	code, _ = get("localhost", "/healthz", "")
	require.Equal(t, http.StatusOK, code, "the API's own routes are unchanged")
}

// testDomain is the e2b_domain of the docker run.
const testDomain = "e2b.test"

// TestSDKQEMU runs the same checks on QEMU microVMs (about 20 s);
// E2B_QEMU_CASES=core keeps only create, run, files and kill.
func TestSDKQEMU(t *testing.T) {
	runSDK(t, stack.Options{Provider: "qemu", Workers: []string{"e2bq"}}, "compat.mjs", []string{"E2B_CASES=" + cmp.Or(os.Getenv("E2B_QEMU_CASES"), "all")})
}

// runSDK starts a stack and an API serving E2B, then runs a node script
// of test/e2b with the SDK pointed at it, and fails on a non-zero exit.
func runSDK(t testing.TB, o stack.Options, script string, env []string) (*stack.API, string) {
	a, key, _ := runScript(t, o, script, env)
	return a, key
}

// runScript is runSDK that also returns the script's output.
func runScript(t testing.TB, o stack.Options, script string, env []string) (*stack.API, string, string) {
	dir := npmCI(t)
	s := stack.Start(t, o)
	a := s.StartAPI(t, stack.APIOptions{E2B: true, E2BDomain: testDomain})
	key := a.Key(t, apikey.Options{Tenant: "e2b"})
	other := a.Key(t, apikey.Options{Tenant: "other"})
	// A registered template for the template checks of the script.
	require.NoError(t, s.Store.CreateTemplate(t.Context(), &storage.Template{Name: "small", VCPUs: 1, MemoryMB: 256,
		Env: map[string]string{"TPL_VAR": "from-template"}}))

	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", script)
	cmd.Dir = dir
	cmd.Env = append(cleanEnv(), "E2B_API_URL="+a.URL, "E2B_SANDBOX_URL="+a.URL, "E2B_API_KEY="+key, "E2B_OTHER_TENANT_KEY="+other)
	cmd.Env = append(cmd.Env, env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err := cmd.Run()
	t.Logf("node %s (%s):\n%s", script, time.Since(start).Round(time.Millisecond), out.String())
	if err != nil {
		t.Fatalf("node %s failed: %v (its output is above)", script, err)
	}
	return a, key, out.String()
}

// BenchmarkSDK runs test/e2b/bench.mjs once per backend (whatever b.N):
// commands.run('true') against the native exec of the same VM, and
// Sandbox.create() to the first command's result. BENCH_RUNS and
// BENCH_CREATES tune it.
func BenchmarkSDK(b *testing.B) {
	for _, p := range []string{"docker", "qemu"} {
		b.Run(p, func(b *testing.B) {
			_, _, out := runScript(b, stack.Options{Provider: p, Workers: []string{"bench-" + p}}, "bench.mjs",
				[]string{"BENCH_RUNS=" + cmp.Or(os.Getenv("BENCH_RUNS"), "200"), "BENCH_CREATES=" + cmp.Or(os.Getenv("BENCH_CREATES"), "10")})
			lines := strings.Split(strings.TrimSpace(out), "\n")
			var figures map[string]float64
			require.NoError(b, json.Unmarshal([]byte(lines[len(lines)-1]), &figures))
			for k, v := range figures {
				b.ReportMetric(v, k+"_ms")
			}
			for range b.N {
			}
		})
	}
}

// cleanEnv is the environment without E2B settings of the caller's, which
// would redirect the SDK (E2B_DEBUG, E2B_DOMAIN and so on).
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "E2B_") {
			env = append(env, kv)
		}
	}
	return env
}

var (
	npmOnce sync.Once
	npmErr  string
	npmSkip string
)

// npmCI installs test/e2b's locked packages once per test process and
// returns the directory; it skips when Node or npm is missing or too old.
func npmCI(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(testenv.RepoRoot(), "test", "e2b")
	npmOnce.Do(func() {
		out, err := exec.Command("node", "--version").Output()
		if err != nil {
			npmSkip = "node is not installed; run scripts/setup.sh (installs Node 20.18.1 or newer) to run the e2b SDK compatibility tests"
			return
		}
		if v := strings.TrimSpace(string(out)); !nodeAtLeast(v, minNode) {
			npmSkip = "node " + v + " is too old for the e2b SDK (needs 20.18.1 or newer); install a newer Node to run the compatibility tests"
			return
		}
		if _, err := exec.LookPath("npm"); err != nil {
			npmSkip = "npm is not installed; run scripts/setup.sh to run the e2b SDK compatibility tests"
			return
		}
		cmd := exec.Command("npm", "ci", "--no-audit", "--no-fund", "--loglevel=error")
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			npmErr = "npm ci in test/e2b: " + err.Error() + "\n" + string(out)
		}
	})
	if npmSkip != "" {
		testenv.Skip(t, "%s", npmSkip)
	}
	if npmErr != "" {
		t.Fatal(npmErr)
	}
	return dir
}

// nodeAtLeast compares "v20.20.2" with min.
func nodeAtLeast(v string, min [3]int) bool {
	parts := strings.SplitN(strings.TrimPrefix(v, "v"), ".", 3)
	for i := range 3 {
		if i >= len(parts) {
			return false
		}
		n, err := strconv.Atoi(strings.TrimRight(parts[i], "-+abcdefghijklmnopqrstuvwxyz"))
		if err != nil {
			return false
		}
		if n != min[i] {
			return n > min[i]
		}
	}
	return true
}

func TestNodeAtLeast(t *testing.T) {
	for v, want := range map[string]bool{
		"v20.20.2": true, "v20.18.1": true, "v22.0.0": true, "v20.18.0": false, "v18.19.0": false, "v20": false, "garbage": false,
	} {
		require.Equal(t, want, nodeAtLeast(v, minNode), v)
	}
}
