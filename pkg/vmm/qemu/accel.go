package qemu

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
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
