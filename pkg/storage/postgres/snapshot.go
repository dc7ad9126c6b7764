package postgres

import (
	"cmp"
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

const snapshotColumns = `id, name, kind, vm_id, owner, provider, vcpus, memory_mb, network, tools, setup, env, dir,
	size_bytes, state, error, tenant, created_at, updated_at`

func scanSnapshot(row pgx.Row) (*types.Snapshot, error) {
	var (
		sn               types.Snapshot
		kind, state      string
		toolsJSON, envJS *string
	)
	err := row.Scan(&sn.ID, &sn.Name, &kind, &sn.VMID, &sn.Owner, &sn.Provider, &sn.VCPUs, &sn.MemoryMB, &sn.Network,
		&toolsJSON, &sn.Setup, &envJS, &sn.Dir, &sn.SizeBytes, &state, &sn.Error, &sn.Tenant, &sn.CreatedAt, &sn.UpdatedAt)
	if err != nil {
		return nil, err
	}
	sn.Kind, sn.State = types.SnapshotKind(kind), types.SnapshotState(state)
	if err := fromJSON(toolsJSON, &sn.Tools); err != nil {
		return nil, fmt.Errorf("snapshot %s tools: %w", sn.ID, err)
	}
	if err := fromJSON(envJS, &sn.Env); err != nil {
		return nil, fmt.Errorf("snapshot %s env: %w", sn.ID, err)
	}
	sn.CreatedAt, sn.UpdatedAt = utc(sn.CreatedAt), utc(sn.UpdatedAt)
	return &sn, nil
}

// CreateSnapshot inserts sn; zero timestamps are set to now, an empty
// state to creating.
func (s *Store) CreateSnapshot(ctx context.Context, sn *types.Snapshot) error {
	if err := required("snapshot", "id", sn.ID); err != nil {
		return err
	}
	if err := types.ValidateSnapshotName(sn.Kind, sn.Name); err != nil {
		return err
	}
	tools, err := toJSON(sn.Tools)
	if err != nil {
		return fmt.Errorf("creating snapshot %s: %w", sn.ID, err)
	}
	env, err := toJSON(sn.Env)
	if err != nil {
		return fmt.Errorf("creating snapshot %s: %w", sn.ID, err)
	}
	sn.State = cmp.Or(sn.State, types.SnapshotCreating)
	sn.Network = cmp.Or(sn.Network, types.NetworkNone)
	stamp(&sn.CreatedAt, &sn.UpdatedAt)
	_, err = s.pool.Exec(ctx, `INSERT INTO snapshots (`+snapshotColumns+`)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)`,
		sn.ID, sn.Name, string(sn.Kind), sn.VMID, sn.Owner, sn.Provider, sn.VCPUs, sn.MemoryMB, sn.Network,
		tools, sn.Setup, env, sn.Dir, sn.SizeBytes, string(sn.State), sn.Error, sn.Tenant, sn.CreatedAt, sn.UpdatedAt)
	if err != nil {
		return s.fail(err, "creating %s %q", sn.Kind, sn.Name)
	}
	return nil
}

// GetSnapshot returns the snapshot with id.
func (s *Store) GetSnapshot(ctx context.Context, id string) (*types.Snapshot, error) {
	return getByID(ctx, s, "snapshot", id, `SELECT `+snapshotColumns+` FROM snapshots WHERE id = $1`, scanSnapshot)
}

// FindSnapshot returns the live snapshot of kind named name.
func (s *Store) FindSnapshot(ctx context.Context, kind types.SnapshotKind, name string) (*types.Snapshot, error) {
	sn, err := scanSnapshot(s.pool.QueryRow(ctx, `SELECT `+snapshotColumns+` FROM snapshots
		WHERE kind = $1 AND name = $2 AND state <> 'deleted'`, string(kind), name))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, notFound(string(kind), name)
	}
	if err != nil {
		return nil, s.fail(err, "reading %s %s", kind, name)
	}
	return sn, nil
}

// ListSnapshots returns the live snapshots of kind, by name.
func (s *Store) ListSnapshots(ctx context.Context, kind types.SnapshotKind, tenant *string) ([]*types.Snapshot, error) {
	out, err := queryAll(ctx, s, scanSnapshot, `SELECT `+snapshotColumns+` FROM snapshots
		WHERE state <> 'deleted' AND ($1 = '' OR kind = $1) AND ($2::text IS NULL OR tenant = $2)
		ORDER BY name, id`, string(kind), tenant)
	if err != nil {
		return nil, s.fail(err, "listing snapshots")
	}
	return out, nil
}

// UpdateSnapshot applies u in one statement.
func (s *Store) UpdateSnapshot(ctx context.Context, id string, u storage.SnapshotUpdate) (*types.Snapshot, error) {
	var state *string
	if u.State != nil {
		st := string(*u.State)
		state = &st
	}
	sn, err := scanSnapshot(s.pool.QueryRow(ctx, `UPDATE snapshots SET
			state = COALESCE($2, state),
			error = COALESCE($3, error),
			dir = COALESCE($4, dir),
			size_bytes = COALESCE($5, size_bytes),
			owner = COALESCE($6, owner),
			provider = COALESCE($7, provider),
			vm_id = COALESCE($8, vm_id),
			updated_at = $9
		WHERE id = $1 RETURNING `+snapshotColumns,
		id, state, u.Error, u.Dir, u.SizeBytes, u.Owner, u.Provider, u.VMID, now()))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, notFound("snapshot", id)
	}
	if err != nil {
		return nil, s.fail(err, "updating snapshot %s", id)
	}
	return sn, nil
}

// ListSnapshotClones returns the VMs started from snapshot id that are
// not deleted.
func (s *Store) ListSnapshotClones(ctx context.Context, id string) ([]*types.VM, error) {
	vms, err := queryAll(ctx, s, scanVM, `SELECT `+vmColumns+` FROM vms
		WHERE from_snapshot = $1 AND state <> 'deleted' ORDER BY created_at, id`, id)
	if err != nil {
		return nil, s.fail(err, "listing the vms started from snapshot %s", id)
	}
	return vms, nil
}
