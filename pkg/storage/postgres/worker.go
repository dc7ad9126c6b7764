package postgres

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// UpsertWorker inserts w or replaces the worker with its id. A zero
// LastSeen is set to now in w.
func (s *Store) UpsertWorker(ctx context.Context, w *types.Worker) error {
	if err := required("worker", "id", w.ID); err != nil {
		return fmt.Errorf("recording worker: %w", err)
	}
	w.LastSeen = orNow(w.LastSeen)
	_, err := s.pool.Exec(ctx, `INSERT INTO workers (`+workerColumns+`)
		VALUES ($1, $2, $3, $4, $5, $6, $7)
		ON CONFLICT (id) DO UPDATE SET hostname = EXCLUDED.hostname, provider = EXCLUDED.provider,
			healthy = EXCLUDED.healthy, detail = EXCLUDED.detail, last_seen = EXCLUDED.last_seen,
			data_addr = EXCLUDED.data_addr`,
		w.ID, w.Hostname, w.Provider, w.Healthy, w.Detail, w.LastSeen, w.DataAddr)
	if err != nil {
		return s.fail(err, "recording worker %s", w.ID)
	}
	return nil
}

// ListWorkers returns every worker that ever reported, by id.
func (s *Store) ListWorkers(ctx context.Context) ([]*types.Worker, error) {
	ws, err := queryAll(ctx, s, scanWorker, `SELECT `+workerColumns+` FROM workers ORDER BY id`)
	if err != nil {
		return nil, s.fail(err, "listing workers")
	}
	return ws, nil
}

// GetWorker returns the worker with id.
func (s *Store) GetWorker(ctx context.Context, id string) (*types.Worker, error) {
	return getByID(ctx, s, "worker", id, `SELECT `+workerColumns+` FROM workers WHERE id = $1`, scanWorker)
}

const workerColumns = `id, hostname, provider, healthy, detail, last_seen, data_addr`

func scanWorker(row pgx.Row) (*types.Worker, error) {
	var w types.Worker
	if err := row.Scan(&w.ID, &w.Hostname, &w.Provider, &w.Healthy, &w.Detail, &w.LastSeen, &w.DataAddr); err != nil {
		return nil, err
	}
	w.LastSeen = utc(w.LastSeen)
	return &w, nil
}
