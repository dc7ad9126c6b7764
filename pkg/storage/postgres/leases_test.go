package postgres_test

import (
	"fmt"
	"net/netip"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
	"github.com/aetherium/aetherium-core/pkg/types"
)

func leaseReq(pool, vmID string) network.LeaseRequest {
	return network.LeaseRequest{
		Pool: pool, VMID: vmID,
		Subnet: netip.MustParsePrefix("10.88.0.0/16"),
		First:  netip.MustParseAddr("10.88.0.2"),
		Last:   netip.MustParseAddr("10.88.255.254"),
	}
}

// TestLeasesConcurrent allocates from many goroutines, each on its own
// store (its own connection pool, as separate workers would have): every
// VM gets a distinct address, the lowest ones, and released addresses go
// back to the pool.
func TestLeasesConcurrent(t *testing.T) {
	dsn := testenv.Postgres(t)
	openMigrated(t, dsn)
	for _, n := range []int{10, 50} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			ctx := t.Context()
			pool := fmt.Sprintf("host-%d/aeth0", n)
			stores := make([]*postgres.Store, 5)
			for i := range stores {
				stores[i] = openUnmigrated(t, dsn)
			}
			got := make([]network.Lease, n)
			errs := make([]error, n)
			var wg sync.WaitGroup
			for i := range n {
				wg.Go(func() {
					got[i], errs[i] = stores[i%len(stores)].AllocateLease(ctx, leaseReq(pool, fmt.Sprintf("vm-%d", i)))
				})
			}
			wg.Wait()
			seen := map[netip.Addr]string{}
			for i, l := range got {
				require.NoError(t, errs[i])
				require.NotContains(t, seen, l.Addr, "address handed out twice")
				seen[l.Addr] = l.VMID
			}
			// The n lowest addresses, no gaps.
			want := netip.MustParseAddr("10.88.0.2")
			for range n {
				require.Contains(t, seen, want)
				want = want.Next()
			}
			listed, err := stores[0].ListLeases(ctx, pool)
			require.NoError(t, err)
			require.Len(t, listed, n)

			for i := range n {
				require.NoError(t, stores[0].ReleaseLease(ctx, fmt.Sprintf("vm-%d", i)))
			}
			listed, err = stores[0].ListLeases(ctx, pool)
			require.NoError(t, err)
			require.Empty(t, listed)
		})
	}
}

func TestLeaseLifecycle(t *testing.T) {
	ctx := t.Context()
	s := openMigrated(t, testenv.Postgres(t))
	a, err := s.AllocateLease(ctx, leaseReq("p", "vm-a"))
	require.NoError(t, err)
	require.Equal(t, "10.88.0.2", a.Addr.String())
	require.Equal(t, "10.88.0.0/16", a.Subnet.String())

	again, err := s.AllocateLease(ctx, leaseReq("p", "vm-a"))
	require.NoError(t, err)
	require.Equal(t, a.Addr, again.Addr, "allocating twice returns the same lease")

	b, err := s.AllocateLease(ctx, leaseReq("p", "vm-b"))
	require.NoError(t, err)
	require.Equal(t, "10.88.0.3", b.Addr.String())

	other, err := s.AllocateLease(ctx, leaseReq("q", "vm-c"))
	require.NoError(t, err)
	require.Equal(t, "10.88.0.2", other.Addr.String(), "pools are independent")

	_, err = s.AllocateLease(ctx, leaseReq("q", "vm-a"))
	require.ErrorIs(t, err, types.ErrConflict, "a vm holds one lease")

	require.NoError(t, s.ReleaseLease(ctx, "vm-a"))
	require.NoError(t, s.ReleaseLease(ctx, "vm-a"), "releasing twice is fine")
	d, err := s.AllocateLease(ctx, leaseReq("p", "vm-d"))
	require.NoError(t, err)
	require.Equal(t, "10.88.0.2", d.Addr.String(), "a released address is reused first")

	small := leaseReq("p", "vm-e")
	small.Last = netip.MustParseAddr("10.88.0.3")
	_, err = s.AllocateLease(ctx, small)
	require.ErrorIs(t, err, types.ErrUnavailable, "the range is full")
	require.Contains(t, err.Error(), "widen network.subnet")

	bad := leaseReq("p", "vm-f")
	bad.First = netip.MustParseAddr("192.0.2.1")
	_, err = s.AllocateLease(ctx, bad)
	require.ErrorIs(t, err, types.ErrInvalid)
}
