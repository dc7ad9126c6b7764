package jail

// The cgroup code is written by hand: github.com/containerd/cgroups is not
// served by this project's module proxy, and what is needed (make a
// directory, write four limits, read two counters, remove it) is a few
// file writes per version that are easier to check than a dependency.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// DefaultCgroupRoot is where the kernel's cgroup file systems are mounted.
const DefaultCgroupRoot = "/sys/fs/cgroup"

// cpuPeriod is the CFS period: 100 ms, the kernel's default.
const cpuPeriod = 100000

// Limits are one VM cgroup's limits. Zero leaves a limit unset.
type Limits struct {
	// CPUMillis is the CPU quota in thousandths of a CPU: the VM's vCPUs
	// plus the VMM's own share (see Config.CPUOverheadMillis).
	CPUMillis int
	// MemoryBytes is the memory limit: guest memory plus overhead.
	MemoryBytes int64
	// PidsMax bounds the tasks (threads included).
	PidsMax int
	// IOWeight is the relative block I/O weight.
	IOWeight int
}

// quotaUsec is the CFS quota per cpuPeriod.
func (l Limits) quotaUsec() int { return l.CPUMillis * cpuPeriod / 1000 }

// CgroupFile is one cgroup control file, named as in the VM's cgroup
// directory (cpu.max), and the value written to it.
type CgroupFile struct {
	Name, Value string
}

// Files returns the control files that set l's CPU, memory and pids
// limits on a cgroup of version ("1" or "2"), in the order Create writes
// them; unset limits are left out. IOWeight is not among them: its file
// depends on the host's I/O scheduler. A backend whose VMMs' cgroups are
// made by another program (Firecracker's jailer, --cgroup file=value)
// passes these.
func (l Limits) Files(version string) []CgroupFile {
	var files []CgroupFile
	if version == CgroupV2 {
		if l.CPUMillis > 0 {
			files = append(files, CgroupFile{"cpu.max", fmt.Sprintf("%d %d", l.quotaUsec(), cpuPeriod)})
		}
		if l.MemoryBytes > 0 {
			files = append(files, CgroupFile{"memory.max", strconv.FormatInt(l.MemoryBytes, 10)})
		}
	} else {
		if l.CPUMillis > 0 {
			files = append(files, CgroupFile{"cpu.cfs_period_us", strconv.Itoa(cpuPeriod)},
				CgroupFile{"cpu.cfs_quota_us", strconv.Itoa(l.quotaUsec())})
		}
		if l.MemoryBytes > 0 {
			files = append(files, CgroupFile{"memory.limit_in_bytes", strconv.FormatInt(l.MemoryBytes, 10)})
		}
	}
	if l.PidsMax > 0 {
		files = append(files, CgroupFile{"pids.max", strconv.Itoa(l.PidsMax)})
	}
	return files
}

// Usage is what a VM's cgroup has used.
type Usage struct {
	// CPUNanos is the CPU time used by every task of the cgroup since it
	// was made, in nanoseconds.
	CPUNanos uint64
	// MemoryBytes is the memory charged to the cgroup now (guest memory
	// the VMM touched included).
	MemoryBytes uint64
	// Throttled counts the CFS periods in which the quota stopped the
	// cgroup.
	Throttled uint64
}

// v1Controllers are the v1 hierarchies a VM's cgroup is made in; the
// first three are required.
var v1Controllers = []string{"cpu", "memory", "pids", "cpuacct", "blkio"}

// v2Controllers must be enabled in the parent's subtree_control.
var v2Controllers = []string{"cpu", "memory", "pids"}

// Cgroups makes, measures and removes VM cgroups under one parent, on
// cgroup v1 (one directory per hierarchy) or v2 (one directory).
type Cgroups struct {
	root    string
	version string
	parent  string
	// v1 maps each v1 controller present to its hierarchy's directory
	// (controllers mounted together share one).
	v1 map[string]string
	// rmdir removes one cgroup directory; tests on a fake tree swap it.
	rmdir func(string) error
}

// HostCgroupVersion is what "auto" picks for the cgroup file systems
// mounted at root: CgroupV2 when root is itself a v2 mount, CgroupV1 when
// it is not (a v1 or hybrid host).
func HostCgroupVersion(root string) string {
	if _, err := os.Stat(filepath.Join(root, "cgroup.controllers")); err == nil {
		return CgroupV2
	}
	return CgroupV1
}

