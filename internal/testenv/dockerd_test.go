package testenv

import (
	"context"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDockerd starts the shared engine, talks to it, stops it and checks
// that nothing is left: not the process, not its directory.
func TestDockerd(t *testing.T) {
	host := Dockerd(t)
	if again := Dockerd(t); again != host {
		t.Fatalf("second call returned %q, want the shared %q", again, host)
	}
	sock, ok := strings.CutPrefix(host, "unix://")
	if !ok {
		t.Fatalf("host %q is not a unix socket", host)
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("http://docker/v1.41/version")
	if err != nil {
		t.Fatalf("asking the engine for its version: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("version: %s", resp.Status)
	}

	dir := strings.TrimSuffix(sock, "/docker.sock")
	pidb, err := os.ReadFile(dir + "/docker.pid")
	if err != nil {
		t.Fatalf("reading dockerd's pidfile: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(pidb)))
	if err != nil {
		t.Fatalf("dockerd's pidfile: %v", err)
	}

	stopDockerd()
	deadline := time.Now().Add(5 * time.Second)
	for syscall.Kill(pid, 0) == nil {
		if time.Now().After(deadline) {
			t.Fatalf("dockerd (pid %d) still runs after stopping it", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("dockerd's directory %s is still there (stat: %v)", dir, err)
	}
}
