package firecracker_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/firecracker"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

// TestSharedFake runs the conformance suite's shared-behaviour cases
// against the fake Firecracker, so that a fix of the shared machinery is
// checked on this backend too where no real Firecracker can run. The fake
// runs the guest's agent inside its own process, so the guest's hostname
// is read from the boot arguments the backend sent.
func TestSharedFake(t *testing.T) {
	t.Parallel()
	cfg := fakeConfig(t)
	vmmtest.RunShared(t, withState(cfg, vmmtest.Harness{
		New: func(t *testing.T) vmm.VMOrchestrator {
			return newOrchestrator(t, cfg)
		},
		Hostname: func(t *testing.T, o vmm.VMOrchestrator, id string) string {
			boot := find(t, requests(t, filepath.Join(cfg.SocketDir, id)), "PUT", "/boot-source")
			for _, p := range bootparams.Parse(boot["boot_args"].(string)) {
				if p.Key == bootparams.Hostname {
					return p.Value
				}
			}
			t.Fatalf("no %s in the boot arguments %q", bootparams.Hostname, boot["boot_args"])
			return ""
		},
	}))
}

// withState completes h with what the shared cases need to reach this
// backend's own state: its lock, record, pidfile and a restart on cfg.
func withState(cfg firecracker.Config, h vmmtest.Harness) vmmtest.Harness {
	h.LockVM = lockVM
	h.RecordPath = func(o vmm.VMOrchestrator, id string) string {
		return filepath.Join(cfg.SocketDir, id, "state.json")
	}
	h.PIDFiles = func(o vmm.VMOrchestrator, id string) []string {
		return []string{filepath.Join(cfg.SocketDir, id, "firecracker.pid")}
	}
	h.Restart = func(t *testing.T, o vmm.VMOrchestrator) vmm.VMOrchestrator {
		require.NoError(t, o.Close())
		n, err := firecracker.New(context.Background(), cfg)
		require.NoError(t, err)
		t.Cleanup(func() { n.Close() })
		return n
	}
	return h
}
