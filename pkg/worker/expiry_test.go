package worker_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
)

// expiryDeadline is how soon after its expiry a VM must be gone.
const expiryDeadline = 5 * time.Second

func createTTL(t *testing.T, s *stack.Stack, name string, ttl time.Duration) *types.VM {
	t.Helper()
	id, err := s.Service.CreateVMTaskWithOptions(t.Context(), service.CreateVMOptions{Name: name, VCPUs: 1, MemoryMB: 128, TTL: ttl})
	require.NoError(t, err)
	waitOK(t, s.Service, id)
	vm, err := s.Service.GetVM(t.Context(), id)
	require.NoError(t, err)
	require.NotNil(t, vm.ExpiresAt)
	return vm
}

// requireExpired waits until vm is deleted in storage and in the backend,
// no later than expiryDeadline after its expiry, and checks the vm:delete
// task that records why.
func requireExpired(t *testing.T, s *stack.Stack, vm *types.VM) {
	t.Helper()
	ctx := t.Context()
	gone := func() bool {
		got, err := s.Store.GetVM(ctx, vm.ID)
		if err != nil || got.State != types.VMDeleted {
			return false
		}
		_, err = s.VMMs[vm.Owner].GetVMStatus(ctx, vm.ID)
		return err != nil
	}
	require.Eventually(t, gone, time.Until(vm.ExpiresAt.Add(expiryDeadline)), 50*time.Millisecond,
		"vm %s expired at %s and is not gone %s later", vm.ID, vm.ExpiresAt, expiryDeadline)
	_, err := s.VMMs[vm.Owner].GetVMStatus(ctx, vm.ID)
	require.ErrorIs(t, err, types.ErrNotFound, "the container must be gone")

	tasks, err := s.Store.ListTasks(ctx, vm.ID)
	require.NoError(t, err)
	var deletes []*types.Task
	for _, task := range tasks {
		if task.Type == types.TaskVMDelete {
			deletes = append(deletes, task)
		}
	}
	require.Len(t, deletes, 1, "one deletion, recorded once")
	require.Equal(t, types.TaskSucceeded, deletes[0].State, deletes[0].Error)
	var res map[string]any
	require.NoError(t, json.Unmarshal(deletes[0].Result, &res))
	require.Equal(t, "expired", res["note"])
	require.Equal(t, vm.Owner, res["worker_id"])
}

func TestTTLExpiry(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	keep := createVM(t, s, "keep")
	vm := createTTL(t, s, "ttl", 2*time.Second)
	require.WithinDuration(t, vm.CreatedAt.Add(2*time.Second), *vm.ExpiresAt, time.Second)
	requireExpired(t, s, vm)

	got, err := s.Service.GetVM(t.Context(), keep)
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, got.State, "a VM without a TTL stays")
}

// TestTTLExpiryAcrossRestart: a VM that expires while its worker is down
// is deleted by the worker's next start.
func TestTTLExpiryAcrossRestart(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	vm := createTTL(t, s, "ttl-restart", 3*time.Second)
	s.Workers[vm.Owner].Stop()
	time.Sleep(time.Until(vm.ExpiresAt.Add(500 * time.Millisecond)))
	got, err := s.Store.GetVM(t.Context(), vm.ID)
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, got.State, "nobody deletes it while its worker is down")

	w := s.NewWorker(t, vm.Owner)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	require.NoError(t, w.Start(ctx))
	// The deadline counts from the restart: the VM expired while nobody
	// could delete it.
	restarted := *vm
	restarted.ExpiresAt = ptr(time.Now())
	requireExpired(t, s, &restarted)
}

func ptr[T any](v T) *T { return &v }

