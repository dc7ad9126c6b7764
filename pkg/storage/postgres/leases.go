package postgres

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Store keeps the address leases of VM networking in network_leases.
var _ network.LeaseStore = (*Store)(nil)

// leaseColumns reads back as scanLease expects.
const leaseColumns = `pool, vm_id, subnet::text, host(ip), created_at`

// AllocateLease implements network.LeaseStore. Allocations in one pool are
// serialized by a transaction-scoped advisory lock on the pool's name, so
// concurrent workers (in any process) never pick the same address; the
// UNIQUE (pool, ip) constraint backs that up. The lowest free address is
// found from the leases themselves: it is either First or right after a
// leased one, so no candidate list is generated.
func (s *Store) AllocateLease(ctx context.Context, req network.LeaseRequest) (network.Lease, error) {
	if err := checkLeaseRequest(req); err != nil {
		return network.Lease{}, err
	}
	what := fmt.Sprintf("leasing an address for vm %s in pool %s", req.VMID, req.Pool)
	var lease network.Lease
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($1, 0))`, "aetherium.network_leases:"+req.Pool); err != nil {
			return err
		}
		existing, err := scanLease(tx.QueryRow(ctx, `SELECT `+leaseColumns+` FROM network_leases WHERE vm_id = $1`, req.VMID))
		switch {
		case err == nil && existing.Pool != req.Pool:
			return fmt.Errorf("%w: vm %s already holds %s in pool %s; release it first", types.ErrConflict, req.VMID, existing.Addr, existing.Pool)
		case err == nil:
			lease = existing
			return nil
		case !errors.Is(err, pgx.ErrNoRows):
			return err
		}
		var ip string
		err = tx.QueryRow(ctx, `
			SELECT host(c.ip) FROM (
				SELECT $2::inet AS ip
				UNION ALL
				SELECT ip + 1 FROM network_leases WHERE pool = $1
			) c
			WHERE c.ip >= $2::inet AND c.ip <= $3::inet
			  AND NOT EXISTS (SELECT 1 FROM network_leases l WHERE l.pool = $1 AND l.ip = c.ip)
			ORDER BY c.ip
			LIMIT 1`, req.Pool, req.First.String(), req.Last.String()).Scan(&ip)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("%w: every address from %s to %s is leased; delete VMs or widen network.subnet", types.ErrUnavailable, req.First, req.Last)
		}
		if err != nil {
			return err
		}
		lease, err = scanLease(tx.QueryRow(ctx, `
			INSERT INTO network_leases (pool, vm_id, subnet, ip, created_at)
			VALUES ($1, $2, $3::cidr, $4::inet, $5)
			RETURNING `+leaseColumns, req.Pool, req.VMID, req.Subnet.Masked().String(), ip, now()))
		return err
	})
	if err != nil {
		return network.Lease{}, s.fail(err, "%s", what)
	}
	return lease, nil
}

// ReleaseLease implements network.LeaseStore.
func (s *Store) ReleaseLease(ctx context.Context, vmID string) error {
	if _, err := s.pool.Exec(ctx, `DELETE FROM network_leases WHERE vm_id = $1`, vmID); err != nil {
		return s.fail(err, "releasing the address of vm %s", vmID)
	}
	return nil
}

// ListLeases implements network.LeaseStore.
func (s *Store) ListLeases(ctx context.Context, pool string) ([]network.Lease, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+leaseColumns+` FROM network_leases WHERE pool = $1 ORDER BY ip`, pool)
	if err != nil {
		return nil, s.fail(err, "listing the leases of pool %s", pool)
	}
	leases, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (network.Lease, error) { return scanLease(r) })
	if err != nil {
		return nil, s.fail(err, "listing the leases of pool %s", pool)
	}
	return leases, nil
}

func checkLeaseRequest(req network.LeaseRequest) error {
	switch {
	case req.Pool == "" || req.VMID == "":
		return fmt.Errorf("%w: a lease request needs a pool and a vm id", types.ErrInvalid)
	case !req.Subnet.IsValid() || !req.Subnet.Contains(req.First) || !req.Subnet.Contains(req.Last) || req.Last.Less(req.First):
		return fmt.Errorf("%w: lease range %s-%s is not inside subnet %s", types.ErrInvalid, req.First, req.Last, req.Subnet)
	}
	return nil
}

func scanLease(row pgx.Row) (network.Lease, error) {
	var (
		l          network.Lease
		subnet, ip string
		createdAt  time.Time
	)
	if err := row.Scan(&l.Pool, &l.VMID, &subnet, &ip, &createdAt); err != nil {
		return l, err
	}
	var err error
	if l.Subnet, err = netip.ParsePrefix(subnet); err != nil {
		return l, fmt.Errorf("reading lease of vm %s: subnet %q: %w", l.VMID, subnet, err)
	}
	if l.Addr, err = netip.ParseAddr(ip); err != nil {
		return l, fmt.Errorf("reading lease of vm %s: address %q: %w", l.VMID, ip, err)
	}
	l.CreatedAt = createdAt
	return l, nil
}
