package chaos

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/client"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/faults"
	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/image"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm/docker"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
)

// Bounds of every wait in the suite. They are far above what a healthy
// run needs (seconds), so that a slow shared machine does not fail the
// suite, and far below the go test timeout, so that a hang fails with a
// message instead of a panic.
const (
	readyTimeout    = 90 * time.Second  // a worker process until its ready file
	pointTimeout    = 90 * time.Second  // a fault point until reached
	terminalTimeout = 90 * time.Second  // a task until it succeeds or fails
	cliTimeout      = 120 * time.Second // any aether-cli process
	// recoveryBound is the most a task may take to finish after the
	// worker restarted (or the service came back), as issue 13 demands.
	recoveryBound = 15 * time.Second
	// Worker settings that make faults show quickly.
	heartbeat       = time.Second
	shutdownTimeout = 2 * time.Second
	deadAfter       = 6 * time.Second
)

// env is one backend's deployment: a private PostgreSQL server and Redis
// server that scenarios stop and start, the shared private dockerd (for
// docker) or the guest image (for qemu), and the built binaries. Worker
// processes are started per scenario.
type env struct {
	t          *testing.T
	provider   string
	pg         *testenv.PostgresServer
	dsn        string
	redis      *testenv.RedisServer
	store      *postgres.Store
	dockerHost string
	docker     *client.Client
	img        *image.Manifest
	workerBin  string
	cliBin     string
	agentBin   string
	jailerBin  string
	dir        string // short: unix socket paths under it must fit 108 bytes
	cliCfg     string
}

func newEnv(t *testing.T, provider string) *env {
	t.Helper()
	e := &env{t: t, provider: provider}
	switch provider {
	case "docker":
		e.dockerHost = testenv.Dockerd(t)
		e.agentBin = testenv.BuildBinary(t, "fc-agent")
		c, err := client.NewClientWithOpts(client.WithHost(e.dockerHost), client.WithAPIVersionNegotiation())
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		e.docker = c
	case "qemu":
		for _, bin := range []string{qemu.DefaultBinary, qemu.DefaultImgBinary} {
			if _, err := exec.LookPath(bin); err != nil {
				testenv.Skip(t, "%s is not installed; run ./scripts/setup.sh", bin)
			}
		}
		if os.Geteuid() != 0 {
			testenv.Skip(t, "the qemu chaos scenarios build a guest image and confine VMs, which needs root; run them as root")
		}
		e.img = testenv.GuestImage(t)
		e.jailerBin = testenv.Jailer(t)
	default:
		t.Fatalf("unknown provider %q", provider)
	}
	e.pg = testenv.StartPostgres(t)
	e.dsn = e.pg.CreateDatabase(t)
	e.redis = testenv.StartRedis(t)
	e.workerBin = testenv.BuildBinary(t, "worker")
	e.cliBin = testenv.BuildBinary(t, "aether-cli")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	require.NoError(t, postgres.MigrateUp(ctx, e.dsn))
	store, err := postgres.Open(ctx, e.dsn)
	require.NoError(t, err)
	t.Cleanup(store.Close)
	e.store = store
	dir, err := os.MkdirTemp("", "aec-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	e.dir = dir
	e.cliCfg = filepath.Join(dir, "cli.yaml")
	require.NoError(t, os.WriteFile(e.cliCfg, []byte(e.config("cli", filepath.Join(dir, "cli-vms"), "")), 0o600))
	return e
}

// config renders an aetherium.yaml for a worker (or the CLI) of this env.
func (e *env) config(id, runDir, readyFile string) string {
	u, err := url.Parse(e.dsn)
	require.NoError(e.t, err)
	var b strings.Builder
	fmt.Fprintf(&b, "vmm:\n  provider: %s\n", e.provider)
	switch e.provider {
	case "docker":
		fmt.Fprintf(&b, "  docker:\n    host: %q\n    agent_path: %q\n    socket_dir: %q\n", e.dockerHost, e.agentBin, runDir)
	case "qemu":
		fmt.Fprintf(&b, "  qemu:\n    kernel_path: %q\n    initrd_path: %q\n    rootfs_path: %q\n    run_dir: %q\n    jail:\n      binary: %q\n",
			e.img.KernelPath(), e.img.InitrdPath(), e.img.RootfsPath(), runDir, e.jailerBin)
	}
	fmt.Fprintf(&b, "queue:\n  redis_addr: %q\n", e.redis.Addr())
	fmt.Fprintf(&b, "storage:\n  host: %s\n  port: %s\n  database: %s\n  user: %s\n  sslmode: disable\n",
		u.Hostname(), u.Port(), strings.TrimPrefix(u.Path, "/"), u.User.Username())
	fmt.Fprintf(&b, "worker:\n  id: %s\n  data_listen: \"off\"\n  metrics_listen: \"off\"\n  heartbeat_interval: %s\n  shutdown_timeout: %s\n  dead_after: %s\n",
		id, heartbeat, shutdownTimeout, deadAfter)
	if readyFile != "" {
		fmt.Fprintf(&b, "  ready_file: %q\n", readyFile)
	}
	// Beside the run dir, not the machine's default.
	fmt.Fprintf(&b, "  snapshot_dir: %q\n", filepath.Join(filepath.Dir(runDir), "snapshots"))
	b.WriteString("log:\n  level: debug\n")
	return b.String()
}

// processEnv is this process's environment without any AETHERIUM_*
// variable (the binaries reject unknown ones, and a developer's
// AETHERIUM_CONFIG must not leak in), plus extra.
func processEnv(extra ...string) []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "AETHERIUM_") {
			out = append(out, kv)
		}
	}
	return append(out, extra...)
}