// testExpiryPause: a VM made with OnExpiry pause is, at its expiry,
// suspended (a backend that can) or paused (docker), recorded as a task
// noted "expired"; its expiry is cleared, so it is not deleted later; a
// resume brings it back with its files and a process it ran.
func testExpiryPause(t *testing.T, s *stack.Stack, want types.VMState, taskType types.TaskType) {
	ctx := t.Context()
	// A long TTL first, so that a slow create or exec under load cannot
	// meet the expiry; then a short one.
	id, err := s.Service.CreateVMTaskWithOptions(ctx, service.CreateVMOptions{Name: "autopause", VCPUs: 1, MemoryMB: 256,
		TTL: time.Hour, OnExpiry: types.ExpiryPause})
	require.NoError(t, err)
	waitOK(t, s.Service, id)
	sh(t, s, id, "echo kept > /tmp/autopause && (sleep 600 & echo $! > /tmp/sleeper)")
	vm, err := s.Service.SetVMTTL(ctx, id, 2*time.Second)
	require.NoError(t, err)
	require.Equal(t, types.ExpiryPause, vm.OnExpiry)
	require.NotNil(t, vm.ExpiresAt)

	paused := func() bool {
		got, err := s.Store.GetVM(ctx, vm.ID)
		return err == nil && got.State == want && got.ExpiresAt == nil
	}
	require.Eventually(t, paused, time.Until(vm.ExpiresAt.Add(expiryDeadline)), 50*time.Millisecond,
		"vm %s expired at %s and is not %s with its expiry cleared %s later", vm.ID, vm.ExpiresAt, want, expiryDeadline)
	tasks, err := s.Store.ListTasks(ctx, vm.ID)
	require.NoError(t, err)
	var ops []*types.Task
	for _, task := range tasks {
		require.NotEqual(t, types.TaskVMDelete, task.Type, "an autopause VM is not deleted")
		if task.Type == taskType {
			ops = append(ops, task)
		}
	}
	require.Len(t, ops, 1, "one %s, recorded once", taskType)
	require.Equal(t, types.TaskSucceeded, ops[0].State, ops[0].Error)
	var res map[string]any
	require.NoError(t, json.Unmarshal(ops[0].Result, &res))
	require.Equal(t, "expired", res["note"])

	// Past two more expiry rounds it is still there, paused.
	time.Sleep(2 * time.Second)
	got, err := s.Store.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	require.Equal(t, want, got.State)

	rid, err := service.Snapshots(s.Service).ResumeVMTask(ctx, vm.ID)
	require.NoError(t, err)
	waitOK(t, s.Service, rid)
	require.Equal(t, "kept\nalive\n", sh(t, s, id, "cat /tmp/autopause; kill -0 $(cat /tmp/sleeper) && echo alive"))
}

func TestTTLExpiryPauseDocker(t *testing.T) {
	testExpiryPause(t, stack.Start(t, stack.Options{}), types.VMPaused, types.TaskVMPause)
}

func TestTTLExpiryPauseQemu(t *testing.T) {
	testExpiryPause(t, stack.Start(t, stack.Options{Provider: qemu.Provider}), types.VMSuspended, types.TaskVMSuspend)
}

// TestTTLExpiryPauseNotRunning: at its expiry, an on-expiry-pause VM that
// is stopped only loses its expiry; it is kept, not deleted.
func TestTTLExpiryPauseNotRunning(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := t.Context()
	id, err := s.Service.CreateVMTaskWithOptions(ctx, service.CreateVMOptions{Name: "stopped-autopause", VCPUs: 1, MemoryMB: 128,
		TTL: time.Hour, OnExpiry: types.ExpiryPause})
	require.NoError(t, err)
	waitOK(t, s.Service, id)
	sid, err := s.Service.StopVMTask(ctx, id.String())
	require.NoError(t, err)
	waitOK(t, s.Service, sid)
	stopped, err := s.Service.SetVMTTL(ctx, id, 2*time.Second)
	require.NoError(t, err)

	require.Eventually(t, func() bool {
		got, err := s.Store.GetVM(ctx, stopped.ID)
		return err == nil && got.ExpiresAt == nil
	}, time.Until(stopped.ExpiresAt.Add(expiryDeadline)), 50*time.Millisecond, "the stopped vm's expiry was not cleared")
	got, err := s.Store.GetVM(ctx, stopped.ID)
	require.NoError(t, err)
	require.Equal(t, types.VMStopped, got.State, "a stopped vm is kept, not deleted")
}

// TestExpiryTaskOfDeadRun: an expiry's task runs in the worker, outside
// the queue, so if the worker dies during it nothing retries that row.
// The worker's next run fails it with the reason, instead of leaving it
// running forever; the expiry then acts again under a new task.
func TestExpiryTaskOfDeadRun(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	ctx := t.Context()
	vm := createVM(t, s, "expiry-dead-run").String()
	got, err := s.Store.GetVM(ctx, vm)
	require.NoError(t, err)
	owner := got.Owner
	s.Workers[owner].Stop()

	// The row the expiry of the killed run left (see expiryTask).
	now := time.Now().UTC()
	row := &types.Task{ID: uuid.NewString(), Type: types.TaskVMDelete, VMID: vm, Payload: json.RawMessage(`{"vm_id":"` + vm + `"}`),
		State: types.TaskRunning, Attempts: 1, WorkerID: owner, CreatedAt: now, UpdatedAt: now}
	require.NoError(t, s.Store.CreateTask(ctx, row))

	w := s.NewWorker(t, owner)
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	require.NoError(t, w.Start(sctx))
	task, err := s.Store.GetTask(ctx, row.ID)
	require.NoError(t, err)
	require.Equal(t, types.TaskFailed, task.State, "a dead run's expiry task is failed as the worker starts")
	require.Contains(t, task.Error, "stopped before this task finished")

	got, err = s.Store.GetVM(ctx, vm)
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, got.State, "the VM is not touched: it had no expiry")
}
