// Package vmmtest is the conformance suite every vmm.VMOrchestrator backend
// runs unchanged: a backend is done when Run passes against it. The helpers
// it exports (NewSpec, StartVM, Exec, Sh) let a backend's own tests add
// checks that only it can make, in the same style.
package vmmtest

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// Harness is how the suite gets at a backend.
type Harness struct {
	// New returns a ready orchestrator. It is called once per Run and must
	// register any cleanup (Close, removing directories) with t.Cleanup.
	// Required.
	New func(t *testing.T) vmm.VMOrchestrator
	// MemoryMB is the memory of the suite's VMs. Default 128.
	MemoryMB int
	// ConcurrentVMs is how many VMs the concurrency test creates at once.
	// Default 5.
	ConcurrentVMs int
	// OpTimeout bounds each orchestrator call, boots included. Slow
	// backends (emulated CPUs) raise it. Default 2 minutes.
	OpTimeout time.Duration
	// Crash kills running VM id's VMM process (QEMU, Firecracker, the
	// container's init) from outside, as a crash would. Required: the suite
	// checks that the backend then reports the VM failed, frees it, and can
	// still delete it.
	Crash func(t *testing.T, o vmm.VMOrchestrator, id string)

	// LockVM takes the backend's own lock of VM id from outside, as a long
	// step of another call would, and returns its release (the backend's
	// export_test.go reaches it). Required.
	LockVM func(o vmm.VMOrchestrator, id string) (unlock func())
	// Hostname returns the hostname VM id's guest was given. Default: the
	// guest's /proc/sys/kernel/hostname, read through ExecuteCommand.
	Hostname func(t *testing.T, o vmm.VMOrchestrator, id string) string
	// RecordPath returns the file of VM id's record; nil for a backend that
	// keeps none (docker: the engine holds the state).
	RecordPath func(o vmm.VMOrchestrator, id string) string
	// PIDFiles returns the pidfiles of VM id's host processes; nil for a
	// backend that adopts no process after a restart (docker).
	PIDFiles func(o vmm.VMOrchestrator, id string) []string
	// Restart closes o and returns a new orchestrator on the same state, as
	// a worker restart does, registering its cleanup. Required with
	// RecordPath or PIDFiles.
	Restart func(t *testing.T, o vmm.VMOrchestrator) vmm.VMOrchestrator
}

func (h *Harness) defaults() {
	h.MemoryMB = cmp.Or(h.MemoryMB, 128)
	h.ConcurrentVMs = cmp.Or(h.ConcurrentVMs, 5)
	h.OpTimeout = cmp.Or(h.OpTimeout, 2*time.Minute)
}

// suite is one run's shared state.
type suite struct {
	h Harness
	o vmm.VMOrchestrator
}

// Run runs the conformance suite against the backend h gives.
func Run(t *testing.T, h Harness) {
	require.NotNil(t, h.New, "Harness.New is required")
	require.NotNil(t, h.Crash, "Harness.Crash is required")
	require.NotNil(t, h.LockVM, "Harness.LockVM is required")
	h.defaults()
	s := &suite{h: h, o: h.New(t)}

	t.Run("Health", s.testHealth)
	t.Run("Capabilities", s.testCapabilities)
	t.Run("Diagnose", s.testDiagnose)
	t.Run("InvalidSpecs", s.testInvalidSpecs)
	t.Run("UnknownVM", s.testUnknownVM)
	t.Run("Lifecycle", s.testLifecycle)
	t.Run("ExecNotRunning", s.testExecNotRunning)
	t.Run("ExecDeleted", s.testExecDeleted)
	t.Run("Concurrent", s.testConcurrent)
	t.Run("Exec", s.testExec)
	t.Run("Crash", s.testCrash)
	t.Run("Shared", s.runShared)
	t.Run("Snapshotter", s.testSnapshotter)
}

// ctx returns a context bounded by the harness's operation timeout.
func (s *suite) ctx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), s.h.OpTimeout)
	t.Cleanup(cancel)
	return ctx
}

func (s *suite) spec(t *testing.T) types.VMSpec {
	sp := NewSpec(t)
	sp.MemoryMB = s.h.MemoryMB
	return sp
}

func (s *suite) testHealth(t *testing.T) {
	t.Parallel()
	require.NoError(t, s.o.Health(s.ctx(t)))
}

