package worker

import "context"

// MarkDeadOwners lets the external tests run one sweep of markDeadOwners.
func MarkDeadOwners(ctx context.Context, w *Worker) error { return w.markDeadOwners(ctx) }
