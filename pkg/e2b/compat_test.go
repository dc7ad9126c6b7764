package e2b_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/apikey"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// minNode is the oldest Node the e2b SDK 2.51.0 runs on (its undici).
var minNode = [3]int{20, 18, 1}

// TestSDKDocker runs test/e2b/compat.mjs, the unmodified e2b SDK, against
// aether-api with a docker worker: every check of the compatibility suite.
func TestSDKDocker(t *testing.T) {
	runSDK(t, stack.Options{Workers: []string{"e2b"}}, "compat.mjs", nil)
}

// TestSDKQEMU runs the core checks (create, run, files, kill) on microVMs.
func TestSDKQEMU(t *testing.T) {
	runSDK(t, stack.Options{Provider: "qemu", Workers: []string{"e2bq"}}, "compat.mjs", []string{"E2B_CASES=core"})
}

// runSDK starts a stack and an API serving E2B, then runs a node script
// of test/e2b with the SDK pointed at it, and fails on a non-zero exit.
func runSDK(t *testing.T, o stack.Options, script string, env []string) {
	dir := npmCI(t)
	s := stack.Start(t, o)
	a := s.StartAPI(t, stack.APIOptions{E2B: true})
	key := a.Key(t, apikey.Options{Tenant: "e2b"})
	other := a.Key(t, apikey.Options{Tenant: "other"})

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
func npmCI(t *testing.T) string {
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
