package worker_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/google/uuid"
	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/docker"
	"github.com/aetherium/aetherium-core/pkg/worker"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func waitOK(t *testing.T, svc service.TaskService, id uuid.UUID) *types.Task {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	task, err := svc.WaitTask(ctx, id)
	require.NoError(t, err)
	require.Equal(t, types.TaskSucceeded, task.State, "task %s failed: %s", task.ID, task.Error)
	return task
}

func createVM(t *testing.T, s *stack.Stack, name string) uuid.UUID {
	t.Helper()
	id, err := s.Service.CreateVMTask(context.Background(), name, 1, 128)
	require.NoError(t, err)
	waitOK(t, s.Service, id)
	return id
}

func execWait(t *testing.T, s *stack.Stack, vmID uuid.UUID, cmd types.Command) *types.Execution {
	t.Helper()
	ctx := context.Background()
	id, err := s.Service.ExecuteCommandTaskWithOptions(ctx, vmID.String(), cmd, service.ExecOptions{})
	require.NoError(t, err)
	waitOK(t, s.Service, id)
	e, err := s.Service.GetExecution(ctx, id)
	require.NoError(t, err)
	return e
}

// TestLifecycle is the whole path through the public API: create, exec with
// exit code and stdin, history, delete, and nothing left behind.
func TestLifecycle(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := context.Background()
	vmID := createVM(t, s, "life")
	vm, err := s.Service.GetVM(ctx, vmID)
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, vm.State)
	require.Equal(t, "w1", vm.Owner)

	// The original interface, unchanged.
	taskID, err := s.Service.ExecuteCommandTask(ctx, vmID.String(), "sh", []string{"-c", "echo out; echo err >&2; exit 3"})
	require.NoError(t, err)
	waitOK(t, s.Service, taskID)

	e := execWait(t, s, vmID, types.Command{Cmd: "cat", Stdin: []byte("piped\n")})
	require.Equal(t, "piped\n", e.Stdout)

	execs, err := s.Service.GetExecutions(ctx, vmID)
	require.NoError(t, err)
	require.Len(t, execs, 2)
	require.Equal(t, taskID.String(), execs[0].ID)
	require.Equal(t, 3, execs[0].ExitCode)
	require.Equal(t, "out\n", execs[0].Stdout)
	require.Equal(t, "err\n", execs[0].Stderr)
	require.Equal(t, 0, execs[1].ExitCode)

	vms, err := s.Service.ListVMs(ctx)
	require.NoError(t, err)
	require.Len(t, vms, 1)

	delID, err := s.Service.DeleteVMTask(ctx, vmID.String())
	require.NoError(t, err)
	waitOK(t, s.Service, delID)
	vm, err = s.Service.GetVM(ctx, vmID)
	require.NoError(t, err)
	require.Equal(t, types.VMDeleted, vm.State)
	left, err := s.VMMs["w1"].ListVMs(ctx)
	require.NoError(t, err)
	require.Empty(t, left, "a container survived the delete")
	entries, err := os.ReadDir(s.SocketDirs["w1"])
	if err == nil {
		require.Empty(t, entries, "a host directory or socket survived the delete")
	}
	// Deleting again is harmless.
	again, err := s.Service.DeleteVMTask(ctx, vmID.String())
	require.NoError(t, err)
	waitOK(t, s.Service, again)
	// Its name can be used again.
	_ = createVM(t, s, "life")
}

