// Package testenv starts the real services integration tests need
// (PostgreSQL, Redis, dockerd) on private data directories and ports, and
// stops them by pid. When something is missing, tests skip with a message
// that says how to enable them; with AETHERIUM_TEST_REQUIRE=1 (set by
// .ci/run) such skips become failures so nothing is silently untested.
package testenv

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
)

// RequireEnv is the variable that turns skips into failures.
const RequireEnv = "AETHERIUM_TEST_REQUIRE"

// Required reports whether missing prerequisites must fail tests.
func Required() bool { return os.Getenv(RequireEnv) == "1" }

// Skip skips t, or fails it when prerequisites are required. The message
// must say what is missing and how to provide it.
func Skip(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if Required() {
		t.Fatalf("%s (%s=1 turns this skip into a failure)", msg, RequireEnv)
	}
	t.Skip(msg)
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// RepoRoot returns the module's root directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

var (
	buildMu    sync.Mutex
	buildCache = map[string]string{}
	buildDir   string
)

// BuildBinary builds ./cmd/<name> once per test process (static, as the
// Makefile does) and returns the path to the binary.
func BuildBinary(t testing.TB, name string) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := buildCache[name]; ok {
		return p
	}
	if buildDir == "" {
		requireMain(t)
		d, err := os.MkdirTemp("", "aetherium-bin-")
		if err != nil {
			t.Fatalf("making a build directory: %v", err)
		}
		AtExit(func() { os.RemoveAll(d) })
		buildDir = d
	}
	out := filepath.Join(buildDir, name)
	// -trimpath and -buildvcs=false make the binary depend only on the
	// source, so content-addressed guest images are shared across clones
	// and commits that leave fc-agent unchanged.
	cmd := exec.Command("go", "build", "-trimpath", "-buildvcs=false", "-o", out, "./cmd/"+name)
	cmd.Dir = RepoRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building %s: %v\n%s", name, err, b)
	}
	buildCache[name] = out
	return out
}

var (
	cleanupMu sync.Mutex
	cleanups  []func()
	inMain    bool // Main runs the tests
)

// AtExit registers f to run when Main returns, for services shared by every
// test of one test binary. Later registrations run first.
func AtExit(f func()) {
	cleanupMu.Lock()
	defer cleanupMu.Unlock()
	cleanups = append(cleanups, f)
}

// requireMain fails t in a test binary whose TestMain does not call Main:
// nothing would stop the shared service or remove the build t asks for,
// and its process and directory would outlive the tests.
func requireMain(t testing.TB) {
	t.Helper()
	cleanupMu.Lock()
	ok := inMain
	cleanupMu.Unlock()
	if !ok {
		t.Fatal("testenv: a shared service or build was asked for, but this package's TestMain does not call testenv.Main, which stops and removes it; add `func TestMain(m *testing.M) { testenv.Main(m) }`")
	}
}

// Main runs the tests, then stops the shared services they started. Packages
// that use shared services call it from TestMain.
func Main(m *testing.M) {
	cleanupMu.Lock()
	inMain = true
	cleanupMu.Unlock()
	code := m.Run()
	cleanupMu.Lock()
	for i := len(cleanups) - 1; i >= 0; i-- {
		cleanups[i]()
	}
	cleanups = nil
	cleanupMu.Unlock()
	os.Exit(code)
}
