package wiring_test

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/internal/wiring"
	"github.com/aetherium/aetherium-core/pkg/config"
	"github.com/aetherium/aetherium-core/pkg/types"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// TestServiceLeavesProviderToWorker: a service built from a configuration
// whose vmm section names another backend than the workers run (a CLI's
// yaml saying qemu next to docker workers) does not stamp its own
// provider or network default on new VMs: the row shows the backend of the
// worker that claimed the VM.
func TestServiceLeavesProviderToWorker(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	path := s.ConfigFile(t)
	body, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Contains(t, string(body), "provider: docker\n")
	body = []byte(strings.Replace(string(body), "provider: docker\n", "provider: qemu\n", 1) + "network:\n  enabled: true\n")
	require.NoError(t, os.WriteFile(path, body, 0o600))
	cfg, err := config.Load(path)
	require.NoError(t, err)
	require.Equal(t, "qemu", cfg.VMM.Provider)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	svc, err := wiring.OpenService(ctx, cfg, slog.New(slog.DiscardHandler))
	require.NoError(t, err)
	defer svc.Close()
	id, err := svc.CreateVMTask(ctx, "claimed-by-docker", 1, 128)
	require.NoError(t, err)
	task, err := svc.WaitTask(ctx, id)
	require.NoError(t, err)
	require.Equal(t, types.TaskSucceeded, task.State, task.Error)
	vm, err := svc.GetVM(ctx, id)
	require.NoError(t, err)
	require.Equal(t, "docker", vm.Provider, "the row must name the worker's backend, not the client's")
	require.Equal(t, "w1", vm.Owner)
	require.Equal(t, types.NetworkNone, vm.Network, "the docker worker cannot network VMs, whatever the client's network section says")
}