func TestBadInput(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := context.Background()
	svc := s.Service

	cases := []struct {
		name     string
		vm       string
		vcpus    int
		memoryMB int
		want     string
	}{
		{"zero vcpus", "a", 0, 128, "at least 1"},
		{"too many vcpus", "a", 4096, 128, "the host has only"},
		{"too little memory", "a", 1, 32, "at least 64 MiB"},
		{"empty name", "", 1, 128, "empty"},
		{"long name", strings.Repeat("a", 64), 1, 128, "at most 63"},
		{"bad characters", "Bad_Name", 1, 128, "lowercase"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := svc.CreateVMTask(ctx, tc.vm, tc.vcpus, tc.memoryMB)
			require.ErrorIs(t, err, types.ErrInvalid)
			require.Contains(t, err.Error(), tc.want)
		})
	}
	vms, err := svc.ListVMs(ctx)
	require.NoError(t, err)
	require.Empty(t, vms, "an invalid create left a vm behind")

	unknown := uuid.New()
	_, err = svc.GetVM(ctx, unknown)
	require.ErrorIs(t, err, types.ErrNotFound)
	_, err = svc.ExecuteCommandTask(ctx, unknown.String(), "true", nil)
	require.ErrorIs(t, err, types.ErrNotFound)
	_, err = svc.DeleteVMTask(ctx, unknown.String())
	require.ErrorIs(t, err, types.ErrNotFound)
	_, err = svc.ExecuteCommandTask(ctx, "not-a-uuid", "true", nil)
	require.ErrorIs(t, err, types.ErrInvalid)
	_, err = svc.GetExecutions(ctx, unknown)
	require.ErrorIs(t, err, types.ErrNotFound)

	vmID := createVM(t, s, "bad-input")
	_, err = svc.ExecuteCommandTask(ctx, vmID.String(), "", nil)
	require.ErrorIs(t, err, types.ErrInvalid)
	_, err = svc.CreateVMTask(ctx, "bad-input", 1, 128)
	require.ErrorIs(t, err, types.ErrConflict, "names are unique among live vms")

	// A missing program ends as in a shell: exit 127, the reason on stderr.
	e := execWait(t, s, vmID, types.Command{Cmd: "/no/such/program"})
	require.Equal(t, 127, e.ExitCode)
	require.Equal(t, "aetherium: /no/such/program: no such file or directory\n", e.Stderr)

	// A command that cannot run as given fails its task without retries.
	id, err := svc.ExecuteCommandTaskWithOptions(ctx, vmID.String(), types.Command{Cmd: "true", Cwd: "/no/such/dir"}, service.ExecOptions{})
	require.NoError(t, err)
	task, err := svc.WaitTask(ctx, id)
	require.NoError(t, err)
	require.Equal(t, types.TaskFailed, task.State)
	require.Contains(t, task.Error, "/no/such/dir")
	require.Equal(t, 1, task.Attempts)

	stopID, err := svc.StopVMTask(ctx, vmID.String())
	require.NoError(t, err)
	waitOK(t, svc, stopID)
	_, err = svc.ExecuteCommandTask(ctx, vmID.String(), "true", nil)
	require.ErrorIs(t, err, types.ErrConflict)
	require.Contains(t, err.Error(), "stopped")
	startID, err := svc.StartVMTask(ctx, vmID.String())
	require.NoError(t, err)
	waitOK(t, svc, startID)
	require.Equal(t, 0, execWait(t, s, vmID, types.Command{Cmd: "true"}).ExitCode)

	delID, err := svc.DeleteVMTask(ctx, vmID.String())
	require.NoError(t, err)
	waitOK(t, svc, delID)
	_, err = svc.ExecuteCommandTask(ctx, vmID.String(), "true", nil)
	require.ErrorIs(t, err, types.ErrConflict)
	require.Contains(t, err.Error(), "deleted")
}

