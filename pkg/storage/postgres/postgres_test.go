package postgres_test

import (
	"context"
	"io/fs"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/migrations"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
	"github.com/aetherium/aetherium-core/pkg/storage/storagetest"
	"github.com/aetherium/aetherium-core/pkg/types"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// openMigrated returns a store on a new, migrated database.
func openMigrated(t *testing.T, dsn string) *postgres.Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	require.NoError(t, postgres.MigrateUp(ctx, dsn))
	return openUnmigrated(t, dsn)
}

func TestStore(t *testing.T) {
	storagetest.Run(t, func(t *testing.T) storage.Store {
		return openMigrated(t, testenv.Postgres(t))
	})
}

func TestMigrations(t *testing.T) {
	ctx := t.Context()
	dsn := testenv.Postgres(t)
	latest := postgres.LatestVersion()

	requireStatus := func(want uint) {
		t.Helper()
		v, dirty, err := postgres.MigrateStatus(ctx, dsn)
		require.NoError(t, err)
		require.False(t, dirty)
		require.Equal(t, want, v)
	}
	tableExists := func(name string) bool {
		t.Helper()
		conn, err := pgx.Connect(ctx, dsn)
		require.NoError(t, err)
		defer conn.Close(ctx)
		var exists bool
		require.NoError(t, conn.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, name).Scan(&exists))
		return exists
	}

	requireStatus(0)
	require.False(t, tableExists("schema_migrations"), "MigrateStatus must not create anything")

	require.NoError(t, postgres.MigrateUp(ctx, dsn))
	requireStatus(latest)
	require.NoError(t, postgres.MigrateUp(ctx, dsn), "migrating an up-to-date database is a no-op")
	requireStatus(latest)
	for _, table := range []string{"vms", "tasks", "executions", "jobs", "workers"} {
		require.True(t, tableExists(table), table)
	}

	s, err := postgres.Open(ctx, dsn)
	require.NoError(t, err)
	defer s.Close()
	v, dirty, err := s.SchemaVersion(ctx)
	require.NoError(t, err)
	require.False(t, dirty)
	require.Equal(t, latest, v)

	require.NoError(t, postgres.MigrateDown(ctx, dsn, 1))
	requireStatus(latest - 1)
	if latest == 1 {
		require.False(t, tableExists("vms"))
	}
	require.NoError(t, postgres.MigrateUp(ctx, dsn))
	requireStatus(latest)

	require.NoError(t, postgres.MigrateDown(ctx, dsn, 0), "0 steps means all of them")
	requireStatus(0)
	for _, table := range []string{"vms", "tasks", "executions", "jobs", "workers"} {
		require.False(t, tableExists(table), table)
	}
	require.NoError(t, postgres.MigrateDown(ctx, dsn, 0), "reverting nothing is a no-op")
	require.NoError(t, postgres.MigrateDown(ctx, dsn, 3), "reverting more than is applied is a no-op")
	requireStatus(0)

	// Two workers starting at once with auto-migrate.
	errs := make(chan error, 2)
	for range 2 {
		go func() { errs <- postgres.MigrateUp(ctx, dsn) }()
	}
	require.NoError(t, <-errs)
	require.NoError(t, <-errs)
	requireStatus(latest)
}

// TestDirtySchema checks what happens after a migration failed half-way:
// migrating refuses with ErrConflict and says what to do, status and the
// store report it, and MigrateForce clears it.
func TestDirtySchema(t *testing.T) {
	ctx := t.Context()
	dsn := testenv.Postgres(t)
	latest := postgres.LatestVersion()
	require.NoError(t, postgres.MigrateUp(ctx, dsn))
	conn, err := pgx.Connect(ctx, dsn)
	require.NoError(t, err)
	_, err = conn.Exec(ctx, `UPDATE schema_migrations SET dirty = true`)
	require.NoError(t, err)
	conn.Close(ctx)

	err = postgres.MigrateUp(ctx, dsn)
	require.ErrorIs(t, err, types.ErrConflict)
	require.Contains(t, err.Error(), "migrate force")
	v, dirty, err := postgres.MigrateStatus(ctx, dsn)
	require.NoError(t, err)
	require.True(t, dirty)
	require.Equal(t, latest, v)
	s := openUnmigrated(t, dsn)
	_, dirty, err = s.SchemaVersion(ctx)
	require.NoError(t, err)
	require.True(t, dirty)

	require.ErrorIs(t, postgres.MigrateForce(ctx, dsn, latest+1), types.ErrInvalid)
	require.NoError(t, postgres.MigrateForce(ctx, dsn, latest))
	v, dirty, err = postgres.MigrateStatus(ctx, dsn)
	require.NoError(t, err)
	require.False(t, dirty)
	require.Equal(t, latest, v)
	require.NoError(t, postgres.MigrateUp(ctx, dsn))
}

// openUnmigrated opens a store and leaves the schema as it is.
func openUnmigrated(t *testing.T, dsn string) *postgres.Store {
	t.Helper()
	s, err := postgres.Open(t.Context(), dsn)
	require.NoError(t, err)
	t.Cleanup(s.Close)
	return s
}

func TestLatestVersion(t *testing.T) {
	ups, err := fs.Glob(migrations.FS, "*.up.sql")
	require.NoError(t, err)
	downs, err := fs.Glob(migrations.FS, "*.down.sql")
	require.NoError(t, err)
	require.Len(t, downs, len(ups), "every migration needs a down file")
	require.Equal(t, uint(len(ups)), postgres.LatestVersion(), "versions are numbered 1, 2, 3...")
}

func TestUnreachable(t *testing.T) {
	ctx := t.Context()
	dsn := testenv.UnreachablePostgresDSN(t)
	for _, tc := range []struct {
		name string
		call func() error
	}{
		{"Open", func() error { _, err := postgres.Open(ctx, dsn); return err }},
		{"MigrateUp", func() error { return postgres.MigrateUp(ctx, dsn) }},
		{"MigrateDown", func() error { return postgres.MigrateDown(ctx, dsn, 1) }},
		{"MigrateStatus", func() error { _, _, err := postgres.MigrateStatus(ctx, dsn); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			require.ErrorIs(t, err, types.ErrUnavailable)
			require.Regexp(t, "cannot reach PostgreSQL at 127\\.0\\.0\\.1:[0-9]+: .*connection refused; start it with `make services-up`", err.Error())
		})
	}
}

func TestOpenInvalidDSN(t *testing.T) {
	_, err := postgres.Open(t.Context(), "postgres://user:secret@[::1/db")
	require.ErrorIs(t, err, types.ErrInvalid)
	require.NotContains(t, err.Error(), "secret", "the password must not leak into messages")
}

// TestServerGoesAway stops the server under an open store: calls fail with
// ErrUnavailable, and work again once the server is back.
func TestServerGoesAway(t *testing.T) {
	ctx := t.Context()
	srv := testenv.StartPostgres(t)
	s := openMigrated(t, srv.CreateDatabase(t))
	vm := &types.VM{ID: "vm-1", Name: "web", VCPUs: 1, MemoryMB: 128, State: types.VMRunning}
	require.NoError(t, s.CreateVM(ctx, vm))

	srv.Stop()
	_, err := s.GetVM(ctx, vm.ID)
	require.ErrorIs(t, err, types.ErrUnavailable)
	require.ErrorIs(t, s.Ping(ctx), types.ErrUnavailable)

	require.NoError(t, srv.Start())
	require.Eventually(t, func() bool { return s.Ping(ctx) == nil }, 10*time.Second, 50*time.Millisecond)
	got, err := s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	require.Equal(t, "web", got.Name)
}
