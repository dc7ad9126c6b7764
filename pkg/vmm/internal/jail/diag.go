package jail

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// Diagnose checks what confinement as cfg configures needs of this host,
// without changing anything (doctor). Confinement turned off is a failed
// check: a host running untrusted code must not run that way.
func Diagnose(cfg Config) []vmm.Check {
	var out []vmm.Check
	add := func(name string, err error, ok, fix string) {
		if err != nil {
			out = append(out, vmm.Check{Name: name, Detail: err.Error(), Fix: fix})
			return
		}
		out = append(out, vmm.Check{Name: name, OK: true, Detail: ok})
	}
	if !cfg.On() {
		add("jail", fmt.Errorf("CONFINEMENT IS OFF: every VMM runs as root with no seccomp filter, no jail and no cgroup limits; one guest escape is root on this host"), "",
			"remove `enabled: false` from vmm.<backend>.jail (it is meant for debugging a VMM only)")
		return out
	}
	if err := cfg.Validate(); err != nil {
		add("jail config", err, "", "fix the vmm.<backend>.jail section; every key is documented in aetherium.example.yaml")
		return out
	}
	cfg = cfg.withDefaults()
	add("jail", nil, "on: each VMM runs under its own uid, in a pivot_root jail, behind seccomp, in its own cgroup", "")
	bin, err := FindBinary(cfg.Binary)
	add("jailer binary", err, bin, "build it with `./scripts/build.sh` and install it with `./scripts/setup.sh`, or set vmm.<backend>.jail.binary")

	cg, err := NewCgroups(cfg.CgroupRoot, cfg.CgroupVersion, cfg.CgroupParent)
	if err == nil {
		add("cgroups", nil, fmt.Sprintf("v%s with %s under %s, VM cgroups in /%s", cg.Version(), strings.Join(cg.Controllers(), ", "), cfg.CgroupRoot, cfg.CgroupParent), "")
	} else {
		add("cgroups", err, "", "mount the cgroup controllers cpu, memory and pids (v2: enable them in the root's cgroup.subtree_control)")
	}
	add("jail uid range", checkRange(cfg), fmt.Sprintf("uids %d–%d and gids %d–%d are no host user's or group's", cfg.UIDBase, cfg.UIDBase+cfg.Count-1, cfg.GIDBase, cfg.GIDBase+cfg.Count-1),
		"set vmm.<backend>.jail.uid_base/gid_base to a range no user, group or subuid/subgid range uses")
	mode, err := seccompMode()
	if err == nil && mode == "" {
		err = fmt.Errorf("the kernel reports no Seccomp field in /proc/self/status: it is built without CONFIG_SECCOMP")
	}
	add("seccomp", err, "supported (this process's mode: "+mode+")", "use a kernel built with CONFIG_SECCOMP and CONFIG_SECCOMP_FILTER")
	if err == nil {
		_, perr := Program()
		add("seccomp filter", perr, "the jailer's filter assembles", "report this: the deny-list names a syscall this architecture lacks")
	}
	return out
}

// checkRange fails when a host user, group or subordinate id range falls
// in the jail's range.
func checkRange(cfg Config) error {
	in := func(id, base int) bool { return id >= base && id < base+cfg.Count }
	for _, f := range []struct {
		path  string
		field int
		base  int
	}{{"/etc/passwd", 2, cfg.UIDBase}, {"/etc/group", 2, cfg.GIDBase}} {
		b, err := os.ReadFile(f.path)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(strings.NewReader(string(b)))
		for sc.Scan() {
			parts := strings.Split(sc.Text(), ":")
			if len(parts) <= f.field {
				continue
			}
			if id, err := strconv.Atoi(parts[f.field]); err == nil && in(id, f.base) {
				return fmt.Errorf("%s has %s with id %d inside the jail range", f.path, parts[0], id)
			}
		}
	}
	for _, f := range []struct {
		path string
		base int
	}{{"/etc/subuid", cfg.UIDBase}, {"/etc/subgid", cfg.GIDBase}} {
		b, err := os.ReadFile(f.path)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			parts := strings.Split(line, ":")
			if len(parts) != 3 {
				continue
			}
			start, err1 := strconv.Atoi(parts[1])
			n, err2 := strconv.Atoi(parts[2])
			if err1 == nil && err2 == nil && start < f.base+cfg.Count && f.base < start+n {
				return fmt.Errorf("%s gives %s ids %d–%d, which overlap the jail range", f.path, parts[0], start, start+n-1)
			}
		}
	}
	return nil
}

// seccompMode returns the Seccomp field of /proc/self/status ("" when the
// kernel has none).
func seccompMode() (string, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Seccomp:"); ok {
			return strings.TrimSpace(v), nil
		}
	}
	return "", nil
}
