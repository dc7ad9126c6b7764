package testenv

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aetherium/aetherium-core/pkg/image"
	"github.com/aetherium/aetherium-core/pkg/types"
)

var (
	guestMu    sync.Mutex
	guestImage *image.Manifest
)

// GuestImage returns the default guest image (Debian's cloud kernel, a
// debootstrap minbase rootfs) with this repository's fc-agent, building it
// into the shared cache (image.DefaultCacheDir) on first use. The cache is
// content-addressed, so a machine builds each version of fc-agent once; a
// fresh build runs debootstrap and takes minutes. Later calls in the same
// test binary reuse the result after checking it still verifies.
//
// It skips t (see Skip) when debootstrap or apt are unavailable.
func GuestImage(t testing.TB) *image.Manifest {
	t.Helper()
	guestMu.Lock()
	defer guestMu.Unlock()
	if guestImage != nil && image.Verify(guestImage) == nil {
		return guestImage
	}
	for _, tool := range []string{"debootstrap", "mkfs.ext4", "apt-get", "dpkg-deb"} {
		if _, err := exec.LookPath(tool); err != nil {
			if _, serr := os.Stat("/usr/sbin/" + tool); serr != nil {
				Skip(t, "%s is not installed, so no guest image can be built; run ./scripts/setup.sh", tool)
			}
		}
	}
	if os.Geteuid() != 0 {
		Skip(t, "building a guest image needs root (debootstrap, device nodes, file owners); run the tests as root")
	}
	agent := BuildBinary(t, "fc-agent")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	start := time.Now()
	m, err := image.Build(ctx, image.Options{
		AgentPath: agent,
		Logger:    slog.New(slog.NewTextHandler(testWriter{t}, nil)),
	})
	if errors.Is(err, types.ErrUnavailable) {
		Skip(t, "cannot build the guest image: %v", err)
	}
	if err != nil {
		t.Fatalf("building the guest image: %v", err)
	}
	t.Logf("guest image %s in %s (%s)", m.ID, m.Dir, time.Since(start).Round(time.Millisecond))
	guestImage = m
	return m
}

// testWriter sends log lines to t.Log.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