func (s *suite) testCapabilities(t *testing.T) {
	t.Parallel()
	c := s.o.Capabilities()
	require.NotEmpty(t, c.Provider)
	require.Positive(t, c.MaxVCPUs)
	require.Contains(t, []string{"container", "vm"}, c.Isolation)
	_, ok := vmm.AsSnapshotter(s.o)
	require.Equal(t, c.PauseResume || c.Snapshot, ok, "Capabilities describes the Snapshotter truthfully")
}

// testDiagnose: every backend reports on its host in the same shape.
func (s *suite) testDiagnose(t *testing.T) {
	t.Parallel()
	d, ok := s.o.(vmm.Diagnoser)
	require.True(t, ok, "every backend implements vmm.Diagnoser")
	checks := d.Diagnose(s.ctx(t))
	require.NotEmpty(t, checks)
	for _, c := range checks {
		require.NotEmpty(t, c.Name)
		if !c.OK {
			require.NotEmpty(t, c.Fix, "a failed check %q says how to fix it", c.Name)
		}
	}
}

// testInvalidSpecs: an invalid spec returns ErrInvalid and leaves nothing.
func (s *suite) testInvalidSpecs(t *testing.T) {
	t.Parallel()
	maxVCPUs := s.o.Capabilities().MaxVCPUs
	cases := []struct {
		name   string
		modify func(*types.VMSpec)
	}{
		{"zero vcpus", func(sp *types.VMSpec) { sp.VCPUs = 0 }},
		{"too many vcpus", func(sp *types.VMSpec) { sp.VCPUs = maxVCPUs + 1 }},
		{"too little memory", func(sp *types.VMSpec) { sp.MemoryMB = 32 }},
		{"empty name", func(sp *types.VMSpec) { sp.Name = "" }},
		{"64-character name", func(sp *types.VMSpec) { sp.Name = strings.Repeat("a", 64) }},
		{"name with uppercase and underscore", func(sp *types.VMSpec) { sp.Name = "Bad_Name" }},
		{"bad env name", func(sp *types.VMSpec) { sp.Env = map[string]string{"1X": "y"} }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := s.ctx(t)
			sp := s.spec(t)
			tc.modify(&sp)
			st, err := s.o.CreateVM(ctx, sp)
			if err == nil {
				s.o.DeleteVM(ctx, sp.ID)
			}
			require.ErrorIs(t, err, types.ErrInvalid)
			require.Nil(t, st)
			_, err = s.o.GetVMStatus(ctx, sp.ID)
			require.ErrorIs(t, err, types.ErrNotFound, "an invalid spec left a VM behind")
			require.NotContains(t, listIDs(t, s.o), sp.ID)
		})
	}
}

// testUnknownVM: every method reports an unknown id the way the contract
// says.
func (s *suite) testUnknownVM(t *testing.T) {
	t.Parallel()
	ctx := s.ctx(t)
	id := NewSpec(t).ID
	_, err := s.o.GetVMStatus(ctx, id)
	require.ErrorIs(t, err, types.ErrNotFound, "GetVMStatus")
	require.ErrorIs(t, s.o.StartVM(ctx, id), types.ErrNotFound, "StartVM")
	require.ErrorIs(t, s.o.StopVM(ctx, id, false), types.ErrNotFound, "StopVM")
	require.ErrorIs(t, s.o.StopVM(ctx, id, true), types.ErrNotFound, "StopVM force")
	_, err = s.o.ExecuteCommand(ctx, id, types.Command{Cmd: "true"}, vmm.ExecIO{})
	require.ErrorIs(t, err, types.ErrNotFound, "ExecuteCommand")
	_, err = s.o.WriteFile(ctx, id, "/tmp/x", strings.NewReader("x"), types.FileOptions{})
	require.ErrorIs(t, err, types.ErrNotFound, "WriteFile")
	_, err = s.o.ReadFile(ctx, id, "/etc/hostname", io.Discard)
	require.ErrorIs(t, err, types.ErrNotFound, "ReadFile")
	_, err = s.o.DialAgent(ctx, id)
	require.ErrorIs(t, err, types.ErrNotFound, "DialAgent")
	require.NoError(t, s.o.DeleteVM(ctx, id), "DeleteVM of an unknown id must succeed")
}