// NewCgroups returns the VM cgroups under parent, on the cgroup file
// systems mounted at root, of version "1", "2" or "auto" (v2 when root is
// itself a v2 mount, which a hybrid host's root is not).
func NewCgroups(root, version, parent string) (*Cgroups, error) {
	c := &Cgroups{root: root, parent: parent, v1: map[string]string{}, rmdir: unix.Rmdir}
	pureV2 := HostCgroupVersion(root) == CgroupV2
	switch version {
	case CgroupAuto, "":
		version = HostCgroupVersion(root)
	case CgroupV1, CgroupV2:
	default:
		return nil, fmt.Errorf("%w: cgroup version %q: use auto, 1 or 2", types.ErrInvalid, version)
	}
	c.version = version
	if version == CgroupV2 {
		if !pureV2 {
			return nil, fmt.Errorf("%w: cgroup v2 asked for, but %s is not a cgroup v2 mount (no cgroup.controllers); set vmm.<backend>.jail.cgroup_version to auto or 1, or boot the host with systemd.unified_cgroup_hierarchy=1", types.ErrUnavailable, root)
		}
		b, err := os.ReadFile(filepath.Join(root, "cgroup.controllers"))
		if err != nil {
			return nil, fmt.Errorf("reading cgroup v2 controllers: %w", err)
		}
		have := strings.Fields(string(b))
		for _, ctl := range v2Controllers {
			if !slices.Contains(have, ctl) {
				return nil, fmt.Errorf("%w: the cgroup v2 controller %q is not available at %s (it has %q); it is bound to a v1 hierarchy or compiled out: unmount it from v1 or use cgroup_version 1", types.ErrUnavailable, ctl, root, have)
			}
		}
		return c, nil
	}
	for _, ctl := range v1Controllers {
		dir, err := filepath.EvalSymlinks(filepath.Join(root, ctl))
		if err != nil {
			continue
		}
		if fi, err := os.Stat(dir); err == nil && fi.IsDir() {
			c.v1[ctl] = dir
		}
	}
	for _, ctl := range v1Controllers[:3] {
		if c.v1[ctl] == "" {
			return nil, fmt.Errorf("%w: the cgroup v1 %s hierarchy is not mounted at %s; mount it (mount -t cgroup -o %s cgroup %s) or use cgroup v2", types.ErrUnavailable, ctl, filepath.Join(root, ctl), ctl, filepath.Join(root, ctl))
		}
	}
	return c, nil
}

// Version returns "1" or "2".
func (c *Cgroups) Version() string { return c.version }

// Controllers returns the v1 controllers in use, or v2's required ones.
func (c *Cgroups) Controllers() []string {
	if c.version == CgroupV2 {
		return slices.Clone(v2Controllers)
	}
	var out []string
	for _, ctl := range v1Controllers {
		if c.v1[ctl] != "" {
			out = append(out, ctl)
		}
	}
	return out
}

// Path returns name's cgroup as the kernel names it in /proc/PID/cgroup:
// /<parent>/<name>.
func (c *Cgroups) Path(name string) string { return "/" + c.parent + "/" + name }

// Dirs returns name's cgroup directories: one per distinct v1 hierarchy,
// or the one v2 directory. These are what the jailer joins.
func (c *Cgroups) Dirs(name string) []string {
	if c.version == CgroupV2 {
		return []string{filepath.Join(c.root, c.parent, name)}
	}
	var out []string
	for _, ctl := range v1Controllers {
		if d := c.v1[ctl]; d != "" {
			p := filepath.Join(d, c.parent, name)
			if !slices.Contains(out, p) {
				out = append(out, p)
			}
		}
	}
	return out
}

func checkName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("%w: cgroup name %q must be one path element", types.ErrInvalid, name)
	}
	return nil
}

// Create makes name's cgroup (idempotent: an existing one keeps its tasks)
// and sets lim on it. It returns the directories to join.
func (c *Cgroups) Create(name string, lim Limits) ([]string, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	if c.version == CgroupV2 {
		return c.createV2(name, lim)
	}
	return c.createV1(name, lim)
}