// workerProc is one worker id, run as a real process any number of times
// (a restart is a new process with the same id, config and run dir).
type workerProc struct {
	e        *env
	t        *testing.T
	id       string
	dir      string
	runDir   string
	faultDir string
	cfgPath  string
	logPath  string
	ready    string

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

// newWorker prepares worker id for t; Start runs it. When t ends the
// worker's VMs are deleted (through a running worker) and the process is
// stopped, so that a failed scenario leaks nothing into the next.
func (e *env) newWorker(t *testing.T, id string) *workerProc {
	t.Helper()
	return e.newWorkerWith(t, id, "")
}

// newWorkerWith is newWorker with extra top-level YAML sections (e.g. a
// network section) appended to the worker's config.
func (e *env) newWorkerWith(t *testing.T, id, extra string) *workerProc {
	t.Helper()
	dir := filepath.Join(e.dir, id)
	w := &workerProc{e: e, t: t, id: id, dir: dir, runDir: filepath.Join(dir, "vms"), faultDir: filepath.Join(dir, "faults"),
		cfgPath: filepath.Join(dir, "worker.yaml"), logPath: filepath.Join(dir, "worker.log"), ready: filepath.Join(dir, "worker.ready")}
	require.NoError(t, os.MkdirAll(w.runDir, 0o755))
	require.NoError(t, os.WriteFile(w.cfgPath, []byte(e.config(id, w.runDir, w.ready)+extra), 0o600))
	t.Cleanup(func() {
		if t.Failed() || os.Getenv("CHAOS_DEBUG") != "" {
			t.Logf("worker %s log ends with:\n%s", id, tail(w.logPath, 60))
		}
		w.cleanup()
	})
	return w
}

// Start runs the worker process with the given fault points enabled and
// waits for its ready file.
func (w *workerProc) Start(points ...string) {
	t := w.t
	t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	require.Nil(t, w.cmd, "worker %s already runs", w.id)
	require.NoError(t, os.RemoveAll(w.faultDir))
	require.NoError(t, os.MkdirAll(w.faultDir, 0o755))
	_ = os.Remove(w.ready)
	logf, err := os.OpenFile(w.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	require.NoError(t, err)
	fmt.Fprintf(logf, "---- start %s points=%v\n", time.Now().Format(time.RFC3339Nano), points)
	cmd := exec.Command(w.e.workerBin)
	cmd.Env = processEnv("AETHERIUM_CONFIG="+w.cfgPath,
		faults.DirEnv+"="+w.faultDir, faults.PointsEnv+"="+strings.Join(points, ","))
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, so a SIGTERM to the test does not reach it;
	// no Pdeathsig: VMMs must survive a worker's death as in production.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, cmd.Start())
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(exited) }()
	w.cmd, w.exited = cmd, exited
	deadline := time.Now().Add(readyTimeout)
	for {
		if _, err := os.Stat(w.ready); err == nil {
			return
		}
		select {
		case <-exited:
			t.Fatalf("worker %s exited before it was ready; its log ends with:\n%s", w.id, tail(w.logPath, 40))
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("worker %s not ready after %s; its log ends with:\n%s", w.id, readyTimeout, tail(w.logPath, 40))
		}
	}
}

// Kill sends SIGKILL to the worker's pid and waits for it to be gone.
func (w *workerProc) Kill() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.cmd == nil {
		return
	}
	_ = syscall.Kill(w.cmd.Process.Pid, syscall.SIGKILL)
	<-w.exited
	w.cmd, w.exited = nil, nil
}