// TestMalformedPayload: a task whose payload can never decode is recorded
// as failed after one attempt and not retried.
func TestMalformedPayload(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	client := asynq.NewClient(asynq.RedisClientOpt{Addr: s.RedisAddr})
	defer client.Close()
	for _, typ := range []types.TaskType{types.TaskVMCreate, types.TaskVMExecute, types.TaskVMDelete, types.TaskJobRun} {
		t.Run(string(typ), func(t *testing.T) {
			id := uuid.New()
			_, err := client.Enqueue(asynq.NewTask(string(typ), []byte("{not json")), asynq.TaskID(id.String()),
				asynq.Queue(queue.SharedQueue), asynq.MaxRetry(5))
			require.NoError(t, err)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var task *types.Task
			for ctx.Err() == nil {
				if task, err = s.Service.GetTask(ctx, id); err == nil && task.State.Terminal() {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			require.NotNil(t, task)
			require.Equal(t, types.TaskFailed, task.State)
			require.Contains(t, task.Error, "malformed payload")
			require.Equal(t, 1, task.Attempts)
			insp := asynq.NewInspector(asynq.RedisClientOpt{Addr: s.RedisAddr})
			defer insp.Close()
			info, err := insp.GetTaskInfo(queue.SharedQueue, id.String())
			require.NoError(t, err)
			require.Equal(t, asynq.TaskStateArchived, info.State, "a malformed task must not wait for a retry")
		})
	}
}

func TestExecLimits(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	vmID := createVM(t, s, "limits")

	t.Run("output is capped", func(t *testing.T) {
		e := execWait(t, s, vmID, types.Command{Cmd: "sh", Args: []string{"-c", "head -c 5242880 /dev/zero | tr '\\0' a; echo done >&2"}})
		require.True(t, e.StdoutTruncated)
		require.Len(t, e.Stdout, types.DefaultMaxOutputBytes)
		require.False(t, e.StderrTruncated)
		require.Equal(t, "done\n", e.Stderr)
	})
	t.Run("timeout kills the process group", func(t *testing.T) {
		start := time.Now()
		e := execWait(t, s, vmID, types.Command{Cmd: "sh", Args: []string{"-c", "sleep 60 & sleep 60"}, Timeout: 2 * time.Second})
		require.Less(t, time.Since(start), 5*time.Second)
		require.True(t, e.TimedOut)
		require.Equal(t, 124, e.ExitCode)
		ps := execWait(t, s, vmID, types.Command{Cmd: "ps", Args: []string{"-o", "args"}})
		require.NotContains(t, ps.Stdout, "sleep 60", "a process of the timed-out command survived")
	})
}

// TestStreamingAndCancel drives the interactive path the CLI uses.
func TestStreamingAndCancel(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	vmID := createVM(t, s, "stream")
	ctx := context.Background()

	t.Run("output streams as it is produced", func(t *testing.T) {
		w := &firstWrite{start: time.Now()}
		var stderr bytes.Buffer
		res, err := s.Service.Exec(ctx, vmID.String(), types.Command{Cmd: "sh", Args: []string{"-c", "for i in 1 2 3; do echo $i; sleep 1; done; exit 7"}}, w, &stderr)
		require.NoError(t, err)
		require.Equal(t, 7, res.ExitCode)
		require.Equal(t, "1\n2\n3\n", w.buf.String())
		total := time.Since(w.start)
		require.Greater(t, total, 2*time.Second)
		require.Less(t, w.first, 1500*time.Millisecond, "the first line arrived only after %s", w.first)
		e, err := s.Service.GetExecution(ctx, res.TaskID)
		require.NoError(t, err)
		require.Equal(t, "1\n2\n3\n", e.Stdout, "a streamed execution is recorded in full")
	})
	t.Run("cancel kills the remote command", func(t *testing.T) {
		cctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
		defer cancel()
		start := time.Now()
		res, err := s.Service.Exec(cctx, vmID.String(), types.Command{Cmd: "sleep", Args: []string{"30"}}, &bytes.Buffer{}, &bytes.Buffer{})
		require.Less(t, time.Since(start), 10*time.Second)
		// The caller learns that it was its own deadline that ended the
		// command, not the command's exit.
		require.ErrorIs(t, err, context.DeadlineExceeded)
		require.NotNil(t, res)
		task, err := s.Service.GetTask(ctx, res.TaskID)
		require.NoError(t, err)
		require.Equal(t, types.TaskFailed, task.State)
		require.Equal(t, "cancelled", task.Error)
		ps := execWait(t, s, vmID, types.Command{Cmd: "ps", Args: []string{"-o", "args"}})
		require.NotContains(t, ps.Stdout, "sleep 30")
	})
}

type firstWrite struct {
	mu    sync.Mutex
	start time.Time
	first time.Duration
	buf   bytes.Buffer
}

func (f *firstWrite) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.first == 0 {
		f.first = time.Since(f.start)
	}
	return f.buf.Write(p)
}

// TestOwnership: two workers share PostgreSQL and Redis; every later task of
// a VM is handled by the worker that created it.
func TestOwnership(t *testing.T) {
	s := stack.Start(t, stack.Options{Workers: []string{"alpha", "beta"}})
	ctx := context.Background()
	owners := map[string]string{}
	var vms []uuid.UUID
	for i := 0; i < 4; i++ {
		id, err := s.Service.CreateVMTask(ctx, "own-"+string(rune('a'+i)), 1, 128)
		require.NoError(t, err)
		task := waitOK(t, s.Service, id)
		vm, err := s.Service.GetVM(ctx, id)
		require.NoError(t, err)
		require.Equal(t, vm.Owner, workerOf(t, task))
		owners[id.String()] = vm.Owner
		vms = append(vms, id)
	}
	for _, id := range vms {
		for j := 0; j < 3; j++ {
			taskID, err := s.Service.ExecuteCommandTask(ctx, id.String(), "hostname", nil)
			require.NoError(t, err)
			require.Equal(t, owners[id.String()], workerOf(t, waitOK(t, s.Service, taskID)))
		}
		delID, err := s.Service.DeleteVMTask(ctx, id.String())
		require.NoError(t, err)
		require.Equal(t, owners[id.String()], workerOf(t, waitOK(t, s.Service, delID)))
	}
	for id, orch := range s.VMMs {
		left, err := orch.ListVMs(ctx)
		require.NoError(t, err)
		require.Empty(t, left, "worker %s leaked a vm", id)
	}
}

func workerOf(t *testing.T, task *types.Task) string {
	t.Helper()
	var r struct {
		WorkerID string `json:"worker_id"`
	}
	require.NoError(t, json.Unmarshal(task.Result, &r))
	return r.WorkerID
}

func TestJob(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := context.Background()
	vmID := createVM(t, s, "job")
	cmds := []types.Command{
		{Cmd: "sh", Args: []string{"-c", "echo one > /tmp/f"}},
		{Cmd: "sh", Args: []string{"-c", "cat /tmp/f; exit 4"}},
		{Cmd: "echo", Args: []string{"never"}},
	}
	id, err := s.Service.RunJobTask(ctx, vmID.String(), cmds, true)
	require.NoError(t, err)
	waitOK(t, s.Service, id)
	job, err := s.Service.GetJob(ctx, id)
	require.NoError(t, err)
	require.Equal(t, types.JobFailed, job.State)
	require.Len(t, job.Executions, 2)
	require.Equal(t, "one\n", job.Executions[1].Stdout)
	require.Equal(t, 4, job.Executions[1].ExitCode)

	id, err = s.Service.RunJobTask(ctx, vmID.String(), cmds, false)
	require.NoError(t, err)
	waitOK(t, s.Service, id)
	job, err = s.Service.GetJob(ctx, id)
	require.NoError(t, err)
	require.Len(t, job.Executions, 3, "keep-going runs every command")
}

// TestGracefulStop: SIGTERM semantics. Stop waits for the task in flight,
// and the VM keeps running for the next worker start.
func TestGracefulStop(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := context.Background()
	vmID := createVM(t, s, "drain")
	id, err := s.Service.ExecuteCommandTask(ctx, vmID.String(), "sh", []string{"-c", "sleep 2; echo finished"})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		task, err := s.Service.GetTask(ctx, id)
		return err == nil && task.State == types.TaskRunning
	}, 30*time.Second, 10*time.Millisecond)
	s.Workers["w1"].Stop()
	s.Workers["w1"].Stop() // twice is fine
	task, err := s.Service.GetTask(ctx, id)
	require.NoError(t, err)
	require.Equal(t, types.TaskSucceeded, task.State, task.Error)
	st, err := s.VMMs["w1"].GetVMStatus(ctx, vmID.String())
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, st.State, "stopping the worker must leave VMs running")
	require.NoError(t, s.Workers["w1"].Start(ctx))
	require.Equal(t, "finished\n", execWait(t, s, vmID, types.Command{Cmd: "sh", Args: []string{"-c", "echo finished"}}).Stdout)
}

