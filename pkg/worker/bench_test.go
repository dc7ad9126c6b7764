package worker_test

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// BenchmarkExecuteCommandTask measures the whole asynchronous path:
// ExecuteCommandTask -> queue -> worker -> agent -> stored execution ->
// WaitTask returns. Sub-benchmarks compare the worker's poll interval
// (Asynq's default is 1s) and waiting by notification vs polling the
// database. Each reports its median and p90 per operation.
//
//	go test -run '^$' -bench BenchmarkExecuteCommandTask -benchtime 100x ./pkg/worker
func BenchmarkExecuteCommandTask(b *testing.B) {
	for _, bc := range []struct {
		name     string
		interval time.Duration
		poll     bool
	}{
		{"interval=5ms/wait=notify", 5 * time.Millisecond, false},
		{"interval=5ms/wait=poll-pg-10ms", 5 * time.Millisecond, true},
		{"interval=20ms/wait=notify", 20 * time.Millisecond, false},
		{"interval=100ms/wait=notify", 100 * time.Millisecond, false},
		{"interval=1s/wait=notify", time.Second, false},
	} {
		b.Run(bc.name, func(b *testing.B) {
			s := stack.Start(b, stack.Options{TaskCheckInterval: bc.interval})
			ctx := context.Background()
			vmID, err := s.Service.CreateVMTask(ctx, "bench", 1, 256)
			require.NoError(b, err)
			task, err := s.Service.WaitTask(ctx, vmID)
			require.NoError(b, err)
			require.Equal(b, types.TaskSucceeded, task.State, task.Error)
			b.ResetTimer()
			testenv.Measure(b, func() {
				id, err := s.Service.ExecuteCommandTask(ctx, vmID.String(), "true", nil)
				if err != nil {
					b.Fatal(err)
				}
				if bc.poll {
					pollStored(b, s, id)
				} else if t, err := s.Service.WaitTask(ctx, id); err != nil || t.State != types.TaskSucceeded {
					b.Fatalf("exec task: %v %+v", err, t)
				}
			})
		})
	}
}

func pollStored(b *testing.B, s *stack.Stack, id uuid.UUID) {
	for {
		if _, err := s.Service.GetExecution(context.Background(), id); err == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}