// testLifecycle walks one VM through every step, each called twice.
func (s *suite) testLifecycle(t *testing.T) {
	t.Parallel()
	ctx := s.ctx(t)
	sp := s.spec(t)
	sp.Labels = map[string]string{"team": "core", "app.kubernetes.io/name": "web"}
	t.Cleanup(func() { s.o.DeleteVM(context.WithoutCancel(ctx), sp.ID) })

	for i := range 2 {
		st, err := s.o.CreateVM(ctx, sp)
		require.NoError(t, err, "CreateVM #%d", i+1)
		require.Equal(t, sp.ID, st.ID)
		require.Equal(t, sp.Name, st.Name)
		require.Equal(t, sp.Labels, st.Labels)
		require.NotEqual(t, types.VMRunning, st.State, "CreateVM must not boot the VM")
		require.NotEqual(t, types.VMFailed, st.State, st.Detail)
	}
	require.Contains(t, listIDs(t, s.o), sp.ID)

	for i := range 2 {
		require.NoError(t, s.o.StartVM(ctx, sp.ID), "StartVM #%d", i+1)
		RequireState(t, s.o, sp.ID, types.VMRunning)
	}
	require.Equal(t, "ok\n", Sh(t, s.o, sp.ID, "echo ok"))

	for i := range 2 {
		require.NoError(t, s.o.StopVM(ctx, sp.ID, false), "graceful StopVM #%d", i+1)
		RequireState(t, s.o, sp.ID, types.VMStopped)
	}

	// A stopped VM starts again.
	require.NoError(t, s.o.StartVM(ctx, sp.ID), "StartVM after StopVM")
	RequireState(t, s.o, sp.ID, types.VMRunning)
	require.Equal(t, "again\n", Sh(t, s.o, sp.ID, "echo again"))

	for i := range 2 {
		require.NoError(t, s.o.StopVM(ctx, sp.ID, true), "forced StopVM #%d", i+1)
		RequireState(t, s.o, sp.ID, types.VMStopped)
	}

	for i := range 2 {
		require.NoError(t, s.o.DeleteVM(ctx, sp.ID), "DeleteVM #%d", i+1)
		_, err := s.o.GetVMStatus(ctx, sp.ID)
		require.ErrorIs(t, err, types.ErrNotFound)
	}
	require.NotContains(t, listIDs(t, s.o), sp.ID)
}

// testExecNotRunning: exec on a VM that exists but does not run is a
// conflict, both before its first boot and after a stop.
func (s *suite) testExecNotRunning(t *testing.T) {
	t.Parallel()
	ctx := s.ctx(t)
	sp := s.spec(t)
	t.Cleanup(func() { s.o.DeleteVM(context.WithoutCancel(ctx), sp.ID) })
	_, err := s.o.CreateVM(ctx, sp)
	require.NoError(t, err)
	_, err = s.o.ExecuteCommand(ctx, sp.ID, types.Command{Cmd: "true"}, vmm.ExecIO{})
	require.ErrorIs(t, err, types.ErrConflict, "exec before the first start")

	require.NoError(t, s.o.StartVM(ctx, sp.ID))
	require.NoError(t, s.o.StopVM(ctx, sp.ID, false))
	_, err = s.o.ExecuteCommand(ctx, sp.ID, types.Command{Cmd: "true"}, vmm.ExecIO{})
	require.ErrorIs(t, err, types.ErrConflict, "exec on a stopped VM")
	require.Contains(t, err.Error(), "start it", "the message should say what to do")
	_, err = s.o.WriteFile(ctx, sp.ID, "/tmp/x", strings.NewReader("x"), types.FileOptions{})
	require.ErrorIs(t, err, types.ErrConflict, "WriteFile on a stopped VM")
	_, err = s.o.ReadFile(ctx, sp.ID, "/etc/hostname", io.Discard)
	require.ErrorIs(t, err, types.ErrConflict, "ReadFile on a stopped VM")
	_, err = s.o.DialAgent(ctx, sp.ID)
	require.ErrorIs(t, err, types.ErrConflict, "DialAgent on a stopped VM")
}

// testExecDeleted: once deleted, a VM is unknown.
func (s *suite) testExecDeleted(t *testing.T) {
	t.Parallel()
	ctx := s.ctx(t)
	id := StartVM(t, s.o, s.spec(t))
	require.NoError(t, s.o.DeleteVM(ctx, id))
	_, err := s.o.ExecuteCommand(ctx, id, types.Command{Cmd: "true"}, vmm.ExecIO{})
	require.ErrorIs(t, err, types.ErrNotFound)
	require.NotContains(t, listIDs(t, s.o), id)
}

