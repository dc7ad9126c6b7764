package postgres

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/aetherium/aetherium-core/pkg/types"
)

const apiKeyColumns = `id, name, tenant, admin, hash, max_vms, max_vcpus, max_memory_mb, created_at, revoked_at`

func scanAPIKey(row pgx.Row) (*types.APIKey, error) {
	var k types.APIKey
	err := row.Scan(&k.ID, &k.Name, &k.Tenant, &k.Admin, &k.Hash, &k.Limits.MaxVMs, &k.Limits.MaxVCPUs,
		&k.Limits.MaxMemoryMB, &k.CreatedAt, &k.RevokedAt)
	if err != nil {
		return nil, err
	}
	k.CreatedAt = utc(k.CreatedAt)
	if k.RevokedAt != nil {
		t := utc(*k.RevokedAt)
		k.RevokedAt = &t
	}
	return &k, nil
}

// CreateAPIKey inserts k. A zero CreatedAt is set to now in k.
func (s *Store) CreateAPIKey(ctx context.Context, k *types.APIKey) error {
	if err := required("api key", "id", k.ID); err != nil {
		return fmt.Errorf("creating api key: %w", err)
	}
	if len(k.Hash) == 0 {
		return fmt.Errorf("creating api key %s: %w: the hash is empty", k.ID, types.ErrInvalid)
	}
	k.CreatedAt = orNow(k.CreatedAt)
	_, err := s.pool.Exec(ctx, `INSERT INTO api_keys (`+apiKeyColumns+`) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)`,
		k.ID, k.Name, k.Tenant, k.Admin, k.Hash, k.Limits.MaxVMs, k.Limits.MaxVCPUs, k.Limits.MaxMemoryMB, k.CreatedAt, k.RevokedAt)
	if err != nil {
		return s.fail(err, "creating api key %s", k.ID)
	}
	return nil
}

// GetAPIKey returns the key with id.
func (s *Store) GetAPIKey(ctx context.Context, id string) (*types.APIKey, error) {
	return getByID(ctx, s, "api key", id, `SELECT `+apiKeyColumns+` FROM api_keys WHERE id = $1`, scanAPIKey)
}

// ListAPIKeys returns every key, oldest first.
func (s *Store) ListAPIKeys(ctx context.Context) ([]*types.APIKey, error) {
	ks, err := queryAll(ctx, s, scanAPIKey, `SELECT `+apiKeyColumns+` FROM api_keys ORDER BY created_at, id`)
	if err != nil {
		return nil, s.fail(err, "listing api keys")
	}
	return ks, nil
}

// RevokeAPIKey sets revoked_at once; later calls keep the first time.
func (s *Store) RevokeAPIKey(ctx context.Context, id string) (*types.APIKey, error) {
	k, err := scanAPIKey(s.pool.QueryRow(ctx, `UPDATE api_keys SET revoked_at = coalesce(revoked_at, $2)
		WHERE id = $1 RETURNING `+apiKeyColumns, id, now()))
	if err == pgx.ErrNoRows {
		return nil, notFound("api key", id)
	}
	if err != nil {
		return nil, s.fail(err, "revoking api key %s", id)
	}
	return k, nil
}
