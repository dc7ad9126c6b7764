package testenv

import (
	"bufio"
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// RawBootMarker is the line fc-agent prints first as /init.
const RawBootMarker = "aetherium-init: start"

// RawQEMUBoot boots kernel and initrd in a bare QEMU microvm (1 vCPU, 256
// MiB, no disk, no agent channel) with the accelerator accel and the
// extra kernel arguments args, and returns the wall time from spawning
// QEMU until fc-agent prints its first line as /init. It is the baseline
// every boot-time figure is compared with, side by side in one run
// (docs/benchmarks.md).
func RawQEMUBoot(tb testing.TB, binary, kernel, initrd, accel string, args ...string) time.Duration {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary,
		"-M", "microvm", "-accel", accel, "-smp", "1", "-m", "256M",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
		"-kernel", kernel, "-initrd", initrd,
		"-append", strings.Join(append([]string{"console=ttyS0", "reboot=t", "panic=-1", "aetherium.init=raw"}, args...), " "))
	out, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatalf("raw boot: %v", err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		tb.Fatalf("raw boot: starting %s: %v", binary, err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if strings.Contains(sc.Text(), RawBootMarker) {
			return time.Since(start)
		}
	}
	tb.Fatalf("raw boot ended without %q: %v", RawBootMarker, sc.Err())
	return 0
}