// testConcurrent creates and boots several VMs at once; each must run
// commands of its own.
func (s *suite) testConcurrent(t *testing.T) {
	t.Parallel()
	ctx := s.ctx(t)
	specs := make([]types.VMSpec, s.h.ConcurrentVMs)
	for i := range specs {
		specs[i] = s.spec(t)
		specs[i].Env = map[string]string{"VM_INDEX": strconv.Itoa(i)}
		id := specs[i].ID
		t.Cleanup(func() { s.o.DeleteVM(context.WithoutCancel(ctx), id) })
	}
	errs := make([]error, len(specs))
	var wg sync.WaitGroup
	for i, sp := range specs {
		wg.Go(func() {
			if _, err := s.o.CreateVM(ctx, sp); err != nil {
				errs[i] = err
				return
			}
			errs[i] = s.o.StartVM(ctx, sp.ID)
		})
	}
	wg.Wait()
	for i, err := range errs {
		require.NoError(t, err, "VM %d (%s)", i, specs[i].ID)
	}
	ids := listIDs(t, s.o)
	for i, sp := range specs {
		require.Contains(t, ids, sp.ID)
		RequireState(t, s.o, sp.ID, types.VMRunning)
		require.Equal(t, strconv.Itoa(i)+"\n", Sh(t, s.o, sp.ID, "echo $VM_INDEX"))
	}
}

// testCrash: a VM whose VMM dies without being asked turns failed, exec on
// it fails with a clear error, and delete still removes it.
func (s *suite) testCrash(t *testing.T) {
	t.Parallel()
	ctx := s.ctx(t)
	id := StartVM(t, s.o, s.spec(t))
	s.h.Crash(t, s.o, id)
	require.Eventually(t, func() bool {
		st, err := s.o.GetVMStatus(ctx, id)
		return err == nil && st.State == types.VMFailed
	}, 30*time.Second, 20*time.Millisecond, "a crashed VM must be reported failed")
	st, err := s.o.GetVMStatus(ctx, id)
	require.NoError(t, err)
	require.NotEmpty(t, st.Detail, "a failed VM says why")
	_, err = s.o.ExecuteCommand(ctx, id, types.Command{Cmd: "true"}, vmm.ExecIO{})
	require.ErrorIs(t, err, types.ErrConflict, "exec on a crashed VM")
	require.NoError(t, s.o.DeleteVM(ctx, id))
	require.NoError(t, s.o.DeleteVM(ctx, id), "delete is idempotent")
	_, err = s.o.GetVMStatus(ctx, id)
	require.ErrorIs(t, err, types.ErrNotFound)
}

// testExec runs the command checks in parallel on one shared VM.
func (s *suite) testExec(t *testing.T) {
	sp := s.spec(t)
	sp.Env = map[string]string{"AETHERIUM_VM_ENV": "from-spec", "SHADOWED": "vm"}
	id := StartVM(t, s.o, sp)
	for _, tc := range []struct {
		name string
		fn   func(*testing.T, string)
	}{
		{"RoundTrip", s.testRoundTrip},
		{"Stdin", s.testStdin},
		{"EnvCwd", s.testEnvCwd},
		{"CannotStart", s.testCannotStart},
		{"Timeout", s.testTimeout},
		{"OutputCap", s.testOutputCap},
		{"Streaming", s.testStreaming},
		{"AtMostOnce", s.testAtMostOnce},
		{"Files", s.testFiles},
		{"DialAgent", s.testDialAgent},
		{"Limits", func(t *testing.T, id string) { s.testLimits(t, id, sp) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(t, id)
		})
	}
}