func (c *Cgroups) createV2(name string, lim Limits) ([]string, error) {
	ctls := slices.Clone(v2Controllers)
	if lim.IOWeight > 0 {
		ctls = append(ctls, "io")
	}
	enable := "+" + strings.Join(ctls, " +")
	// Controllers reach a child only when enabled in every ancestor's
	// subtree_control; the root and the parent hold no tasks of ours, so
	// v2's no-internal-process rule is kept.
	parent := filepath.Join(c.root, c.parent)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return nil, fmt.Errorf("making cgroup %s: %w", parent, err)
	}
	for dir := c.root; ; {
		if err := writeFile(filepath.Join(dir, "cgroup.subtree_control"), enable); err != nil {
			return nil, fmt.Errorf("enabling cgroup controllers %s in %s: %w; another manager may own this cgroup, set vmm.<backend>.jail.cgroup_parent to one delegated to aetherium", enable, dir, err)
		}
		if dir == parent {
			break
		}
		rel, _ := filepath.Rel(dir, parent)
		dir = filepath.Join(dir, strings.Split(rel, string(filepath.Separator))[0])
	}
	dir := filepath.Join(parent, name)
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("making cgroup %s: %w", dir, err)
	}
	files := [][2]string{}
	for _, f := range lim.Files(CgroupV2) {
		files = append(files, [2]string{f.Name, f.Value})
	}
	if lim.IOWeight > 0 {
		f := "io.weight"
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			if _, err := os.Stat(filepath.Join(dir, "io.bfq.weight")); err == nil {
				f = "io.bfq.weight"
			}
		}
		files = append(files, [2]string{f, "default " + strconv.Itoa(lim.IOWeight)})
	}
	for _, f := range files {
		if err := writeFile(filepath.Join(dir, f[0]), f[1]); err != nil {
			return nil, fmt.Errorf("setting %s of cgroup %s to %s: %w", f[0], dir, f[1], err)
		}
	}
	return []string{dir}, nil
}

func (c *Cgroups) createV1(name string, lim Limits) ([]string, error) {
	if lim.IOWeight > 0 && c.v1["blkio"] == "" {
		return nil, fmt.Errorf("%w: io_weight is set but no cgroup v1 blkio hierarchy is mounted; set vmm.<backend>.jail.io_weight to 0", types.ErrUnavailable)
	}
	if lim.IOWeight > 0 && (lim.IOWeight < 10 || lim.IOWeight > 1000) {
		return nil, fmt.Errorf("%w: io_weight %d: cgroup v1 takes 10–1000", types.ErrInvalid, lim.IOWeight)
	}
	dirs := c.Dirs(name)
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("making cgroup %s: %w", d, err)
		}
	}
	in := func(ctl string) string { return filepath.Join(c.v1[ctl], c.parent, name) }
	files := [][2]string{}
	for _, f := range lim.Files(CgroupV1) {
		// A v1 file is named <controller>.<property>.
		ctl, _, _ := strings.Cut(f.Name, ".")
		files = append(files, [2]string{filepath.Join(in(ctl), f.Name), f.Value})
	}
	if lim.IOWeight > 0 {
		f := filepath.Join(in("blkio"), "blkio.weight")
		if _, err := os.Stat(f); err != nil {
			f = filepath.Join(in("blkio"), "blkio.bfq.weight")
			if _, err := os.Stat(f); err != nil {
				return nil, fmt.Errorf("%w: io_weight is set but this host's block I/O scheduler takes no weight (no blkio.weight or blkio.bfq.weight); use the bfq scheduler or set vmm.<backend>.jail.io_weight to 0", types.ErrUnavailable)
			}
		}
		files = append(files, [2]string{f, strconv.Itoa(lim.IOWeight)})
	}
	for _, f := range files {
		if err := writeFile(f[0], f[1]); err != nil {
			return nil, fmt.Errorf("setting cgroup %s to %s: %w", f[0], f[1], err)
		}
	}
	return dirs, nil
}

// writeFile writes one cgroup control value.
func writeFile(path, value string) error {
	return os.WriteFile(path, []byte(value+"\n"), 0o644)
}

// Procs returns the pids in name's cgroup (across its hierarchies);
// none when it does not exist.
func (c *Cgroups) Procs(name string) ([]int, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	var pids []int
	for _, d := range c.Dirs(name) {
		b, err := os.ReadFile(filepath.Join(d, "cgroup.procs"))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("reading cgroup %s: %w", d, err)
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil && !slices.Contains(pids, pid) {
				pids = append(pids, pid)
			}
		}
	}
	return pids, nil
}