// TestReconcile: after a crash, the worker removes containers whose VM rows
// are gone and fails rows whose containers vanished.
func TestReconcile(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := context.Background()
	keep := createVM(t, s, "keep")
	lost := createVM(t, s, "lost")
	orphan := createVM(t, s, "orphan")
	w := s.Workers["w1"]
	w.Stop()
	// lost: the container disappears behind the worker's back.
	require.NoError(t, s.VMMs["w1"].DeleteVM(ctx, lost.String()))
	// orphan: the row says deleted but the container is still there.
	_, err := s.Store.UpdateVMState(ctx, orphan.String(), types.VMDeleting, "")
	require.NoError(t, err)
	_, err = s.Store.UpdateVMState(ctx, orphan.String(), types.VMDeleted, "")
	require.NoError(t, err)
	require.NoError(t, w.Start(ctx))

	vm, err := s.Service.GetVM(ctx, lost)
	require.NoError(t, err)
	require.Equal(t, types.VMFailed, vm.State)
	_, err = s.VMMs["w1"].GetVMStatus(ctx, orphan.String())
	require.ErrorIs(t, err, types.ErrNotFound)
	vm, err = s.Service.GetVM(ctx, keep)
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, vm.State)
}

// TestCrashWhileRunning: a VM whose VMM dies while its worker runs is
// recorded as failed at the next heartbeat, with the backend's reason, and
// can still be deleted.
func TestCrashWhileRunning(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := context.Background()
	id := createVM(t, s, "crashy")
	orch := s.VMMs["w1"].(*docker.Orchestrator)
	ins, err := orch.Client().ContainerInspect(ctx, "aetherium-"+id.String())
	require.NoError(t, err)
	require.NoError(t, syscall.Kill(ins.State.Pid, syscall.SIGKILL))
	require.Eventually(t, func() bool {
		vm, err := s.Service.GetVM(ctx, id)
		return err == nil && vm.State == types.VMFailed
	}, 15*time.Second, 50*time.Millisecond, "the crash must reach storage")
	vm, err := s.Service.GetVM(ctx, id)
	require.NoError(t, err)
	require.Contains(t, vm.Error, "without being stopped")
	tid, err := s.Service.DeleteVMTask(ctx, id.String())
	require.NoError(t, err)
	task, err := s.Service.WaitTask(ctx, tid)
	require.NoError(t, err)
	require.Equal(t, types.TaskSucceeded, task.State, task.Error)
	_, err = orch.GetVMStatus(ctx, id.String())
	require.ErrorIs(t, err, types.ErrNotFound)
}

