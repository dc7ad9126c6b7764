package queue_test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// blockerEnv makes the test binary, run as a child, an Asynq server whose
// handler never returns: the worker the test kills with SIGKILL.
const blockerEnv = "QUEUE_TEST_BLOCKER_REDIS"

// runBlocker serves the queue "q" until killed.
func runBlocker(addr string) {
	srv := asynq.NewServer(asynq.RedisClientOpt{Addr: addr}, asynq.Config{Concurrency: 1, Queues: map[string]int{"q": 1},
		TaskCheckInterval: 10 * time.Millisecond, LogLevel: asynq.FatalLevel})
	_ = srv.Run(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
		select {} // held until the process is killed
	}))
}

// TestExpireLeases kills a worker process while it runs a task, then
// checks that ExpireLeases lets a new server take the task over at once
// (Asynq alone would wait for the lease to lapse, 30 s, plus 30 s of grace
// and up to a minute for its recoverer). It also pins Asynq's lease layout.
func TestExpireLeases(t *testing.T) {
	addr := testenv.Redis(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := queue.NewRedis(ctx, queue.RedisConfig{Addr: addr})
	require.NoError(t, err)
	defer r.Close()

	task := &types.Task{ID: "lease-1", Type: types.TaskVMStart, Payload: json.RawMessage(`{"vm_id":"v"}`)}
	require.NoError(t, r.Enqueue(ctx, task, queue.EnqueueOptions{Queue: "q", MaxRetry: 3}))
	known, state, err := r.Known(ctx, "q", task.ID)
	require.NoError(t, err)
	require.True(t, known)
	require.Equal(t, "pending", state)
	known, _, err = r.Known(ctx, "q", "nope")
	require.NoError(t, err)
	require.False(t, known)

	child := exec.Command(os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), blockerEnv+"="+addr)
	child.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	require.NoError(t, child.Start())
	defer func() { _ = child.Process.Kill(); _ = child.Wait() }()
	require.Eventually(t, func() bool {
		_, st, err := r.Known(ctx, "q", task.ID)
		return err == nil && st == "active"
	}, 20*time.Second, 20*time.Millisecond, "the child never took the task")
	_, err = r.Client().ZScore(ctx, "asynq:{q}:lease", task.ID).Result()
	require.NoError(t, err, "Asynq's lease layout changed: update queue.leaseKey")
	require.NoError(t, child.Process.Signal(syscall.SIGKILL))
	_ = child.Wait()

	n, err := r.ExpireLeases(ctx, "q", task.ID, "not-active")
	require.NoError(t, err)
	require.Equal(t, 1, n, "only the active task's lease changes")

	ran := make(chan struct{}, 1)
	start := time.Now()
	srv := asynq.NewServer(asynq.RedisClientOpt{Addr: addr}, asynq.Config{Concurrency: 1, Queues: map[string]int{"q": 1},
		TaskCheckInterval: 10 * time.Millisecond, DelayedTaskCheckInterval: 100 * time.Millisecond, LogLevel: asynq.FatalLevel,
		RetryDelayFunc: func(int, error, *asynq.Task) time.Duration { return 0 }})
	require.NoError(t, srv.Start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		select {
		case ran <- struct{}{}:
		default:
		}
		return nil
	})))
	defer srv.Shutdown()
	select {
	case <-ran:
		t.Logf("taken over %v after the new server started", time.Since(start).Round(time.Millisecond))
	case <-time.After(15 * time.Second):
		t.Fatal("the killed worker's task was not taken over within 15 s")
	}
}

func TestRecoveryOptions(t *testing.T) {
	exec, err := queue.NewVMExecuteTask("e", queue.VMExecutePayload{VMID: "v", Command: types.Command{Cmd: "true", Timeout: time.Minute}})
	require.NoError(t, err)
	exec.Queue, exec.Attempts = "aetherium-worker-w1", 1
	o := queue.RecoveryOptions(exec)
	require.Equal(t, queue.EnqueueOptions{Queue: "aetherium-worker-w1", MaxRetry: 1, Timeout: 2 * time.Minute}, o)
	del := &types.Task{Type: types.TaskVMDelete, Queue: "q"}
	require.Equal(t, 5, queue.RecoveryOptions(del).MaxRetry)
}

func TestOutputSent(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := queue.NewRedis(ctx, queue.RedisConfig{Addr: testenv.Redis(t)})
	require.NoError(t, err)
	defer r.Close()
	o, e, ended, err := r.OutputSent(ctx, "none")
	require.NoError(t, err)
	require.Zero(t, o+e)
	require.False(t, ended)
	require.NoError(t, r.AppendOutput(ctx, "t", queue.OutputChunk{Kind: queue.OutputStdout, Data: []byte("abc")}))
	require.NoError(t, r.AppendOutput(ctx, "t", queue.OutputChunk{Kind: queue.OutputStderr, Data: []byte("de")}))
	require.NoError(t, r.AppendOutput(ctx, "t", queue.OutputChunk{Kind: queue.OutputStdout, Data: []byte("f")}))
	o, e, ended, err = r.OutputSent(ctx, "t")
	require.NoError(t, err)
	require.Equal(t, []int64{4, 2}, []int64{o, e})
	require.False(t, ended)
	require.NoError(t, r.AppendOutput(ctx, "t", queue.OutputChunk{Kind: queue.OutputExit, Exit: &queue.ExitInfo{}}))
	_, _, ended, err = r.OutputSent(ctx, "t")
	require.NoError(t, err)
	require.True(t, ended)
}