// Term sends SIGTERM to the worker's pid and returns at once; Wait waits
// for the exit.
func (w *workerProc) Term() {
	w.mu.Lock()
	defer w.mu.Unlock()
	require.NotNil(w.t, w.cmd, "worker %s is not running", w.id)
	require.NoError(w.t, syscall.Kill(w.cmd.Process.Pid, syscall.SIGTERM))
}

// Wait waits up to timeout for the process to exit and returns its exit
// code.
func (w *workerProc) Wait(timeout time.Duration) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	require.NotNil(w.t, w.cmd, "worker %s is not running", w.id)
	select {
	case <-w.exited:
	case <-time.After(timeout):
		w.t.Fatalf("worker %s did not exit within %s; its log ends with:\n%s", w.id, timeout, tail(w.logPath, 40))
	}
	code := w.cmd.ProcessState.ExitCode()
	w.cmd, w.exited = nil, nil
	return code
}

// Stop stops a running worker gracefully (SIGTERM, then SIGKILL after a
// bound).
func (w *workerProc) Stop() {
	w.mu.Lock()
	running := w.cmd != nil
	w.mu.Unlock()
	if !running {
		return
	}
	w.Term()
	w.mu.Lock()
	select {
	case <-w.exited:
	case <-time.After(30 * time.Second):
		_ = syscall.Kill(w.cmd.Process.Pid, syscall.SIGKILL)
		<-w.exited
	}
	w.cmd, w.exited = nil, nil
	w.mu.Unlock()
}

// Running reports whether the worker process runs.
func (w *workerProc) Running() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.cmd != nil
}

