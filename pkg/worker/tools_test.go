package worker_test

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/tools"
	"github.com/aetherium/aetherium-core/pkg/tools/toolstest"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// newInstaller returns a mise installer on a fresh cache, skipping when
// mise is missing.
func newInstaller(t testing.TB) *tools.Mise {
	t.Helper()
	if _, err := exec.LookPath(tools.MiseBinaryDefault); err != nil {
		testenv.Skip(t, "mise is not installed (%v); install it with `sudo scripts/setup.sh`", err)
	}
	m, err := tools.NewMise(tools.Config{Root: t.TempDir(), AllowPrivateURLs: true})
	require.NoError(t, err)
	return m
}

// TestTools is the tools path through the real stack, on containers
// (docker) and microVMs (qemu, without a network): a VM created with a
// tool runs it by name, a second VM with the same spec downloads nothing,
// a bad spec and an unknown version fail cleanly, and tools installed into
// a running VM run too.
func TestTools(t *testing.T) {
	for _, provider := range []string{"docker", "qemu"} {
		t.Run(provider, func(t *testing.T) { testTools(t, provider) })
	}
}

func testTools(t *testing.T, provider string) {
	srv := toolstest.NewServer(t)
	inst := newInstaller(t)
	s := stack.Start(t, stack.Options{Provider: provider, Tools: inst})
	ctx := context.Background()
	spec := srv.Spec("1.0.0")

	create := func(name string, specs ...string) uuid.UUID {
		t.Helper()
		id, err := s.Service.CreateVMTaskWithOptions(ctx, service.CreateVMOptions{Name: name, VCPUs: 1, MemoryMB: 256,
			Network: types.NetworkNone, Tools: specs})
		require.NoError(t, err)
		waitOK(t, s.Service, id)
		return id
	}
	hello := func(vm uuid.UUID) {
		t.Helper()
		e := execWait(t, s, vm, types.Command{Cmd: "hello"})
		require.Equal(t, 0, e.ExitCode, "hello: %s%s", e.Stdout, e.Stderr)
		require.Equal(t, toolstest.HelloOutput, e.Stdout)
	}

	start := time.Now()
	vm1 := create("tools-1", spec)
	t.Logf("%s: create with a tool (first install) took %v", provider, time.Since(start).Round(time.Millisecond))
	hello(vm1)
	require.Equal(t, 1, srv.Requests())
	rows, err := s.Service.ListVMTools(ctx, vm1)
	require.NoError(t, err)
	require.Len(t, rows, 2, "the tool and mise")
	require.Equal(t, spec, rows[0].Spec)
	require.Equal(t, "1.0.0", rows[0].Version)
	require.Equal(t, tools.MiseTool, rows[1].Tool)
	require.Empty(t, rows[1].Spec)
	// mise itself is in the guest, at its cache path.
	miseBin := inst.Root() + "/" + rows[1].Key + "/bin/mise"
	e := execWait(t, s, vm1, types.Command{Cmd: "sh", Args: []string{"-c", `test -x "$0"`, miseBin}})
	require.Equal(t, 0, e.ExitCode, "%s is not in the guest", miseBin)
	if provider == "qemu" {
		// The guest image has glibc, which mise needs (the docker stack's
		// busybox image has not): mise runs by name, from PATH.
		e = execWait(t, s, vm1, types.Command{Cmd: "mise", Args: []string{"--version"}})
		require.Equal(t, 0, e.ExitCode, "mise --version in the guest: %s%s", e.Stdout, e.Stderr)
		require.Contains(t, e.Stdout, strings.TrimPrefix(rows[1].Version, "v"))
	}

	start = time.Now()
	vm2 := create("tools-2", spec)
	t.Logf("%s: create with a cached tool took %v", provider, time.Since(start).Round(time.Millisecond))
	hello(vm2)
	require.Equal(t, 1, srv.Requests(), "a second VM with the same spec downloads nothing")

	// A bad spec is refused before anything is recorded.
	_, err = s.Service.CreateVMTaskWithOptions(ctx, service.CreateVMOptions{Name: "tools-bad", VCPUs: 1, MemoryMB: 256,
		Tools: []string{"node@22;reboot"}})
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, `"node@22;reboot"`)

	// An unknown version fails the VM with mise's reason, leaving nothing.
	id, err := s.Service.CreateVMTaskWithOptions(ctx, service.CreateVMOptions{Name: "tools-404", VCPUs: 1, MemoryMB: 256,
		Tools: []string{srv.Spec("2.0.0")}})
	require.NoError(t, err)
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	task, err := s.Service.WaitTask(wctx, id)
	require.NoError(t, err)
	require.Equal(t, types.TaskFailed, task.State)
	require.Contains(t, task.Error, "404")
	vm, err := s.Service.GetVM(ctx, id)
	require.NoError(t, err)
	require.Equal(t, types.VMFailed, vm.State)
	require.Contains(t, vm.Error, "hello-2.0.0.tar.gz")
	require.NotContains(t, vm.Error, "\n", "mise's reason in one line")
	have, err := s.VMMs["w1"].ListVMs(ctx)
	require.NoError(t, err)
	for _, st := range have {
		require.NotEqual(t, id.String(), st.ID, "the failed vm left something in the backend")
	}

	// A VM made without tools gets none; tools install adds them live.
	start = time.Now()
	vm3 := create("tools-3")
	t.Logf("%s: create without tools took %v", provider, time.Since(start).Round(time.Millisecond))
	rows, err = s.Service.ListVMTools(ctx, vm3)
	require.NoError(t, err)
	require.Empty(t, rows)
	xid, err := s.Service.ExecuteCommandTaskWithOptions(ctx, vm3.String(), types.Command{Cmd: "hello"}, service.ExecOptions{})
	require.NoError(t, err)
	waitOK(t, s.Service, xid)
	missing, err := s.Service.GetExecution(ctx, xid)
	require.NoError(t, err)
	require.Equal(t, 127, missing.ExitCode, "hello is not there yet")
	require.Contains(t, missing.Stderr, "not found")
	seen := srv.Requests()
	tid, err := s.Service.InstallToolsTask(ctx, vm3.String(), []string{spec})
	require.NoError(t, err)
	waitOK(t, s.Service, tid)
	hello(vm3)
	require.Equal(t, seen, srv.Requests(), "installed from the cache")
	rows, err = s.Service.ListVMTools(ctx, vm3)
	require.NoError(t, err)
	require.Len(t, rows, 1, "the tool; mise is not streamed into running VMs")
	require.Equal(t, spec, rows[0].Spec)
	// Again: idempotent.
	tid, err = s.Service.InstallToolsTask(ctx, vm3.String(), []string{spec})
	require.NoError(t, err)
	waitOK(t, s.Service, tid)
	hello(vm3)

	_, err = s.Service.InstallToolsTask(ctx, vm3.String(), []string{"-rf"})
	require.ErrorIs(t, err, types.ErrInvalid)
	_, err = s.Service.InstallToolsTask(ctx, uuid.NewString(), []string{spec})
	require.ErrorIs(t, err, types.ErrNotFound)
}

// TestToolsWithoutInstaller: a worker without mise still creates VMs
// without tools, and one asking for tools fails saying how to fix it.
func TestToolsWithoutInstaller(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := context.Background()
	id, err := s.Service.CreateVMTaskWithOptions(ctx, service.CreateVMOptions{Name: "no-mise", VCPUs: 1, MemoryMB: 128,
		Tools: []string{"node@22"}})
	require.NoError(t, err)
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	task, err := s.Service.WaitTask(wctx, id)
	require.NoError(t, err)
	require.Equal(t, types.TaskFailed, task.State)
	require.Contains(t, task.Error, "scripts/setup.sh")
	require.Equal(t, 1, task.Attempts, "not retried: it cannot succeed")
	createVM(t, s, "plain")
}
