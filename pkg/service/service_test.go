package service_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
	"github.com/aetherium/aetherium-core/pkg/types"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// TestDependenciesDown: PostgreSQL or Redis down at start gives an error
// that says what to do, and nothing crashes.
func TestDependenciesDown(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := postgres.Open(ctx, testenv.UnreachablePostgresDSN(t))
	require.ErrorIs(t, err, types.ErrUnavailable)
	require.Contains(t, err.Error(), "make services-up")

	addr := "127.0.0.1:" + strconv.Itoa(testenv.FreePort(t))
	_, err = queue.NewRedis(ctx, queue.RedisConfig{Addr: addr})
	require.ErrorIs(t, err, types.ErrUnavailable)
	require.Contains(t, err.Error(), "cannot reach Redis at "+addr)
	require.Contains(t, err.Error(), "make services-up")
}