// TestOutputCapClamped: a caller cannot raise the operator's output cap.
// A command printing 5 MiB under a 64 KiB worker cap, asking for 100 MiB,
// keeps 64 KiB, says so in its task result, and the worker's process
// allocates a bounded amount for it (the docker stack runs the worker in
// this process, so its allocations are this process's).
func TestOutputCapClamped(t *testing.T) {
	const workerCap = 64 << 10
	s := stack.Start(t, stack.Options{MaxOutputBytes: workerCap})
	vmID := createVM(t, s, "clamp")
	ctx := context.Background()
	five := types.Command{Cmd: "sh", Args: []string{"-c", "head -c 5242880 /dev/zero | tr '\\0' a"}, MaxOutputBytes: 100 << 20}

	// Warm up the path (connections, buffers) before measuring.
	execWait(t, s, vmID, types.Command{Cmd: "true"})
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	id, err := s.Service.ExecuteCommandTaskWithOptions(ctx, vmID.String(), five, service.ExecOptions{})
	require.NoError(t, err)
	task := waitOK(t, s.Service, id)
	runtime.ReadMemStats(&after)
	allocated := after.TotalAlloc - before.TotalAlloc
	t.Logf("allocated %d KiB in this process while the 5 MiB command ran", allocated>>10)

	var res struct {
		MaxOutputBytes int `json:"max_output_bytes"`
	}
	require.NoError(t, json.Unmarshal(task.Result, &res))
	require.Equal(t, workerCap, res.MaxOutputBytes, "the task result shows the cap applied")
	e, err := s.Service.GetExecution(ctx, id)
	require.NoError(t, err)
	require.True(t, e.StdoutTruncated)
	require.Len(t, e.Stdout, workerCap)
	// Holding the 5 MiB even once (gRPC buffers, the kept slice, the
	// string, the row) would cost well over 5 MiB; 4 MiB leaves room for the
	// stack's background work (task polling, heartbeats) meanwhile.
	require.Less(t, allocated, uint64(4<<20), "the worker allocated %d KiB for a command capped at 64 KiB", allocated>>10)

	// A smaller cap than the operator's is honoured.
	e = execWait(t, s, vmID, types.Command{Cmd: "sh", Args: []string{"-c", "echo 0123456789"}, MaxOutputBytes: 4})
	require.Equal(t, "0123", e.Stdout)
	require.True(t, e.StdoutTruncated)
}

