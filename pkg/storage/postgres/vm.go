package postgres

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

const vmColumns = `id, name, vcpus, memory_mb, state, provider, owner, labels, env, error, created_at, updated_at, network, tenant, expires_at, confinement, from_snapshot, on_expiry`

func scanVM(row pgx.Row) (*types.VM, error) {
	var (
		v           types.VM
		state       string
		labels, env *string
		conf        *string
	)
	err := row.Scan(&v.ID, &v.Name, &v.VCPUs, &v.MemoryMB, &state, &v.Provider, &v.Owner,
		&labels, &env, &v.Error, &v.CreatedAt, &v.UpdatedAt, &v.Network, &v.Tenant, &v.ExpiresAt, &conf, &v.FromSnapshot, &v.OnExpiry)
	if err != nil {
		return nil, err
	}
	v.State = types.VMState(state)
	if err := fromJSON(labels, &v.Labels); err != nil {
		return nil, fmt.Errorf("vm %s labels: %w", v.ID, err)
	}
	if err := fromJSON(env, &v.Env); err != nil {
		return nil, fmt.Errorf("vm %s env: %w", v.ID, err)
	}
	if err := fromJSON(conf, &v.Confinement); err != nil {
		return nil, fmt.Errorf("vm %s confinement: %w", v.ID, err)
	}
	v.CreatedAt, v.UpdatedAt = utc(v.CreatedAt), utc(v.UpdatedAt)
	if v.ExpiresAt != nil {
		t := utc(*v.ExpiresAt)
		v.ExpiresAt = &t
	}
	return &v, nil
}

// CreateVM inserts vm. Zero CreatedAt and UpdatedAt are set to now in vm,
// and an empty OnExpiry to types.ExpiryDelete.
func (s *Store) CreateVM(ctx context.Context, vm *types.VM) error {
	return s.insertVM(ctx, s.pool, vm)
}