// Remove kills whatever still runs in name's cgroup and removes it. It is
// idempotent: a cgroup that is gone is not an error.
func (c *Cgroups) Remove(name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	// A VM's cgroup holds only its VMM processes, which are ended before
	// this; what is left is a leftover (an escaped helper, a process of a
	// crashed worker) that must not keep the VM's resources.
	deadline := time.Now().Add(5 * time.Second)
	for {
		pids, err := c.Procs(name)
		if err != nil {
			return err
		}
		if len(pids) == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s still holds pids %v after SIGKILL", c.Path(name), pids)
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
	var errs []error
	for _, d := range c.Dirs(name) {
		// The kernel refuses rmdir (EBUSY) for a moment after the last
		// task exits, until the task is released.
		for {
			err := c.rmdir(d)
			if err == nil || errors.Is(err, os.ErrNotExist) {
				break
			}
			if errors.Is(err, unix.EBUSY) && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			errs = append(errs, fmt.Errorf("removing cgroup %s: %w", d, err))
			break
		}
	}
	return errors.Join(errs...)
}

// List returns the names of the cgroups under the parent.
func (c *Cgroups) List() ([]string, error) {
	var names []string
	parents := []string{filepath.Join(c.root, c.parent)}
	if c.version == CgroupV1 {
		parents = nil
		for _, d := range c.Dirs("x") {
			parents = append(parents, filepath.Dir(d))
		}
	}
	for _, p := range parents {
		ents, err := os.ReadDir(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("listing cgroups in %s: %w", p, err)
		}
		for _, e := range ents {
			if e.IsDir() && !slices.Contains(names, e.Name()) {
				names = append(names, e.Name())
			}
		}
	}
	slices.Sort(names)
	return names, nil
}

// Reap removes the cgroups under the parent that live rejects, that hold
// no process and that were made more than grace(name) ago, and returns
// their names. It never kills anything: the parent may be shared with another
// worker on the host, whose VM's cgroup can be empty for the moment
// between its creation and its jailer joining it (grace covers that), and
// the kernel refuses to remove a cgroup that holds a process (rmdir is
// atomic there), so a VM that joined meanwhile keeps its cgroup.
func (c *Cgroups) Reap(live func(name string) bool, grace func(name string) time.Duration) ([]string, error) {
	names, err := c.List()
	if err != nil {
		return nil, err
	}
	var reaped []string
	var errs []error
	for _, n := range names {
		if live(n) {
			continue
		}
		dirs := c.Dirs(n)
		young := false
		for _, d := range dirs {
			if fi, err := os.Stat(d); err == nil && time.Since(fi.ModTime()) < grace(n) {
				young = true
			}
		}
		if young {
			continue
		}
		if pids, err := c.Procs(n); err != nil || len(pids) > 0 {
			continue
		}
		removed := true
		for _, d := range dirs {
			err := c.rmdir(d)
			switch {
			case err == nil, errors.Is(err, os.ErrNotExist):
			case errors.Is(err, unix.EBUSY):
				removed = false // a process is in it: not ours to end
			default:
				removed = false
				errs = append(errs, fmt.Errorf("removing cgroup %s: %w", d, err))
			}
		}
		if removed {
			reaped = append(reaped, n)
		}
	}
	return reaped, errors.Join(errs...)
}

// Usage reads what name's cgroup has used. A cgroup that does not exist
// is types.ErrNotFound.
func (c *Cgroups) Usage(name string) (Usage, error) {
	if err := checkName(name); err != nil {
		return Usage{}, err
	}
	var u Usage
	var err error
	if c.version == CgroupV2 {
		dir := filepath.Join(c.root, c.parent, name)
		var stat map[string]uint64
		if stat, err = readKeyed(filepath.Join(dir, "cpu.stat")); err == nil {
			u.CPUNanos = stat["usage_usec"] * 1000
			u.Throttled = stat["nr_throttled"]
			u.MemoryBytes, err = readUint(filepath.Join(dir, "memory.current"))
		}
	} else {
		acct := c.v1["cpuacct"]
		if acct == "" {
			return u, fmt.Errorf("%w: no cgroup v1 cpuacct hierarchy is mounted, so CPU usage cannot be read", types.ErrNotSupported)
		}
		if u.CPUNanos, err = readUint(filepath.Join(acct, c.parent, name, "cpuacct.usage")); err == nil {
			var stat map[string]uint64
			if stat, err = readKeyed(filepath.Join(c.v1["cpu"], c.parent, name, "cpu.stat")); err == nil {
				u.Throttled = stat["nr_throttled"]
				u.MemoryBytes, err = readUint(filepath.Join(c.v1["memory"], c.parent, name, "memory.usage_in_bytes"))
			}
		}
	}
	if errors.Is(err, os.ErrNotExist) {
		return Usage{}, fmt.Errorf("%w: cgroup %s does not exist (the VM is not running)", types.ErrNotFound, c.Path(name))
	}
	if err != nil {
		return Usage{}, fmt.Errorf("reading the usage of cgroup %s: %w", c.Path(name), err)
	}
	return u, nil
}

func readUint(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
}

// readKeyed reads a "key value" per line file such as cpu.stat.
func readKeyed(path string) (map[string]uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out := map[string]uint64{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), " "); ok {
			if n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64); err == nil {
				out[k] = n
			}
		}
	}
	return out, nil
}