// testFiles writes and reads files in the guest: binary content survives
// both ways, modes and owners are applied, and each failure has its kind.
func (s *suite) testFiles(t *testing.T, id string) {
	ctx := s.ctx(t)
	content := make([]byte, 3<<20+17) // several chunks, not a multiple of any
	rand.Read(content)
	content[0], content[len(content)/2], content[len(content)-1] = 0, 0, 0
	dir := "/tmp/vmmtest-" + hex.EncodeToString(content[1:7])

	t.Run("RoundTrip", func(t *testing.T) {
		p := dir + "/bin.dat"
		n, err := s.o.WriteFile(ctx, id, p, bytes.NewReader(content), types.FileOptions{Mode: 0o600, MakeParents: true})
		require.NoError(t, err)
		require.EqualValues(t, len(content), n)
		var got bytes.Buffer
		n, err = s.o.ReadFile(ctx, id, p, &got)
		require.NoError(t, err)
		require.EqualValues(t, len(content), n)
		require.True(t, bytes.Equal(content, got.Bytes()), "content changed on the way")
		require.Equal(t, "600 0\n", Sh(t, s.o, id, "stat -c '%a %u' "+p))
	})
	t.Run("ModeAndUser", func(t *testing.T) {
		p := dir + "/owned/sub/f"
		_, err := s.o.WriteFile(ctx, id, p, strings.NewReader("#!/bin/sh\n"), types.FileOptions{Mode: 0o750, User: "4321", MakeParents: true})
		require.NoError(t, err)
		require.Equal(t, "750 4321\n755 4321\n", Sh(t, s.o, id, "stat -c '%a %u' "+p+" "+dir+"/owned"))
	})
	t.Run("Errors", func(t *testing.T) {
		tests := []struct {
			name    string
			write   bool
			path    string
			parents bool
			kind    error
			msg     string
		}{
			{name: "write below a missing directory", write: true, path: dir + "/missing/f", kind: types.ErrNotFound, msg: "does not exist"},
			{name: "write relative", write: true, path: "tmp/f", parents: true, kind: types.ErrInvalid, msg: "relative"},
			{name: "read missing", path: dir + "/nosuch", kind: types.ErrNotFound},
			{name: "read relative", path: "etc/hostname", kind: types.ErrInvalid, msg: "relative"},
			{name: "read a directory", path: "/tmp", kind: types.ErrInvalid, msg: "directory"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				var err error
				var out bytes.Buffer
				if tt.write {
					_, err = s.o.WriteFile(ctx, id, tt.path, strings.NewReader("x"), types.FileOptions{MakeParents: tt.parents})
				} else {
					_, err = s.o.ReadFile(ctx, id, tt.path, &out)
				}
				require.ErrorIs(t, err, tt.kind)
				require.ErrorContains(t, err, tt.msg)
				require.Zero(t, out.Len(), "nothing is written when the file cannot be read")
			})
		}
		_, err := s.o.WriteFile(ctx, id, dir+"/made/f", strings.NewReader("x"), types.FileOptions{MakeParents: true})
		require.NoError(t, err, "MakeParents creates the missing directory")
	})
}

// testDialAgent: DialAgent yields a connection that an agent.Client of the
// caller's own can speak over, independent of the backend's: closing it
// leaves the backend's exec path working.
func (s *suite) testDialAgent(t *testing.T, id string) {
	ctx := s.ctx(t)
	conn, err := s.o.DialAgent(ctx, id)
	require.NoError(t, err)
	// gRPC dials again after a broken connection; this client must get
	// exactly the one conn DialAgent gave.
	var used atomic.Bool
	c, err := agent.NewClient(func(context.Context) (net.Conn, error) {
		if used.Swap(true) {
			return nil, errors.New("the test's one connection is used up")
		}
		return conn, nil
	})
	require.NoError(t, err)
	info, err := c.Info(ctx)
	require.NoError(t, err, "Info over the dialled connection")
	require.NotEmpty(t, info.GetVersion())
	require.NoError(t, c.Close())

	// Each call is a fresh connection: a client redialling through
	// DialAgent works as the backend's own does.
	c, err = agent.NewClient(func(ctx context.Context) (net.Conn, error) { return s.o.DialAgent(ctx, id) })
	require.NoError(t, err)
	defer c.Close()
	res, err := c.Exec(ctx, types.Command{Cmd: "sh", Args: []string{"-c", "echo dialled"}}, nil, nil)
	require.NoError(t, err)
	require.Equal(t, "dialled\n", string(res.Stdout))
	require.Equal(t, "backend\n", Sh(t, s.o, id, "echo backend"), "the backend's own client is untouched")
}