// TestReconcileKeepsUnknownVMs: a VM the backend runs but storage has no
// row for (a worker pointed at a fresh database) survives a worker restart,
// and goes on answering commands through the backend.
func TestReconcileKeepsUnknownVMs(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := context.Background()
	orch := s.VMMs["w1"]
	spec := types.VMSpec{ID: uuid.NewString(), Name: "rowless", VCPUs: 1, MemoryMB: 128, Network: types.NetworkNone}
	_, err := orch.CreateVM(ctx, spec)
	require.NoError(t, err)
	require.NoError(t, orch.StartVM(ctx, spec.ID))
	_, err = s.Store.GetVM(ctx, spec.ID)
	require.ErrorIs(t, err, types.ErrNotFound)

	w := s.Workers["w1"]
	w.Stop()
	require.NoError(t, w.Start(ctx))
	require.NoError(t, w.Reconcile(ctx), "reconciling twice is harmless")

	st, err := orch.GetVMStatus(ctx, spec.ID)
	require.NoError(t, err, "reconcile removed a vm it has no row for")
	require.Equal(t, types.VMRunning, st.State)
	res, err := orch.ExecuteCommand(ctx, spec.ID, types.Command{Cmd: "echo", Args: []string{"alive"}}, vmm.ExecIO{})
	require.NoError(t, err)
	require.Equal(t, "alive\n", string(res.Stdout))
}

// TestProviderFromBackend: the worker records its backend's provider, and
// refuses a configured provider that names another backend.
func TestProviderFromBackend(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	orch := s.VMMs["w1"]
	_, err := worker.New(worker.Config{ID: "odd", Provider: "qemu"}, s.Store, orch, nil, nil)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.Contains(t, err.Error(), "vmm.provider")
	id := createVM(t, s, "provider")
	vm, err := s.Service.GetVM(context.Background(), id)
	require.NoError(t, err)
	require.Equal(t, orch.Capabilities().Provider, vm.Provider)
}

// TestPausedVMChecked: the worker's periodic check covers paused VMs too.
// A paused VM the backend runs again (a resume whose worker died before
// recording it) is recorded running; a paused VM whose container died is
// recorded failed with the reason.
func TestPausedVMChecked(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := t.Context()
	sn := service.Snapshots(s.Service)
	pause := func(id uuid.UUID) {
		tid, err := sn.PauseVMTask(ctx, id.String())
		require.NoError(t, err)
		waitOK(t, s.Service, tid)
	}
	orch := s.VMMs["w1"].(*docker.Orchestrator)

	resumed := createVM(t, s, "resumed-behind")
	pause(resumed)
	require.NoError(t, orch.Resume(ctx, resumed.String()))
	require.Eventually(t, func() bool {
		vm, err := s.Service.GetVM(ctx, resumed)
		return err == nil && vm.State == types.VMRunning
	}, 15*time.Second, 50*time.Millisecond, "a paused VM the backend runs must be recorded running")

	// A frozen container's processes cannot die until thawed, so the
	// container is removed behind the worker's back instead.
	killed := createVM(t, s, "killed-paused")
	pause(killed)
	require.NoError(t, orch.Client().ContainerRemove(ctx, "aetherium-"+killed.String(), container.RemoveOptions{Force: true}))
	require.Eventually(t, func() bool {
		vm, err := s.Service.GetVM(ctx, killed)
		return err == nil && vm.State == types.VMFailed && vm.Error != ""
	}, 15*time.Second, 50*time.Millisecond, "a paused VM whose container is gone must be recorded failed")
}
