package postgres

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"

	"github.com/golang-migrate/migrate/v4"
	pgxmigrate "github.com/golang-migrate/migrate/v4/database/pgx/v5"
	"github.com/golang-migrate/migrate/v4/source/iofs"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/aetherium/aetherium-core/migrations"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// LatestVersion returns the highest migration version embedded in this
// binary: the version MigrateUp brings a database to.
func LatestVersion() uint {
	names, _ := fs.Glob(migrations.FS, "*.up.sql") // the pattern is valid
	var latest uint
	for _, name := range names {
		digits, _, _ := strings.Cut(name, "_")
		if v, err := strconv.ParseUint(digits, 10, 64); err == nil && uint(v) > latest {
			latest = uint(v)
		}
	}
	return latest
}

// MigrateUp applies every migration the database lacks. It is idempotent,
// and concurrent callers are serialized by golang-migrate's advisory lock.
// Cancelling ctx stops between migrations, never inside one.
func MigrateUp(ctx context.Context, dsn string) error {
	return runMigrate(ctx, dsn, "applying migrations", (*migrate.Migrate).Up)
}

// MigrateDown reverts the last steps migrations, or all of them when steps
// <= 0. Reverting more migrations than are applied reverts them all.
func MigrateDown(ctx context.Context, dsn string, steps int) error {
	return runMigrate(ctx, dsn, "reverting migrations", func(m *migrate.Migrate) error {
		if steps <= 0 {
			return m.Down()
		}
		err := m.Steps(-steps)
		if errors.Is(err, os.ErrNotExist) || errors.As(err, new(migrate.ErrShortLimit)) {
			return nil // fewer were applied than asked for, and those are reverted
		}
		return err
	})
}

// MigrateForce records version as the applied one and clears the dirty
// flag without running any migration, for after a failed migration was
// repaired by hand. A version of 0 records that none is applied.
func MigrateForce(ctx context.Context, dsn string, version uint) error {
	if version > LatestVersion() {
		return fmt.Errorf("%w: version %d does not exist; the latest is %d", types.ErrInvalid, version, LatestVersion())
	}
	v := int(version)
	if v == 0 {
		v = -1 // golang-migrate's "no version"
	}
	return runMigrate(ctx, dsn, fmt.Sprintf("forcing schema version %d", version), func(m *migrate.Migrate) error {
		return m.Force(v)
	})
}

// MigrateStatus returns the database's migration version, 0 when it was
// never migrated, and whether a migration failed half-way (dirty). Unlike
// golang-migrate it only reads, so it never creates schema_migrations.
func MigrateStatus(ctx context.Context, dsn string) (version uint, dirty bool, err error) {
	cfg, err := connConfig(dsn)
	if err != nil {
		return 0, false, err
	}
	addr := serverAddr(&cfg.Config)
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return 0, false, fmt.Errorf("reading the schema version: %w", connectError(addr, err))
	}
	defer conn.Close(context.WithoutCancel(ctx))
	version, dirty, err = readSchemaVersion(ctx, conn)
	if err != nil {
		return 0, false, fmt.Errorf("reading the schema version on PostgreSQL at %s: %w", addr, err)
	}
	return version, dirty, nil
}

// connConfig parses dsn for a single connection.
func connConfig(dsn string) (*pgx.ConnConfig, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("%w: parsing the PostgreSQL DSN: %v", types.ErrInvalid, err)
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = defaultConnectTimeout
	}
	return cfg, nil
}

// runMigrate runs do on a golang-migrate instance reading the embedded
// migrations. It hands golang-migrate a database/sql handle on the parsed
// DSN rather than a pgx5:// URL, so key=value DSNs and libpq environment
// variables work too.
func runMigrate(ctx context.Context, dsn, what string, do func(*migrate.Migrate) error) error {
	cfg, err := connConfig(dsn)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	addr := serverAddr(&cfg.Config)
	db := stdlib.OpenDB(*cfg)
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return fmt.Errorf("%s: %w", what, connectError(addr, err))
	}
	driver, err := pgxmigrate.WithInstance(db, &pgxmigrate.Config{})
	if err != nil {
		db.Close()
		return fmt.Errorf("%s on PostgreSQL at %s: %w", what, addr, err)
	}
	src, err := iofs.New(migrations.FS, ".")
	if err != nil {
		driver.Close()
		return fmt.Errorf("%s: reading the embedded migrations: %w", what, err)
	}
	m, err := migrate.NewWithInstance("iofs", src, "pgx5", driver)
	if err != nil {
		src.Close()
		driver.Close()
		return fmt.Errorf("%s: %w", what, err)
	}
	defer m.Close() // closes src, driver and db
	// golang-migrate takes no context; it stops between migrations when
	// told to, and then returns nil.
	stop := context.AfterFunc(ctx, func() { m.GracefulStop <- true })
	defer stop()

	err = do(m)
	if errors.Is(err, migrate.ErrNoChange) {
		err = nil
	}
	if err == nil {
		err = ctx.Err()
	}
	var dirty migrate.ErrDirty
	switch {
	case errors.As(err, &dirty):
		return fmt.Errorf("%s on PostgreSQL at %s: %w: migration %d failed half-way and left the schema dirty; repair the schema by hand, then record the version it is at with `migrate force N` (MigrateForce)",
			what, addr, types.ErrConflict, dirty.Version)
	case err != nil:
		return fmt.Errorf("%s on PostgreSQL at %s: %w", what, addr, err)
	}
	return nil
}
