package postgres

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// AddVMTools inserts the rows in one transaction, keeping rows that exist.
func (s *Store) AddVMTools(ctx context.Context, vmID string, tools []types.VMTool) error {
	if err := required("vm tools", "vm id", vmID); err != nil {
		return fmt.Errorf("recording the tools of vm %s: %w", vmID, err)
	}
	for _, t := range tools {
		if t.Key == "" {
			return fmt.Errorf("recording the tools of vm %s: %w: tool %q has no cache key", vmID, types.ErrInvalid, t.Spec)
		}
	}
	if len(tools) == 0 {
		return nil
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		for _, t := range tools {
			if _, err := tx.Exec(ctx, `INSERT INTO vm_tools (vm_id, key, spec, tool, version, added_at) VALUES ($1, $2, $3, $4, $5, $6)
				ON CONFLICT (vm_id, key) DO NOTHING`, vmID, t.Key, t.Spec, t.Tool, t.Version, orNow(t.AddedAt)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return s.fail(err, "recording the tools of vm %s", vmID)
	}
	return nil
}

// ListVMTools returns a VM's rows, oldest first.
func (s *Store) ListVMTools(ctx context.Context, vmID string) ([]types.VMTool, error) {
	rows, err := s.pool.Query(ctx, `SELECT vm_id, key, spec, tool, version, added_at FROM vm_tools WHERE vm_id = $1 ORDER BY added_at, key`, vmID)
	if err != nil {
		return nil, s.fail(err, "listing the tools of vm %s", vmID)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (types.VMTool, error) {
		var t types.VMTool
		err := row.Scan(&t.VMID, &t.Key, &t.Spec, &t.Tool, &t.Version, &t.AddedAt)
		t.AddedAt = utc(t.AddedAt)
		return t, err
	})
	if err != nil {
		return nil, s.fail(err, "listing the tools of vm %s", vmID)
	}
	if out == nil {
		out = []types.VMTool{}
	}
	return out, nil
}

// ToolKeysInUse returns the keys of the VMs that are not deleted.
func (s *Store) ToolKeysInUse(ctx context.Context) ([]string, error) {
	rows, err := s.pool.Query(ctx, `SELECT DISTINCT t.key FROM vm_tools t JOIN vms v ON v.id = t.vm_id
		WHERE v.state <> $1 ORDER BY t.key`, string(types.VMDeleted))
	if err != nil {
		return nil, s.fail(err, "listing the tool cache keys in use")
	}
	keys, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, s.fail(err, "listing the tool cache keys in use")
	}
	if keys == nil {
		keys = []string{}
	}
	return keys, nil
}
