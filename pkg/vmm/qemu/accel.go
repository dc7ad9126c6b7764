package qemu

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// Accelerator settings.
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// Accel is the accelerator chosen for a host and why.
type Accel struct {
	Name   string // "kvm" or "tcg"
	Reason string
}

// DetectAccel picks KVM only when /dev/kvm opens for reading and writing
// and the CPU advertises hardware virtualization (vmx or svm). A /dev/kvm
// without those flags exists on nested hosts whose KVM runs only
// specially built guests (PVM): stock kernels hang there, so TCG is used.
func DetectAccel() Accel {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return Accel{Name: AccelTCG, Reason: fmt.Sprintf("/dev/kvm is not usable (%v); using software emulation", err)}
	}
	f.Close()
	flag, err := cpuVirtFlag()
	if err != nil {
		return Accel{Name: AccelTCG, Reason: fmt.Sprintf("cannot read CPU flags (%v); using software emulation", err)}
	}
	if flag == "" {
		return Accel{Name: AccelTCG, Reason: "/dev/kvm opens but the CPU has no vmx or svm flag (nested or PVM-only KVM); using software emulation"}
	}
	return Accel{Name: AccelKVM, Reason: fmt.Sprintf("/dev/kvm opens and the CPU has %s", flag)}
}

// cpuVirtFlag returns "vmx", "svm" or "" from /proc/cpuinfo's flags.
func cpuVirtFlag() (string, error) {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "", err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(k) != "flags" {
			continue
		}
		for _, f := range strings.Fields(v) {
			if f == "vmx" || f == "svm" {
				return f, nil
			}
		}
		return "", nil
	}
	return "", sc.Err()
}

// resolveAccel applies the configured setting.
func resolveAccel(setting string) (Accel, error) {
	switch setting {
	case "", AccelAuto:
		return DetectAccel(), nil
	case AccelKVM:
		return Accel{Name: AccelKVM, Reason: "set in configuration"}, nil
	case AccelTCG:
		return Accel{Name: AccelTCG, Reason: "set in configuration"}, nil
	}
	return Accel{}, fmt.Errorf("accelerator %q: use auto, kvm or tcg", setting)
}

// Version returns the first line of `qemu-system-x86_64 --version`.
func Version(ctx context.Context, binary string) (string, error) {
	out, err := exec.CommandContext(ctx, binary, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("running %s --version: %w", binary, err)
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(line), nil
}

// Diagnose checks this host for the qemu backend without starting a VM:
// the accelerator and why, the QEMU binary and its microvm support, and
// the guest image files named in cfg.
func Diagnose(ctx context.Context, cfg Config) []vmm.Check {
	var out []vmm.Check
	add := func(name string, err error, ok, fix string) {
		if err != nil {
			out = append(out, vmm.Check{Name: name, Detail: err.Error(), Fix: fix})
			return
		}
		out = append(out, vmm.Check{Name: name, OK: true, Detail: ok})
	}
	accel, err := resolveAccel(cfg.Accel)
	add("accelerator", err, accel.Name+": "+accel.Reason, "set vmm.qemu.accel to auto, kvm or tcg")
	if err == nil && accel.Name == AccelTCG {
		out[len(out)-1].Detail += " (boots take seconds, not milliseconds)"
	}

	bin := cmp.Or(cfg.Binary, DefaultBinary)
	ver, err := Version(ctx, bin)
	if err == nil {
		var mach []byte
		mach, err = exec.CommandContext(ctx, bin, "-machine", "help").Output()
		if err == nil && !bytes.Contains(mach, []byte("microvm")) {
			err = fmt.Errorf("%s has no microvm machine type", bin)
		}
	}
	add("qemu", err, ver+" with the microvm machine", "Worker can't create VMs: install QEMU with `./scripts/setup.sh` (Debian's qemu-system-x86) or set vmm.qemu.binary")

	var missing []string
	for _, p := range []string{cfg.KernelPath, cfg.InitrdPath, cfg.RootfsPath} {
		if p == "" {
			missing = append(missing, "(not set)")
		} else if _, err := os.Stat(p); err != nil {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		add("guest image", fmt.Errorf("missing: %s", strings.Join(missing, ", ")), "", "Worker can't create VMs: build it with `aether-cli image build` (or `make guest-image`)")
	} else {
		add("guest image", nil, cfg.KernelPath+", "+filepath.Base(cfg.InitrdPath)+", "+filepath.Base(cfg.RootfsPath), "")
	}
	return out
}

// ClockArgs returns kernel parameters a guest needs under accel. Under TCG
// the guest's early TSC calibration against the emulated PIT sometimes
// fails on a loaded host, and the kernel then hangs calibrating its delay
// loop; the guest's TSC is the host's, so its frequency is passed in
// (tsc_early_khz) and the clocksource watchdog, which compares the TSC with
// irregular emulated timer ticks, is told the TSC is reliable.
//
// It does so only when the host's TSC runs at a constant rate that "cpu
// MHz" reports: the CPU flags include constant_tsc and nonstop_tsc and no
// cpufreq driver varies the clock (on such a host "cpu MHz" is the current
// frequency, not the TSC's).
func ClockArgs(accel string) []string {
	if accel != AccelTCG || !steadyTSC() {
		return nil
	}
	khz := hostTSCKHz()
	if khz == 0 {
		return nil
	}
	return []string{fmt.Sprintf("tsc_early_khz=%d", khz), "tsc=reliable"}
}

// steadyTSC reports whether the host's TSC ticks at the rate "cpu MHz"
// shows.
func steadyTSC() bool {
	if _, err := os.Stat("/sys/devices/system/cpu/cpu0/cpufreq"); err == nil {
		return false
	}
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if ok && strings.TrimSpace(k) == "flags" {
			f := " " + v + " "
			return strings.Contains(f, " constant_tsc ") && strings.Contains(f, " nonstop_tsc ")
		}
	}
	return false
}

// hostTSCKHz reads the first CPU's "cpu MHz" from /proc/cpuinfo, or 0.
func hostTSCKHz() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if ok && strings.TrimSpace(k) == "cpu MHz" {
			var mhz float64
			if _, err := fmt.Sscanf(strings.TrimSpace(v), "%g", &mhz); err == nil && mhz > 0 {
				return int(mhz * 1000)
			}
			return 0
		}
	}
	return 0
}