// CreateVMWithin inserts vm if its tenant stays within lim. A transaction
// advisory lock per tenant serialises concurrent creates of one tenant, so
// two of them cannot both pass the check.
func (s *Store) CreateVMWithin(ctx context.Context, vm *types.VM, lim types.Limits) error {
	if lim == (types.Limits{}) {
		return s.CreateVM(ctx, vm)
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($1, 0))`, "aetherium.tenant:"+vm.Tenant); err != nil {
			return err
		}
		u, err := tenantUsage(ctx, tx, vm.Tenant)
		if err != nil {
			return err
		}
		if err := lim.Check(vm.Tenant, u, vm.VCPUs, vm.MemoryMB); err != nil {
			return err
		}
		return s.insertVM(ctx, tx, vm)
	})
	if err != nil {
		if errors.Is(err, types.ErrLimit) || errors.Is(err, types.ErrConflict) || errors.Is(err, types.ErrInvalid) {
			return err
		}
		return s.fail(err, "creating vm %s (name %q)", vm.ID, vm.Name)
	}
	return nil
}

// execer is what pgxpool.Pool and pgx.Tx share for statements.
type execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

func (s *Store) insertVM(ctx context.Context, db execer, vm *types.VM) error {
	if err := required("vm", "id", vm.ID); err != nil {
		return fmt.Errorf("creating vm: %w", err)
	}
	if err := types.CheckOnExpiry(vm.OnExpiry); err != nil {
		return fmt.Errorf("creating vm %s: %w", vm.ID, err)
	}
	vm.OnExpiry = cmp.Or(vm.OnExpiry, types.ExpiryDelete)
	labels, err := toJSON(vm.Labels)
	if err != nil {
		return fmt.Errorf("creating vm %s: %w", vm.ID, err)
	}
	env, err := toJSON(vm.Env)
	if err != nil {
		return fmt.Errorf("creating vm %s: %w", vm.ID, err)
	}
	conf, err := toJSON(vm.Confinement)
	if err != nil {
		return fmt.Errorf("creating vm %s: %w", vm.ID, err)
	}
	stamp(&vm.CreatedAt, &vm.UpdatedAt)
	_, err = db.Exec(ctx, `INSERT INTO vms (`+vmColumns+`)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)`,
		vm.ID, vm.Name, vm.VCPUs, vm.MemoryMB, string(vm.State), vm.Provider, vm.Owner,
		labels, env, vm.Error, vm.CreatedAt, vm.UpdatedAt, cmp.Or(vm.Network, types.NetworkNone), vm.Tenant, vm.ExpiresAt, conf, vm.FromSnapshot, vm.OnExpiry)
	if err != nil {
		return s.fail(err, "creating vm %s (name %q)", vm.ID, vm.Name)
	}
	return nil
}

// CountVMs groups the live VMs by state and provider in the database.
func (s *Store) CountVMs(ctx context.Context) ([]storage.VMCount, error) {
	rows, err := s.pool.Query(ctx, `SELECT state, provider, count(*) FROM vms WHERE state <> 'deleted' GROUP BY state, provider`)
	if err != nil {
		return nil, s.fail(err, "counting vms")
	}
	counts, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (storage.VMCount, error) {
		var c storage.VMCount
		err := row.Scan(&c.State, &c.Provider, &c.N)
		return c, err
	})
	if err != nil {
		return nil, s.fail(err, "counting vms")
	}
	return counts, nil
}

// TenantUsage sums the tenant's live VMs.
func (s *Store) TenantUsage(ctx context.Context, tenant string) (types.Usage, error) {
	u, err := tenantUsage(ctx, s.pool, tenant)
	if err != nil {
		return u, s.fail(err, "reading the usage of tenant %q", tenant)
	}
	return u, nil
}

func tenantUsage(ctx context.Context, q rowQuerier, tenant string) (types.Usage, error) {
	var u types.Usage
	err := q.QueryRow(ctx, `SELECT count(*), coalesce(sum(vcpus), 0), coalesce(sum(memory_mb), 0)
		FROM vms WHERE tenant = $1 AND state <> 'deleted'`, tenant).Scan(&u.VMs, &u.VCPUs, &u.MemoryMB)
	return u, err
}

// SetVMConfinement records (nil: clears) how a VM's VMM is confined. A
// VM that is deleted or missing is left alone: the record only describes
// live VMs.
func (s *Store) SetVMConfinement(ctx context.Context, id string, c *types.Confinement) error {
	conf, err := toJSON(c)
	if err != nil {
		return fmt.Errorf("recording the confinement of vm %s: %w", id, err)
	}
	if _, err := s.pool.Exec(ctx, `UPDATE vms SET confinement = $2 WHERE id = $1 AND state <> 'deleted'`, id, conf); err != nil {
		return s.fail(err, "recording the confinement of vm %s", id)
	}
	return nil
}

// SetVMExpiry sets or clears expires_at of a VM that is not deleted.
func (s *Store) SetVMExpiry(ctx context.Context, id string, at *time.Time) (*types.VM, error) {
	if at != nil {
		t := at.UTC().Truncate(time.Microsecond)
		at = &t
	}
	vm, err := scanVM(s.pool.QueryRow(ctx, `UPDATE vms SET expires_at = $2, updated_at = $3
		WHERE id = $1 AND state <> 'deleted' RETURNING `+vmColumns, id, at, now()))
	if errors.Is(err, pgx.ErrNoRows) {
		cur, gerr := s.GetVM(ctx, id)
		if gerr != nil {
			return nil, gerr
		}
		return nil, fmt.Errorf("%w: vm %s is %s; its expiry cannot change", types.ErrConflict, id, cur.State)
	}
	if err != nil {
		return nil, s.fail(err, "setting the expiry of vm %s", id)
	}
	return vm, nil
}

// GetVM returns the VM with id, deleted or not.
func (s *Store) GetVM(ctx context.Context, id string) (*types.VM, error) {
	return getByID(ctx, s, "vm", id, `SELECT `+vmColumns+` FROM vms WHERE id = $1`, scanVM)
}

// ListVMs returns the VMs f selects, oldest first.
func (s *Store) ListVMs(ctx context.Context, f storage.VMFilter) ([]*types.VM, error) {
	q := `SELECT ` + vmColumns + ` FROM vms WHERE TRUE`
	var args []any
	if !f.IncludeDeleted {
		args = append(args, string(types.VMDeleted))
		q += fmt.Sprintf(` AND state <> $%d`, len(args))
	}
	if f.Owner != "" {
		args = append(args, f.Owner)
		q += fmt.Sprintf(` AND owner = $%d`, len(args))
	}
	if len(f.States) > 0 {
		states := make([]string, len(f.States))
		for i, st := range f.States {
			states[i] = string(st)
		}
		args = append(args, states)
		q += fmt.Sprintf(` AND state = ANY($%d)`, len(args))
	}
	if f.Tenant != nil {
		args = append(args, *f.Tenant)
		q += fmt.Sprintf(` AND tenant = $%d`, len(args))
	}
	if len(f.Labels) > 0 {
		// labels is TEXT holding a JSON object: containment on its jsonb.
		b, err := json.Marshal(f.Labels)
		if err != nil {
			return nil, fmt.Errorf("listing vms: %w", err)
		}
		args = append(args, string(b))
		q += fmt.Sprintf(` AND labels IS NOT NULL AND labels::jsonb @> $%d::jsonb`, len(args))
	}
	if f.ExpiredBy != nil {
		args = append(args, *f.ExpiredBy)
		q += fmt.Sprintf(` AND expires_at IS NOT NULL AND expires_at <= $%d`, len(args))
	}
	if f.After != "" {
		args = append(args, f.After)
		q += fmt.Sprintf(` AND (created_at, id) > (SELECT created_at, id FROM vms WHERE id = $%d)`, len(args))
	}
	q += ` ORDER BY created_at, id`
	if f.Limit > 0 {
		q += fmt.Sprintf(` LIMIT %d`, f.Limit)
	}
	vms, err := queryAll(ctx, s, scanVM, q, args...)
	if err != nil {
		return nil, s.fail(err, "listing vms")
	}
	return vms, nil
}

// UpdateVMState locks the VM's row, checks the transition against the state
// it holds and writes the new one, so concurrent callers cannot both move
// the VM out of the same state. UpdatedAt only changes when the state or
// the error text does.
func (s *Store) UpdateVMState(ctx context.Context, id string, to types.VMState, errMsg string) (*types.VM, error) {
	var vm *types.VM
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var from string
		err := tx.QueryRow(ctx, `SELECT state FROM vms WHERE id = $1 FOR UPDATE`, id).Scan(&from)
		if errors.Is(err, pgx.ErrNoRows) {
			return notFound("vm", id)
		}
		if err != nil {
			return err
		}
		if err := types.CheckTransition(types.VMState(from), to); err != nil {
			return err
		}
		vm, err = scanVM(tx.QueryRow(ctx, `UPDATE vms SET state = $2, error = $3,
				updated_at = CASE WHEN state = $2 AND error = $3 THEN updated_at ELSE $4 END
			WHERE id = $1 RETURNING `+vmColumns,
			id, string(to), errMsg, now()))
		return err
	})
	if err != nil {
		return nil, s.fail(err, "moving vm %s to %s", id, to)
	}
	return vm, nil
}

// UpdateOwnedVMState is one conditional UPDATE: the state and owner
// checks and the write cannot be separated by another writer.
func (s *Store) UpdateOwnedVMState(ctx context.Context, id, owner string, from, to types.VMState, errMsg string) (bool, error) {
	if err := required("conditional update", "owner", owner); err != nil {
		return false, fmt.Errorf("moving vm %s to %s: %w", id, to, err)
	}
	if err := types.CheckTransition(from, to); err != nil {
		return false, fmt.Errorf("moving vm %s to %s: %w", id, to, err)
	}
	tag, err := s.pool.Exec(ctx, `UPDATE vms SET state = $4, error = $5, updated_at = $6
		WHERE id = $1 AND owner = $2 AND state = $3`, id, owner, string(from), string(to), errMsg, now())
	if err != nil {
		return false, s.fail(err, "moving vm %s from %s to %s", id, from, to)
	}
	return tag.RowsAffected() == 1, nil
}

// ClaimVM sets the VM's owner, provider and (if given) network if it has no
// owner. An owner, once set, never changes, so the follow-up read that
// explains a refused claim cannot race with another claim.
func (s *Store) ClaimVM(ctx context.Context, id string, c storage.Claim) (*types.VM, error) {
	if err := required("claim", "owner", c.Owner); err != nil {
		return nil, fmt.Errorf("claiming vm %s: %w", id, err)
	}
	if err := required("claim", "provider", c.Provider); err != nil {
		return nil, fmt.Errorf("claiming vm %s: %w", id, err)
	}
	if c.Network != "" {
		if err := types.ValidateNetwork(c.Network); err != nil {
			return nil, fmt.Errorf("claiming vm %s: %w", id, err)
		}
	}
	vm, err := scanVM(s.pool.QueryRow(ctx, `UPDATE vms SET owner = $2, provider = $3,
			network = CASE WHEN $4 = '' THEN network ELSE $4 END, updated_at = $5
		WHERE id = $1 AND owner = '' RETURNING `+vmColumns, id, c.Owner, c.Provider, c.Network, now()))
	if err == nil {
		return vm, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return nil, s.fail(err, "claiming vm %s for %s", id, c.Owner)
	}
	vm, err = s.GetVM(ctx, id)
	switch {
	case err != nil:
		return nil, fmt.Errorf("claiming vm %s for %s: %w", id, c.Owner, err)
	case vm.Owner != c.Owner:
		return nil, fmt.Errorf("claiming vm %s for %s: %w: worker %s owns it", id, c.Owner, types.ErrConflict, vm.Owner)
	}
	return vm, nil
}

// lostFrom are the states a VM leaves for types.VMLost when its owner dies.
var lostFrom = []string{string(types.VMPending), string(types.VMCreating), string(types.VMRunning),
	string(types.VMPaused), string(types.VMSuspended), string(types.VMStopping), string(types.VMStopped)}

// MarkOwnerVMsLost is one UPDATE over the owner's VMs in lostFrom.
func (s *Store) MarkOwnerVMsLost(ctx context.Context, owner, msg string) ([]*types.VM, error) {
	if err := required("marking vms lost", "owner", owner); err != nil {
		return nil, err
	}
	vms, err := queryAll(ctx, s, scanVM, `UPDATE vms SET state = 'lost', error = $2, updated_at = $3
		WHERE owner = $1 AND state = ANY($4) RETURNING `+vmColumns, owner, msg, now(), lostFrom)
	if err != nil {
		return nil, s.fail(err, "marking the vms of worker %s lost", owner)
	}
	return vms, nil
}
