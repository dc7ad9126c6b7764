package worker_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
)

// sh runs a shell line in a VM through the task path and returns its
// stdout, failing the test on a non-zero exit.
func sh(t *testing.T, s *stack.Stack, vmID uuid.UUID, line string) string {
	t.Helper()
	e := execWait(t, s, vmID, types.Command{Cmd: "sh", Args: []string{"-c", line}})
	require.Equal(t, 0, e.ExitCode, "%s: %s", line, e.Stderr)
	return e.Stdout
}

// TestTemplateClonesQemu builds a template on qemu (a VM booted, set up
// and snapshotted), restores 5 clones of it at once, and checks that each
// sees the template's setup, answers exec, and has its own identity:
// hostname, machine id, RNG output pairwise different, and a clock
// within 1 s of the host's although the snapshot is 10 s old. The
// template cannot be deleted while clones live; after them it goes with
// its files.
func TestTemplateClonesQemu(t *testing.T) {
	s := stack.Start(t, stack.Options{Provider: qemu.Provider})
	ctx := context.Background()
	sn := service.Snapshots(s.Service)
	id, err := sn.CreateTemplateTask(ctx, service.TemplateOptions{Name: "tpl", VCPUs: 1, MemoryMB: 256,
		Setup: "echo from-template > /root/setup; sync"})
	require.NoError(t, err)
	waitOK(t, s.Service, id)
	tpl, err := sn.GetSnapshot(ctx, types.KindTemplate, "tpl")
	require.NoError(t, err)
	require.Equal(t, types.SnapshotReady, tpl.State)
	require.DirExists(t, tpl.Dir)
	// The builder VM is gone; the template keeps what it needs.
	builder, err := s.Store.GetVM(ctx, tpl.VMID)
	require.NoError(t, err)
	require.Equal(t, types.VMDeleted, builder.State)

	_, err = sn.CreateTemplateTask(ctx, service.TemplateOptions{Name: "tpl", VCPUs: 1, MemoryMB: 256})
	require.ErrorIs(t, err, types.ErrInvalid, "a template name clash")

	// The clock check needs a snapshot older than the clones' restore.
	time.Sleep(time.Until(tpl.UpdatedAt.Add(10 * time.Second)))

	const n = 5
	clones := make([]uuid.UUID, n)
	var wg sync.WaitGroup
	for i := range clones {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cid, err := s.Service.CreateVMTaskWithOptions(ctx, service.CreateVMOptions{Name: fmt.Sprintf("clone-%d", i), Template: "tpl"})
			if err == nil {
				clones[i] = cid
			}
		}()
	}
	wg.Wait()
	for i, c := range clones {
		require.NotEqual(t, uuid.Nil, c, "clone %d was not submitted", i)
		waitOK(t, s.Service, c)
	}
	seen := map[string]map[string]int{"hostname": {}, "machine-id": {}, "random": {}}
	for i, c := range clones {
		require.Equal(t, "from-template\n", sh(t, s, c, "cat /root/setup"))
		before := float64(time.Now().UnixNano()) / 1e9
		out := sh(t, s, c, "hostname; cat /etc/machine-id; od -An -tx1 -N16 /dev/urandom | tr -d ' \\n'; echo; date +%s.%N")
		after := float64(time.Now().UnixNano()) / 1e9
		lines := strings.Split(strings.TrimSpace(out), "\n")
		require.Len(t, lines, 4, out)
		for j, k := range []string{"hostname", "machine-id", "random"} {
			seen[k][lines[j]]++
			require.Equal(t, 1, seen[k][lines[j]], "clone %d repeats another's %s %q", i, k, lines[j])
		}
		guest, err := strconv.ParseFloat(lines[3], 64)
		require.NoError(t, err)
		// The guest read its clock between before and after: within 1 s
		// of that window.
		require.True(t, guest > before-1 && guest < after+1, "clone %d's clock %.2f is off the host's [%.2f, %.2f]", i, guest, before, after)
		vm, err := s.Service.GetVM(ctx, c)
		require.NoError(t, err)
		require.Equal(t, tpl.ID, vm.FromSnapshot)
	}

	_, err = sn.DeleteSnapshotTask(ctx, types.KindTemplate, "tpl")
	require.ErrorIs(t, err, types.ErrConflict)
	require.Contains(t, err.Error(), "delete them first")
	for _, c := range clones {
		del, err := s.Service.DeleteVMTask(ctx, c.String())
		require.NoError(t, err)
		waitOK(t, s.Service, del)
	}
	del, err := sn.DeleteSnapshotTask(ctx, types.KindTemplate, "tpl")
	require.NoError(t, err)
	waitOK(t, s.Service, del)
	_, err = os.Stat(tpl.Dir)
	require.ErrorIs(t, err, os.ErrNotExist, "the template's files must go with it")
}

// TestSuspendForkQemu: a suspended VM survives a worker restart and
// resumes with a process started before the suspend still running and a
// file in /tmp intact; pause and resume keep it too; a fork from a
// snapshot sees the parent's files from before the snapshot but not the
// parent's later writes, while the parent goes on.
func TestSuspendForkQemu(t *testing.T) {
	s := stack.Start(t, stack.Options{Provider: qemu.Provider})
	ctx := context.Background()
	sn := service.Snapshots(s.Service)
	vmID := createVM(t, s, "keeper")
	pid := strings.TrimSpace(sh(t, s, vmID, "sleep 1000 >/dev/null 2>&1 & echo $!; echo kept > /tmp/file"))
	pid = strings.TrimSpace(strings.Split(pid, "\n")[0])

	step := func(submit func(context.Context, string) (uuid.UUID, error), want types.VMState) {
		t.Helper()
		id, err := submit(ctx, vmID.String())
		require.NoError(t, err)
		waitOK(t, s.Service, id)
		vm, err := s.Service.GetVM(ctx, vmID)
		require.NoError(t, err)
		require.Equal(t, want, vm.State)
	}
	step(sn.PauseVMTask, types.VMPaused)
	step(sn.ResumeVMTask, types.VMRunning)
	step(sn.SuspendVMTask, types.VMSuspended)

	// The worker restarts while the VM is suspended.
	s.Workers["w1"].Stop()
	w := s.NewWorker(t, "w1")
	require.NoError(t, w.Start(ctx))
	vm, err := s.Service.GetVM(ctx, vmID)
	require.NoError(t, err)
	require.Equal(t, types.VMSuspended, vm.State, "a restart keeps it suspended")

	step(sn.ResumeVMTask, types.VMRunning)
	require.Equal(t, "alive\nkept\n", sh(t, s, vmID, "kill -0 "+pid+" && echo alive; cat /tmp/file"))

	id, err := sn.SnapshotVMTask(ctx, vmID.String(), "fork-point")
	require.NoError(t, err)
	waitOK(t, s.Service, id)
	sh(t, s, vmID, "echo later > /tmp/later")
	fork, err := s.Service.CreateVMTaskWithOptions(ctx, service.CreateVMOptions{Name: "fork", FromSnapshot: "fork-point"})
	require.NoError(t, err)
	waitOK(t, s.Service, fork)
	require.Equal(t, "kept\nnone\n", sh(t, s, fork, "cat /tmp/file; cat /tmp/later 2>/dev/null || echo none"))
	sh(t, s, fork, "echo fork-only > /tmp/fork")
	require.Equal(t, "later\nabsent\n", sh(t, s, vmID, "cat /tmp/later; test -e /tmp/fork && echo present || echo absent"))
}
