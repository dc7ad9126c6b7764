package worker

import (
	"context"
	"log/slog"
	"testing"

	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"
)

// TestBookkeepingScope: the middleware records only the worker's own
// handlers. An unknown task type gets asynq's not-found error without
// touching storage (the worker here has none), and a handler run outside
// the middleware refuses rather than run unrecorded.
func TestBookkeepingScope(t *testing.T) {
	w := &Worker{log: slog.New(slog.DiscardHandler)}
	err := w.Mux().ProcessTask(t.Context(), asynq.NewTask("no:such", nil))
	require.ErrorIs(t, err, asynq.ErrHandlerNotFound)

	ran := false
	h := taskHandler(func(context.Context, *asynq.Task, *slog.Logger) (map[string]any, error) {
		ran = true
		return nil, nil
	})
	require.ErrorContains(t, h.ProcessTask(t.Context(), asynq.NewTask("vm:create", nil)), "bookkeeping middleware")
	require.False(t, ran)
}