func (s *suite) testRoundTrip(t *testing.T, id string) {
	res := Exec(t, s.o, id, types.Command{Cmd: "sh", Args: []string{"-c", "echo out; echo err >&2; exit 3"}})
	require.Equal(t, "out\n", string(res.Stdout))
	require.Equal(t, "err\n", string(res.Stderr))
	require.Equal(t, 3, res.ExitCode)
	require.False(t, res.TimedOut)
	require.False(t, res.StdoutTruncated || res.StderrTruncated)
	require.False(t, res.StartedAt.IsZero())
	require.False(t, res.FinishedAt.Before(res.StartedAt))
}

func (s *suite) testStdin(t *testing.T, id string) {
	in := []byte("line one\nline two\n" + strings.Repeat("x", 100_000) + "\n")
	res := Exec(t, s.o, id, types.Command{Cmd: "cat", Stdin: in})
	require.Equal(t, 0, res.ExitCode, string(res.Stderr))
	require.Equal(t, string(in), string(res.Stdout))
}

func (s *suite) testEnvCwd(t *testing.T, id string) {
	res := Exec(t, s.o, id, types.Command{
		Cmd:  "sh",
		Args: []string{"-c", `echo "$FOO|$AETHERIUM_VM_ENV|$SHADOWED"; pwd`},
		Env:  map[string]string{"FOO": "bar baz", "SHADOWED": "command"},
		Cwd:  "/tmp",
	})
	require.Equal(t, 0, res.ExitCode, string(res.Stderr))
	require.Equal(t, "bar baz|from-spec|command\n/tmp\n", string(res.Stdout),
		"want the command's env, the VM's env beneath it, and the working directory")
}

// testCannotStart: a missing program exits 127 with the reason on stderr,
// as in a shell; a request that cannot run as given (a missing working
// directory) is an error of kind ErrInvalid, not an exit code.
func (s *suite) testCannotStart(t *testing.T, id string) {
	res := Exec(t, s.o, id, types.Command{Cmd: "/no/such/program"})
	require.Equal(t, 127, res.ExitCode)
	require.Equal(t, "aetherium: /no/such/program: no such file or directory\n", string(res.Stderr))
	_, err := s.o.ExecuteCommand(s.ctx(t), id, types.Command{Cmd: "true", Cwd: "/no/such/dir"}, vmm.ExecIO{})
	require.ErrorIs(t, err, types.ErrInvalid)
}

