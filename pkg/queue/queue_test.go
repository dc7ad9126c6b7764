package queue_test

import (
	"bytes"
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/types"
)

func TestMain(m *testing.M) {
	if addr := os.Getenv(blockerEnv); addr != "" {
		runBlocker(addr)
		return
	}
	testenv.Main(m)
}

func TestPayloads(t *testing.T) {
	task, err := queue.NewVMExecuteTask("t1", queue.VMExecutePayload{VMID: "v1", Command: types.Command{Cmd: "echo", Args: []string{"hi"}}})
	require.NoError(t, err)
	require.Equal(t, types.TaskVMExecute, task.Type)
	require.Equal(t, "v1", task.VMID)
	p, err := queue.Decode[queue.VMExecutePayload](task.Payload)
	require.NoError(t, err)
	require.Equal(t, []string{"hi"}, p.Command.Args)

	for _, raw := range []string{"{not json", `{"vm_id":""}`, `{"vm_id":"v","command":{"cmd":""}}`} {
		_, err := queue.Decode[queue.VMExecutePayload]([]byte(raw))
		require.ErrorIs(t, err, types.ErrInvalid, raw)
	}
	_, err = queue.Decode[queue.JobRunPayload]([]byte(`{"vm_id":"v"}`))
	require.ErrorIs(t, err, types.ErrInvalid)
	_, err = queue.NewVMCreateTask("t", queue.VMCreatePayload{})
	require.ErrorIs(t, err, types.ErrInvalid)
}

func TestRedisNotifyAndOutput(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := queue.NewRedis(ctx, queue.RedisConfig{Addr: testenv.Redis(t)})
	require.NoError(t, err)
	defer r.Close()

	events, stop, err := r.WatchTask(ctx, "t1")
	require.NoError(t, err)
	defer stop()
	require.NoError(t, r.NotifyTask(ctx, "t1"))
	select {
	case <-events:
	case <-ctx.Done():
		t.Fatal("notification lost")
	}

	// Output written before and after the reader starts arrives in order.
	require.NoError(t, r.AppendOutput(ctx, "t2", queue.OutputChunk{Kind: queue.OutputStdout, Data: []byte("a")}))
	go func() {
		time.Sleep(50 * time.Millisecond)
		_ = r.AppendOutput(ctx, "t2", queue.OutputChunk{Kind: queue.OutputStderr, Data: []byte("b")})
		_ = r.AppendOutput(ctx, "t2", queue.OutputChunk{Kind: queue.OutputStdout, Data: []byte{0, 'c'}})
		_ = r.AppendOutput(ctx, "t2", queue.OutputChunk{Kind: queue.OutputExit, Exit: &queue.ExitInfo{ExitCode: 3}})
	}()
	var out, errb bytes.Buffer
	exit, err := r.ReadOutput(ctx, "t2", func(c queue.OutputChunk) error {
		if c.Kind == queue.OutputStderr {
			errb.Write(c.Data)
		} else {
			out.Write(c.Data)
		}
		return nil
	})
	require.NoError(t, err)
	require.Equal(t, 3, exit.ExitCode)
	require.Equal(t, "a\x00c", out.String())
	require.Equal(t, "b", errb.String())
}

// TestPayloadShapeOnly: the queue checks a payload's shape, not what the
// user asked for, which the service validated before enqueueing.
func TestPayloadShapeOnly(t *testing.T) {
	raw := `{"vm_id":"v","command":{"cmd":"true","env":{"1X":"y"},"timeout":-1}}`
	p, err := queue.Decode[queue.VMExecutePayload]([]byte(raw))
	require.NoError(t, err)
	require.Equal(t, "true", p.Command.Cmd)
}