// WaitReached waits until point was reached n times (see package faults)
// and returns when.
func (w *workerProc) WaitReached(point string, n int) time.Time {
	t := w.t
	t.Helper()
	path := filepath.Join(w.faultDir, point+".reached")
	deadline := time.Now().Add(pointTimeout)
	for {
		if b, err := os.ReadFile(path); err == nil && strings.Count(string(b), "\n") >= n {
			return time.Now()
		}
		w.mu.Lock()
		exited := w.exited
		w.mu.Unlock()
		if exited != nil {
			select {
			case <-exited:
				t.Fatalf("worker %s exited before reaching %s; its log ends with:\n%s", w.id, point, tail(w.logPath, 40))
			default:
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("worker %s did not reach %s within %s; its log ends with:\n%s", w.id, point, pointTimeout, tail(w.logPath, 40))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Release lets the worker go on past point.
func (w *workerProc) Release(point string) {
	require.NoError(w.t, os.WriteFile(filepath.Join(w.faultDir, point+".release"), nil, 0o644))
}

// cleanup deletes whatever VMs of this worker are not deleted yet (with
// the worker running, as an operator would), stops the worker, and as a
// last resort removes the backend's leftovers by hand, so that nothing
// leaks into later scenarios.
func (w *workerProc) cleanup() {
	e, t := w.e, w.t
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, id := range w.vmIDs(ctx) {
		vm, err := e.store.GetVM(ctx, id)
		if err != nil || vm.State == types.VMDeleted {
			continue
		}
		if !w.Running() {
			w.Start()
		}
		if _, stderr, code := e.cli(ctx, "vm", "delete", id, "--wait"); code != 0 {
			t.Logf("cleanup: deleting VM %s: exit %d: %s", id, code, stderr)
		}
	}
	w.Stop()
	for _, p := range w.vmmProcesses("") {
		t.Logf("cleanup: killing leftover VMM process %d: %s", p.pid, p.cmdline)
		_ = syscall.Kill(p.pid, syscall.SIGKILL)
	}
	if e.docker != nil {
		for _, c := range w.containers(ctx, "") {
			_ = e.docker.ContainerRemove(ctx, c, container.RemoveOptions{Force: true})
		}
	}
}

// vmIDs lists the VMs whose owner is this worker, from PostgreSQL.
func (w *workerProc) vmIDs(ctx context.Context) []string {
	var ids []string
	vms, err := w.e.store.ListVMs(ctx, storageFilterAll())
	if err != nil {
		w.t.Logf("listing VMs: %v", err)
		return nil
	}
	for _, v := range vms {
		if v.Owner == w.id || v.Owner == "" {
			ids = append(ids, v.ID)
		}
	}
	return ids
}

type proc struct {
	pid     int
	cmdline string
}

// vmmProcesses returns the VMM and vsock processes (qemu-system,
// vhost-device-vsock, the jailer) that belong to this worker's run dir, or
// to VM vmID when it is not empty: their command line or root names the
// run dir or the VM. None for docker, whose VMMs are containers.
func (w *workerProc) vmmProcesses(vmID string) []proc {
	if w.e.provider != "qemu" {
		return nil
	}
	entries, _ := os.ReadDir("/proc")
	var out []proc
	for _, ent := range entries {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err != nil {
			continue
		}
		cmdline := strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " ")
		if !strings.Contains(cmdline, "qemu-system") && !strings.Contains(cmdline, "vhost-device-vsock") && !strings.Contains(cmdline, "aether-jailer") {
			continue
		}
		root, _ := os.Readlink(filepath.Join("/proc", ent.Name(), "root"))
		where := cmdline + " " + root
		if vmID != "" {
			if strings.Contains(where, vmID) {
				out = append(out, proc{pid, cmdline})
			}
			continue
		}
		if strings.Contains(where, w.runDir) {
			out = append(out, proc{pid, cmdline})
		}
	}
	return out
}

// containers returns the ids of the containers (running or not) of this
// worker in the private dockerd, or of VM vmID when it is not empty.
func (w *workerProc) containers(ctx context.Context, vmID string) []string {
	if w.e.docker == nil {
		return nil
	}
	f := filters.NewArgs(filters.Arg("label", docker.LabelOwner+"="+w.id))
	if vmID != "" {
		f.Add("label", docker.LabelVMID+"="+vmID)
	}
	cs, err := w.e.docker.ContainerList(ctx, container.ListOptions{All: true, Filters: f})
	require.NoError(w.t, err)
	var ids []string
	for _, c := range cs {
		ids = append(ids, c.ID)
	}
	return ids
}

// KillVMM kills VM vmID's VMM as a crash would: the qemu-system process
// (SIGKILL by pid), or the container's init process through the private
// dockerd.
func (w *workerProc) KillVMM(vmID string) {
	t := w.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	switch w.e.provider {
	case "docker":
		cs := w.containers(ctx, vmID)
		require.Len(t, cs, 1, "VM %s has one container", vmID)
		require.NoError(t, w.e.docker.ContainerKill(ctx, cs[0], "KILL"))
	case "qemu":
		b, err := os.ReadFile(filepath.Join(w.runDir, vmID, "qemu.pid"))
		require.NoError(t, err, "VM %s's qemu pidfile", vmID)
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		require.NoError(t, err)
		require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	}
}

// AssertOneVMM checks that exactly one VMM runs for VM vmID (one
// qemu-system process, or one running container), which also proves that
// AssertNoLeaks can see the processes it looks for.
func (w *workerProc) AssertOneVMM(vmID string) {
	t := w.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	switch w.e.provider {
	case "qemu":
		var qemus []proc
		for _, p := range w.vmmProcesses(vmID) {
			if strings.Contains(p.cmdline, "qemu-system") {
				qemus = append(qemus, p)
			}
		}
		require.Len(t, qemus, 1, "one QEMU process for VM %s", vmID)
		var inRunDir bool
		for _, p := range w.vmmProcesses("") {
			inRunDir = inRunDir || p.pid == qemus[0].pid
		}
		require.True(t, inRunDir, "VM %s's QEMU is found by the run dir, as AssertNoLeaks looks: %v", vmID, qemus)
	case "docker":
		f := filters.NewArgs(filters.Arg("label", docker.LabelOwner+"="+w.id), filters.Arg("label", docker.LabelVMID+"="+vmID))
		cs, err := w.e.docker.ContainerList(ctx, container.ListOptions{Filters: f})
		require.NoError(t, err)
		require.Len(t, cs, 1, "one running container for VM %s", vmID)
	}
}

// AssertNoLeaks checks that nothing of the worker's VMs is left: no VMM
// process or container of the worker, nothing of vmIDs in the run dir,
// and no open task of vmIDs.
func (w *workerProc) AssertNoLeaks(vmIDs ...string) {
	t := w.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// A VMM process may take a moment to be reaped after delete returned.
	deadline := time.Now().Add(10 * time.Second)
	for len(w.vmmProcesses("")) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	require.Empty(t, w.vmmProcesses(""), "VMM processes left for worker %s", w.id)
	for _, id := range vmIDs {
		tasks, err := w.e.store.ListTasks(ctx, id)
		require.NoError(t, err)
		for _, task := range tasks {
			require.True(t, task.State == types.TaskSucceeded || task.State == types.TaskFailed,
				"VM %s is gone but its task %s (%s) is %s", id, task.ID, task.Type, task.State)
		}
	}
	require.Empty(t, w.containers(ctx, ""), "containers left for worker %s", w.id)
	entries, err := os.ReadDir(w.runDir)
	require.NoError(t, err)
	var left []string
	for _, ent := range entries {
		left = append(left, ent.Name())
	}
	for _, id := range vmIDs {
		for _, name := range left {
			require.NotContains(t, name, id, "VM %s left %s in the run dir %s", id, name, w.runDir)
		}
	}
	if len(left) > 0 {
		t.Logf("run dir %s holds %v after delete", w.runDir, left)
	}
}

// cliResult is what one aether-cli process did.
type cliResult struct {
	stdout, stderr string
	code           int
	elapsed        time.Duration
}

// told waits (up to cliTimeout) for the aether-cli that waited on a
// command through a fault, logs what it said, and returns it.
func (p *cliProc) told(t *testing.T, what string) cliResult {
	t.Helper()
	ctx, cancel := ctxT(cliTimeout)
	defer cancel()
	r := p.Wait(ctx)
	t.Logf("%s CLI: exit %d after %s, stdout %q, stderr %q", what, r.code, r.elapsed.Round(time.Millisecond), r.stdout, r.stderr)
	return r
}

// cli runs aether-cli with the env's config and returns its output and
// exit code.
func (e *env) cli(ctx context.Context, args ...string) (stdout, stderr string, code int) {
	r := e.cliStart(args...).Wait(ctx)
	return r.stdout, r.stderr, r.code
}

// cliProc is a running aether-cli whose output can be read while it runs.
type cliProc struct {
	cmd            *exec.Cmd
	started        time.Time
	stdout, stderr *syncBuffer
	done           chan struct{}
	res            cliResult
}

func (e *env) cliStart(args ...string) *cliProc {
	e.t.Helper()
	p := &cliProc{stdout: &syncBuffer{}, stderr: &syncBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(e.cliBin, args...)
	p.cmd.Env = processEnv("AETHERIUM_CONFIG=" + e.cliCfg)
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	p.cmd.Stdin = nil
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	p.started = time.Now()
	require.NoError(e.t, p.cmd.Start())
	go func() {
		_ = p.cmd.Wait()
		p.res = cliResult{stdout: p.stdout.String(), stderr: p.stderr.String(), code: p.cmd.ProcessState.ExitCode(), elapsed: time.Since(p.started)}
		close(p.done)
	}()
	return p
}

// Wait waits for the process to exit (killing it by pid after cliTimeout
// or when ctx ends) and returns what it did.
func (p *cliProc) Wait(ctx context.Context) cliResult {
	select {
	case <-p.done:
	case <-ctx.Done():
		_ = syscall.Kill(p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
		p.res.code = -1
		p.res.stderr += "\n(killed by the test: " + ctx.Err().Error() + ")"
	case <-time.After(cliTimeout):
		_ = syscall.Kill(p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
		p.res.code = -1
		p.res.stderr += fmt.Sprintf("\n(killed by the test after %s)", cliTimeout)
	}
	return p.res
}

// WaitOutput waits until the process's stdout contains s.
func (p *cliProc) WaitOutput(t *testing.T, s string) {
	t.Helper()
	deadline := time.Now().Add(pointTimeout)
	for !strings.Contains(p.stdout.String(), s) {
		select {
		case <-p.done:
			t.Fatalf("aether-cli exited (%d) before printing %q: stdout %q stderr %q", p.res.code, s, p.res.stdout, p.res.stderr)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("aether-cli did not print %q within %s: stdout %q stderr %q", s, pointTimeout, p.stdout.String(), p.stderr.String())
		}
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// createVM creates a VM through the CLI and waits until it runs.
func (e *env) createVM(t *testing.T, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	out, stderr, code := e.cli(ctx, "vm", "create", "--name", name, "--network", "none", "--wait")
	require.Equal(t, 0, code, "vm create: %s", stderr)
	id := strings.TrimSpace(out)
	require.NotEmpty(t, id)
	return id
}

// deleteVM deletes a VM through the CLI and checks it ends deleted.
func (e *env) deleteVM(t *testing.T, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	_, stderr, code := e.cli(ctx, "vm", "delete", id, "--wait")
	require.Equal(t, 0, code, "vm delete: %s", stderr)
	e.waitVM(t, id, 30*time.Second, types.VMDeleted)
}

// exec runs a command in a VM through the CLI.
func (e *env) exec(t *testing.T, vmID string, argv ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	return e.cliStart(append([]string{"exec", vmID, "--"}, argv...)...).Wait(ctx)
}

// execWithin is exec with the CLI killed after d.
func (e *env) execWithin(t *testing.T, d time.Duration, vmID string, argv ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return e.cliStart(append([]string{"exec", vmID, "--"}, argv...)...).Wait(ctx)
}

// marker is a file in the guest that a command appends one line to each
// time it runs.
type marker string

func newMarker() marker { return marker(fmt.Sprintf("/tmp/marks-%016x", rand.Uint64())) }

// Shell returns a shell line that marks one run, then runs rest.
func (m marker) Shell(rest string) []string {
	return []string{"sh", "-c", "echo s >> " + string(m) + "; " + rest}
}

// Count counts the marks through a fresh exec.
func (m marker) Count(t *testing.T, e *env, vmID string) int {
	t.Helper()
	return e.countLines(t, vmID, string(m))
}

func (e *env) countLines(t *testing.T, vmID, path string) int {
	t.Helper()
	r := e.exec(t, vmID, "sh", "-c", "cat "+path+" 2>/dev/null | wc -l")
	require.Equal(t, 0, r.code, "counting the lines of %s: %s", path, r.stderr)
	n, err := strconv.Atoi(strings.TrimSpace(r.stdout))
	require.NoError(t, err, "wc -l printed %q", r.stdout)
	return n
}

// waitVM waits until VM id is in one of states and returns it.
func (e *env) waitVM(t *testing.T, id string, timeout time.Duration, states ...types.VMState) *types.VM {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last *types.VM
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		vm, err := e.store.GetVM(ctx, id)
		cancel()
		if err == nil {
			last = vm
			for _, s := range states {
				if vm.State == s {
					return vm
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("VM %s not %v within %s: last %+v (err %v)", id, states, timeout, last, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitTerminal waits until task id has succeeded or failed and returns it
// with when that was seen.
func (e *env) waitTerminal(t *testing.T, id string, timeout time.Duration) (*types.Task, time.Time) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last *types.Task
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		task, err := e.store.GetTask(ctx, id)
		cancel()
		if err == nil {
			last = task
			if task.State == types.TaskSucceeded || task.State == types.TaskFailed {
				return task, time.Now()
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("task %s did not finish within %s: last %+v (err %v)", id, timeout, last, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// execTask returns the newest exec task of a VM, waiting for one newer
// than after to exist.
func (e *env) execTask(t *testing.T, vmID string, after time.Time) *types.Task {
	t.Helper()
	deadline := time.Now().Add(pointTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		tasks, err := e.store.ListTasks(ctx, vmID)
		cancel()
		var newest *types.Task
		for _, task := range tasks {
			if task.Type == types.TaskVMExecute && !task.CreatedAt.Before(after.Add(-time.Second)) && (newest == nil || task.CreatedAt.After(newest.CreatedAt)) {
				newest = task
			}
		}
		if newest != nil {
			return newest
		}
		if time.Now().After(deadline) {
			t.Fatalf("no exec task of VM %s after %s (err %v)", vmID, after, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// execution returns the stored execution of an exec task.
func (e *env) execution(t *testing.T, taskID string) *types.Execution {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	x, err := e.store.GetExecution(ctx, taskID)
	require.NoError(t, err, "the execution of task %s", taskID)
	return x
}

// workerJSON reads `aether-cli workers --json`.
func (e *env) workers(t *testing.T) []types.Worker {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	out, stderr, code := e.cli(ctx, "--json", "workers")
	require.Equal(t, 0, code, "workers: %s", stderr)
	var ws []types.Worker
	require.NoError(t, json.Unmarshal([]byte(out), &ws), "%s", out)
	return ws
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// figure is one measured row of the suite's table.
type figure struct {
	scenario, backend, guarantee string
	recovery                     time.Duration
	note                         string
}

var (
	figuresMu sync.Mutex
	figures   []figure
)

// record adds a row to the table printed at the end of the suite.
func record(t *testing.T, backend, scenario, guarantee string, recovery time.Duration, note string) {
	t.Helper()
	figuresMu.Lock()
	figures = append(figures, figure{scenario, backend, guarantee, recovery, note})
	figuresMu.Unlock()
	t.Logf("CHAOS | %s | %s | %s | %s | %s", scenario, backend, guarantee, recovery.Round(10*time.Millisecond), note)
}

// storageFilterAll lists every VM, deleted ones included.
func storageFilterAll() storage.VMFilter { return storage.VMFilter{IncludeDeleted: true} }
