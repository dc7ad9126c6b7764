package qemu

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// TestMonitorBeforeListen pins the race a restore met in CI: QEMU binds
// its monitor's socket before it listens on it, so the file can exist
// while a connect is refused. A just-started QEMU's monitor is tried
// again until it listens; any other VM's refused socket is an error at
// once.
func TestMonitorBeforeListen(t *testing.T) {
	run := t.TempDir()
	o := &Orchestrator{cfg: Config{RunDir: run}}
	const id = "vm1"
	sock := o.path(id, fileQMP)
	require.NoError(t, os.MkdirAll(filepath.Dir(sock), 0o700))

	// A socket bound and not yet listening, as QEMU's is for a moment.
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	defer syscall.Close(fd)
	require.NoError(t, syscall.Bind(fd, &syscall.SockaddrUnix{Name: sock}))

	err = o.withMonitor(t.Context(), id, func(monitor) error { return nil })
	require.ErrorIs(t, err, syscall.ECONNREFUSED)

	qemu, err := vmutil.SpawnLogged("sleep", []string{"30"}, filepath.Join(run, "log"), filepath.Join(run, "pid"), nil)
	require.NoError(t, err)
	defer qemu.Stop(syscall.SIGKILL, 0)
	go func() {
		time.Sleep(150 * time.Millisecond)
		if syscall.Listen(fd, 1) != nil {
			return
		}
		nfd, _, err := syscall.Accept(fd)
		if err != nil {
			return
		}
		c := os.NewFile(uintptr(nfd), "qmp")
		defer c.Close()
		_, _ = c.WriteString(`{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}` + "\n")
		// Each command is answered with success; go-qemu ends
		// them with no newline.
		dec := json.NewDecoder(c)
		for {
			var cmd map[string]any
			if dec.Decode(&cmd) != nil {
				return
			}
			_, _ = c.WriteString(`{"return": {}}` + "\n")
		}
	}()
	ran := false
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	err = o.withNewMonitor(ctx, id, qemu, func(m monitor) error {
		ran = true
		return m.run("cont", nil, nil, nil)
	})
	require.NoError(t, err)
	require.True(t, ran)
}
