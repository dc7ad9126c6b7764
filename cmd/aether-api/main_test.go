package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/apikey"
)

// TestBinary runs the real aether-api against a stack: it serves once
// the ready file exists, authenticates with a key from the store, and
// drains and exits 0 on SIGTERM.
func TestBinary(t *testing.T) {
	s := stack.Start(t, stack.Options{Workers: []string{"bin"}})
	bin := testenv.BuildBinary(t, "aether-api")
	port := testenv.FreePort(t)
	ready := filepath.Join(t.TempDir(), "ready")
	cfg := s.ConfigFile(t)
	f, err := os.OpenFile(cfg, os.O_APPEND|os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = fmt.Fprintf(f, "api:\n  listen: 127.0.0.1:%d\n  ready_file: %s\n  shutdown_timeout: 5s\n", port, ready)
	require.NoError(t, err)
	require.NoError(t, f.Close())

	cmd := exec.Command(bin, "--config", cfg)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	require.Eventually(t, func() bool { _, err := os.Stat(ready); return err == nil }, 30*time.Second, 20*time.Millisecond, "no ready file; output:\n%s", &out)

	_, key, err := apikey.Create(context.Background(), s.Store, apikey.Options{Name: "bin"})
	require.NoError(t, err)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	req, err := http.NewRequest("GET", base+"/v1/vms", nil)
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	resp, err = http.Get(base + "/v1/vms")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)

	// The E2B-compatible API shares the listener (docs/e2b.md).
	req, err = http.NewRequest("GET", base+"/v2/sandboxes", nil)
	require.NoError(t, err)
	req.Header.Set("X-API-KEY", key)
	resp, err = http.DefaultClient.Do(req)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, string(body))
	require.JSONEq(t, `[]`, string(body))
	resp, err = http.Get(base + "/health")
	require.NoError(t, err)
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusBadGateway, resp.StatusCode, "no sandbox named: %s", body)

	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-exited:
		require.NoError(t, err, "output:\n%s", &out)
	case <-time.After(10 * time.Second):
		t.Fatalf("aether-api did not exit within 10s of SIGTERM; output:\n%s", &out)
	}
	_, err = os.Stat(ready)
	require.True(t, os.IsNotExist(err), "the ready file outlives the process")
	require.NotContains(t, out.String(), key[len(key)-43:], "the key must never be logged")
}