// testTimeout: a command that overruns its timeout is killed with its whole
// process group, and the call returns promptly.
func (s *suite) testTimeout(t *testing.T, id string) {
	start := time.Now()
	res := Exec(t, s.o, id, types.Command{
		Cmd:     "sh",
		Args:    []string{"-c", "echo $$ > /tmp/timeout-shell.pid; sleep 61 & echo $! > /tmp/timeout-child.pid; sleep 60"},
		Timeout: 2 * time.Second,
	})
	elapsed := time.Since(start)
	require.True(t, res.TimedOut, "TimedOut")
	require.Less(t, elapsed, 5*time.Second)
	require.GreaterOrEqual(t, elapsed, 2*time.Second)
	require.NotEqual(t, 0, res.ExitCode)

	// Neither the shell nor its background child may survive. Allow a
	// moment for the guest's init to reap them.
	check := `for f in /tmp/timeout-shell.pid /tmp/timeout-child.pid; do
		p=$(cat $f) || exit 2
		if [ -d /proc/$p ] && ! grep -q '^State:.*Z' /proc/$p/status 2>/dev/null; then echo "$f: $p alive"; fi
	done`
	deadline := time.Now().Add(5 * time.Second)
	for out := Sh(t, s.o, id, check); out != ""; out = Sh(t, s.o, id, check) {
		if time.Now().After(deadline) {
			t.Fatalf("processes left after the timeout:\n%s", out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// testOutputCap: output beyond the cap is dropped and flagged, exactly at
// the cap.
func (s *suite) testOutputCap(t *testing.T, id string) {
	const capBytes = 1 << 20
	res := Exec(t, s.o, id, types.Command{
		Cmd:            "sh",
		Args:           []string{"-c", "head -c 5242880 /dev/zero; head -c 100 /dev/zero >&2"},
		MaxOutputBytes: capBytes,
	})
	require.Equal(t, 0, res.ExitCode, string(res.Stderr))
	require.Len(t, res.Stdout, capBytes)
	require.True(t, res.StdoutTruncated, "StdoutTruncated")
	require.Len(t, res.Stderr, 100)
	require.False(t, res.StderrTruncated, "StderrTruncated")
}

// testStreaming: output reaches the ExecIO writers while the command still
// runs.
func (s *suite) testStreaming(t *testing.T, id string) {
	w := &signalWriter{first: make(chan struct{})}
	done := make(chan struct{})
	var res *types.ExecResult
	var err error
	go func() {
		defer close(done)
		res, err = s.o.ExecuteCommand(s.ctx(t), id, types.Command{Cmd: "sh", Args: []string{"-c", "echo first; sleep 3; echo second"}}, vmm.ExecIO{Stdout: w})
	}()
	select {
	case <-w.first:
	case <-done:
		t.Fatalf("the command ended (err %v) before any output was streamed", err)
	case <-time.After(s.h.OpTimeout):
		t.Fatal("no output was streamed")
	}
	select {
	case <-done:
		t.Fatal("the first line arrived only after the command ended")
	default:
	}
	require.True(t, strings.HasPrefix(w.String(), "first\n"), "streamed %q", w.String())
	<-done
	require.NoError(t, err)
	require.Equal(t, "first\nsecond\n", string(res.Stdout))
	require.Equal(t, "first\nsecond\n", w.String(), "the stream should carry all output")
}

// testAtMostOnce: a command named by an execution id runs once. A caller
// that detaches leaves it running; a second call with the id reattaches,
// replaying the output from the start, and gets the original exit; a
// reattach-only call for an unknown id starts nothing.
func (s *suite) testAtMostOnce(t *testing.T, id string) {
	execID := fmt.Sprintf("vmmtest-%d", time.Now().UnixNano())
	marks := "/tmp/" + execID
	cmd := types.Command{Cmd: "sh", Args: []string{"-c", "echo s >> " + marks + "; echo begin; sleep 2; echo end; exit 7"}}
	type start struct {
		pid        int
		reattached bool
	}
	starts := make(chan start, 2)
	detach := make(chan struct{})
	first := &signalWriter{first: make(chan struct{})}
	done := make(chan error, 1)
	go func() {
		_, err := s.o.ExecuteCommand(s.ctx(t), id, cmd, vmm.ExecIO{Stdout: first, ExecutionID: execID, Detach: detach,
			Started: func(pid int, re bool) { starts <- start{pid, re} }})
		done <- err
	}()
	select {
	case <-first.first:
	case <-time.After(s.h.OpTimeout):
		t.Fatal("the command never printed")
	}
	close(detach)
	select {
	case err := <-done:
		require.ErrorIs(t, err, vmm.ErrDetached)
	case <-time.After(s.h.OpTimeout):
		t.Fatal("detaching did not end the call")
	}
	st := <-starts
	require.False(t, st.reattached)
	require.Positive(t, st.pid)

	var out strings.Builder
	res, err := s.o.ExecuteCommand(s.ctx(t), id, cmd, vmm.ExecIO{Stdout: &out, ExecutionID: execID,
		Started: func(pid int, re bool) { starts <- start{pid, re} }})
	require.NoError(t, err)
	again := <-starts
	require.True(t, again.reattached, "the second call must reattach")
	require.Equal(t, st.pid, again.pid)
	require.Equal(t, 7, res.ExitCode)
	require.Equal(t, "begin\nend\n", string(res.Stdout))
	require.Equal(t, "begin\nend\n", out.String(), "the reattached stream replays from the start")

	// Ended, it is still reattached to, not run again.
	res, err = s.o.ExecuteCommand(s.ctx(t), id, cmd, vmm.ExecIO{ExecutionID: execID, ReattachOnly: true})
	require.NoError(t, err)
	require.Equal(t, 7, res.ExitCode)
	require.Equal(t, "s\n", Sh(t, s.o, id, "cat "+marks), "the command ran more than once")

	_, err = s.o.ExecuteCommand(s.ctx(t), id, cmd, vmm.ExecIO{ExecutionID: execID + "-unknown", ReattachOnly: true})
	require.ErrorIs(t, err, vmm.ErrUnknownExecution)
	require.ErrorIs(t, err, types.ErrNotFound)
	require.Equal(t, "s\n", Sh(t, s.o, id, "cat "+marks))
}

// testLimits: the VM's size is visible inside it, as far as the isolation
// lets the guest see it.
func (s *suite) testLimits(t *testing.T, id string, sp types.VMSpec) {
	switch iso := s.o.Capabilities().Isolation; iso {
	case "container":
		mem := Sh(t, s.o, id, "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes")
		require.Equal(t, strconv.Itoa(sp.MemoryMB<<20), strings.TrimSpace(mem), "cgroup memory limit")
		cpu := strings.Fields(Sh(t, s.o, id, "cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"))
		require.Len(t, cpu, 2)
		quota, err1 := strconv.Atoi(cpu[0])
		period, err2 := strconv.Atoi(cpu[1])
		require.NoError(t, cmp.Or(err1, err2), "cgroup cpu quota %q", cpu)
		require.Equal(t, sp.VCPUs, quota/period, "cgroup cpu quota / period")
	case "vm":
		require.Equal(t, strconv.Itoa(sp.VCPUs)+"\n", Sh(t, s.o, id, "nproc"))
		kb, err := strconv.Atoi(strings.TrimSpace(Sh(t, s.o, id, "awk '/^MemTotal:/ {print $2}' /proc/meminfo")))
		require.NoError(t, err)
		// The kernel keeps some memory for itself; what the guest sees
		// must still be within 10% of what was asked for.
		require.LessOrEqual(t, kb, sp.MemoryMB<<10, "MemTotal")
		require.GreaterOrEqual(t, kb, sp.MemoryMB<<10*9/10, "MemTotal %d KiB is not within 10%% of %d MiB", kb, sp.MemoryMB)
	default:
		t.Fatalf("isolation %q: no way known to see the VM's limits from inside; teach testLimits about it", iso)
	}
}

// signalWriter records what is written and closes first on the first write.
type signalWriter struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	first chan struct{}
	once  sync.Once
}

func (w *signalWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	w.once.Do(func() { close(w.first) })
	return len(p), nil
}

func (w *signalWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// NewSpec returns a valid spec of a small VM with an id and a name no other
// test uses.
func NewSpec(t testing.TB) types.VMSpec {
	t.Helper()
	b := make([]byte, 6)
	rand.Read(b)
	suffix := hex.EncodeToString(b)
	return types.VMSpec{ID: "vmt-" + suffix, Name: "t-" + suffix, VCPUs: 1, MemoryMB: 128}
}

// StartVM creates and boots a VM, registers its deletion with t.Cleanup and
// returns its id.
func StartVM(t testing.TB, o vmm.VMOrchestrator, spec types.VMSpec) string {
	t.Helper()
	ctx := context.WithoutCancel(t.Context())
	t.Cleanup(func() {
		if err := o.DeleteVM(ctx, spec.ID); err != nil {
			t.Errorf("deleting vm %s: %v", spec.ID, err)
		}
	})
	_, err := o.CreateVM(t.Context(), spec)
	require.NoError(t, err, "CreateVM")
	require.NoError(t, o.StartVM(t.Context(), spec.ID), "StartVM")
	return spec.ID
}

// Exec runs cmd in VM id and fails t when it could not be run.
func Exec(t testing.TB, o vmm.VMOrchestrator, id string, cmd types.Command) *types.ExecResult {
	t.Helper()
	res, err := o.ExecuteCommand(t.Context(), id, cmd, vmm.ExecIO{})
	require.NoError(t, err, "running %s %q", cmd.Cmd, cmd.Args)
	require.NotNil(t, res)
	return res
}

// Sh runs a shell script in VM id, requires it to exit 0 and returns its
// stdout.
func Sh(t testing.TB, o vmm.VMOrchestrator, id, script string) string {
	t.Helper()
	res := Exec(t, o, id, types.Command{Cmd: "sh", Args: []string{"-c", script}})
	require.Equal(t, 0, res.ExitCode, "script %q failed: %s", script, res.Stderr)
	return string(res.Stdout)
}

// RequireState fails t unless VM id is in state want.
func RequireState(t testing.TB, o vmm.VMOrchestrator, id string, want types.VMState) {
	t.Helper()
	st, err := o.GetVMStatus(t.Context(), id)
	require.NoError(t, err)
	require.Equal(t, want, st.State, "vm %s: %s", id, st.Detail)
}

func listIDs(t testing.TB, o vmm.VMOrchestrator) []string {
	t.Helper()
	list, err := o.ListVMs(t.Context())
	require.NoError(t, err)
	ids := make([]string, len(list))
	for i, v := range list {
		ids[i] = v.ID
	}
	return ids
}
