// Package postgres is the PostgreSQL implementation of storage.Store, built
// on pgx v5, together with the functions that apply the schema embedded in
// the migrations package with golang-migrate.
//
// Errors wrap the kinds in pkg/types: missing rows types.ErrNotFound, unique
// clashes and illegal VM transitions types.ErrConflict, rejected values
// types.ErrInvalid and a database that cannot be reached
// types.ErrUnavailable.
package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// defaultConnectTimeout bounds each connection attempt when the DSN sets no
// connect_timeout, so that a server that drops packets fails Open instead
// of hanging it.
const defaultConnectTimeout = 5 * time.Second

// startHint is what a person should do when PostgreSQL cannot be reached.
const startHint = "start it with `make services-up`"

// Store is a storage.Store on a PostgreSQL connection pool. It is safe for
// concurrent use.
type Store struct {
	pool *pgxpool.Pool
	addr string // where the server is, for messages
}

var _ storage.Store = (*Store)(nil)

// Open connects to the PostgreSQL server dsn names (a postgres:// URL or
// key=value string) and checks that it answers. It does not migrate the
// schema; call MigrateUp for that. When the server cannot be reached the
// error wraps types.ErrUnavailable and says how to start it.
func Open(ctx context.Context, dsn string) (*Store, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("%w: parsing the PostgreSQL DSN: %v", types.ErrInvalid, err)
	}
	if cfg.ConnConfig.ConnectTimeout == 0 {
		cfg.ConnConfig.ConnectTimeout = defaultConnectTimeout
	}
	addr := serverAddr(&cfg.ConnConfig.Config)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, connectError(addr, err)
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, connectError(addr, err)
	}
	return &Store{pool: pool, addr: addr}, nil
}

// Close closes every connection. It waits for statements in flight.
func (s *Store) Close() { s.pool.Close() }

// Ping checks that the server answers.
func (s *Store) Ping(ctx context.Context) error {
	if err := s.pool.Ping(ctx); err != nil {
		return s.fail(err, "pinging PostgreSQL")
	}
	return nil
}

// SchemaVersion returns the migration version recorded in
// schema_migrations: 0 when no migration was ever applied.
func (s *Store) SchemaVersion(ctx context.Context) (uint, bool, error) {
	v, dirty, err := readSchemaVersion(ctx, s.pool)
	if err != nil {
		return 0, false, s.fail(err, "reading the schema version")
	}
	return v, dirty, nil
}

// rowQuerier is what pgxpool.Pool, pgx.Conn and pgx.Tx share.
type rowQuerier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

func readSchemaVersion(ctx context.Context, q rowQuerier) (uint, bool, error) {
	var (
		version int64
		dirty   bool
	)
	err := q.QueryRow(ctx, `SELECT version, dirty FROM schema_migrations LIMIT 1`).Scan(&version, &dirty)
	var pgErr *pgconn.PgError
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return 0, false, nil
	case errors.As(err, &pgErr) && pgErr.Code == "42P01": // undefined_table: never migrated
		return 0, false, nil
	case err != nil:
		return 0, false, err
	case version < 0: // golang-migrate's "no version", left dirty by a failed first migration
		return 0, dirty, nil
	}
	return uint(version), dirty, nil
}

// serverAddr describes where cfg connects, for messages.
func serverAddr(cfg *pgconn.Config) string {
	if strings.HasPrefix(cfg.Host, "/") {
		return fmt.Sprintf("%s/.s.PGSQL.%d", cfg.Host, cfg.Port)
	}
	return net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port)))
}

// connectError explains why connecting to the server at addr failed.
func connectError(addr string, err error) error {
	if errors.Is(err, context.Canceled) {
		return fmt.Errorf("connecting to PostgreSQL at %s: %w", addr, err)
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case pgErr.Code == "3D000": // invalid_catalog_name
			return fmt.Errorf("%w: PostgreSQL at %s: %s; create it, or run `make services-up` for the development database", types.ErrUnavailable, addr, pgErr.Message)
		case strings.HasPrefix(pgErr.Code, "28"): // invalid authorization
			return fmt.Errorf("%w: PostgreSQL at %s refused the login: %s; check the storage user and password", types.ErrInvalid, addr, pgErr.Message)
		}
	}
	// The innermost network error ("connect: connection refused") reads
	// better than pgx's full chain, which repeats the address.
	cause := err
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Err != nil {
		cause = opErr.Err
	}
	return fmt.Errorf("%w: cannot reach PostgreSQL at %s: %w; %s", types.ErrUnavailable, addr, cause, startHint)
}

// fail wraps err, which happened while doing what format describes, with
// the error kind it belongs to.
func (s *Store) fail(err error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	if errors.Is(err, types.ErrNotFound) || errors.Is(err, types.ErrConflict) ||
		errors.Is(err, types.ErrInvalid) || errors.Is(err, types.ErrUnavailable) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: %w", what, err)
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch kind, text := classify(pgErr); kind {
		case nil:
			return fmt.Errorf("%s: %w", what, err)
		case types.ErrUnavailable:
			// The server is going away or not ready: explained below.
		default:
			return fmt.Errorf("%s: %w: %s", what, kind, text)
		}
	} else if !lostConnection(err) {
		return fmt.Errorf("%s: %w", what, err)
	}
	return fmt.Errorf("%s: %w: PostgreSQL at %s: %w; check that it runs, or %s", what, types.ErrUnavailable, s.addr, err, startHint)
}

// constraintText explains a violated constraint to a person. Names are those
// of migrations/*.sql.
var constraintText = map[string]string{
	"vms_pkey":                    "a vm with this id already exists",
	"vms_name_live_key":           "the name is taken by a vm that is not deleted; choose another name or delete that vm first",
	"vms_vcpus_check":             "a vm needs at least 1 vcpu",
	"vms_memory_mb_check":         fmt.Sprintf("a vm needs at least %d MiB of memory", types.MinMemoryMB),
	"vms_state_check":             "unknown vm state",
	"tasks_pkey":                  "a task with this id already exists",
	"tasks_state_check":           "unknown task state",
	"tasks_attempts_check":        "attempts must not be negative",
	"jobs_pkey":                   "a job with this id already exists",
	"jobs_state_check":            "unknown job state",
	"jobs_vm_id_fkey":             "its vm does not exist",
	"executions_vm_id_fkey":       "its vm does not exist",
	"executions_job_id_fkey":      "its job does not exist",
	"workers_pkey":                "a worker with this id already exists",
	"vms_network_valid":           "unknown network mode; use none or nat",
	"network_leases_pkey":         "the vm already holds an address lease",
	"network_leases_pool_ip_key":  "the address is leased to another vm",
	"network_leases_ip_in_subnet": "the address is outside the pool's subnet",
	"e2b_sandboxes_pkey":          "the vm has a sandbox already",
	"e2b_sandboxes_vm_id_fkey":    "its vm does not exist",
	"templates_pkey":              "a template with this name already exists; delete it first or pick another name",
	"templates_vcpus_check":       "a template needs at least 1 vcpu",
	"templates_memory_mb_check":   fmt.Sprintf("a template needs at least %d MiB of memory", types.MinMemoryMB),
}

// classify maps a server error to an error kind and a message, or returns
// a nil kind when none fits.
func classify(e *pgconn.PgError) (kind error, text string) {
	text = constraintText[e.ConstraintName]
	if text == "" {
		text = e.Message
	}
	switch {
	case e.Code == "23505": // unique_violation
		return types.ErrConflict, text
	case e.Code == "23503": // foreign_key_violation
		return types.ErrNotFound, text
	case e.Code == "23514", e.Code == "23502", // check_violation, not_null_violation
		e.Code == "22021", e.Code == "22P05": // bad UTF-8 or NUL in text
		return types.ErrInvalid, text
	case strings.HasPrefix(e.Code, "08"), // connection_exception
		e.Code == "57P01", e.Code == "57P02", e.Code == "57P03", // shutting down, starting up
		e.Code == "53300": // too_many_connections
		return types.ErrUnavailable, e.Message
	}
	return nil, ""
}

// lostConnection reports whether err means the server went away.
func lostConnection(err error) bool {
	var (
		connectErr *pgconn.ConnectError
		netErr     net.Error
	)
	return errors.As(err, &connectErr) || errors.As(err, &netErr) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE)
}

// getByID reads the one row query selects by id with scan. A missing row
// is "<what> <id> not found".
func getByID[T any](ctx context.Context, s *Store, what, id, query string, scan func(pgx.Row) (*T, error)) (*T, error) {
	v, err := scan(s.pool.QueryRow(ctx, query, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, notFound(what, id)
	}
	if err != nil {
		return nil, s.fail(err, "reading %s %s", what, id)
	}
	return v, nil
}

// queryAll reads every row query returns with scan.
func queryAll[T any](ctx context.Context, s *Store, scan func(pgx.Row) (*T, error), query string, args ...any) ([]*T, error) {
	rows, err := s.pool.Query(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*T, error) { return scan(r) })
}

// notFound is the error for a missing row, e.g. "vm 1234 not found".
func notFound(what, id string) error {
	return fmt.Errorf("%s %s %w", what, id, types.ErrNotFound)
}

// required checks that a field the schema cannot do without is set.
func required(what, field, value string) error {
	if value == "" {
		return fmt.Errorf("%w: %s has no %s", types.ErrInvalid, what, field)
	}
	return nil
}

// now is the time stored for rows that do not bring their own. PostgreSQL
// keeps microseconds, so the value callers see matches what is read back.
func now() time.Time { return time.Now().UTC().Truncate(time.Microsecond) }

// orNow returns t, or now when t is zero.
func orNow(t time.Time) time.Time {
	if t.IsZero() {
		return now()
	}
	return t
}

// stamp fills in a zero creation time with now and a zero update time with
// the creation time.
func stamp(created, updated *time.Time) {
	*created = orNow(*created)
	if updated.IsZero() {
		*updated = *created
	}
}

// toJSON encodes v for a nullable TEXT column: nil maps and slices become
// NULL so that they read back as nil.
func toJSON(v any) (*string, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("%w: encoding %T as JSON: %v", types.ErrInvalid, v, err)
	}
	if string(b) == "null" {
		return nil, nil
	}
	s := string(b)
	return &s, nil
}

// fromJSON decodes a nullable TEXT column written by toJSON into dst.
func fromJSON(col *string, dst any) error {
	if col == nil {
		return nil
	}
	if err := json.Unmarshal([]byte(*col), dst); err != nil {
		return fmt.Errorf("decoding stored JSON: %w", err)
	}
	return nil
}

// rawJSON stores a json.RawMessage as is (TEXT keeps its bytes, unlike
// JSONB); empty becomes NULL.
func rawJSON(what string, m json.RawMessage) (*string, error) {
	if len(m) == 0 {
		return nil, nil
	}
	if !json.Valid(m) {
		return nil, fmt.Errorf("%w: %s is not valid JSON", types.ErrInvalid, what)
	}
	s := string(m)
	return &s, nil
}

// fromRawJSON is the inverse of rawJSON.
func fromRawJSON(col *string) json.RawMessage {
	if col == nil {
		return nil
	}
	return json.RawMessage(*col)
}

// nullIfEmpty stores "" as NULL in optional reference columns.
func nullIfEmpty(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// utc returns t in UTC; pgx reads timestamptz in the local zone.
func utc(t time.Time) time.Time { return t.UTC() }

// RunExclusive holds a PostgreSQL transaction-level advisory lock, keyed by
// the hash of name, while fn runs. The lock is taken with
// pg_try_advisory_xact_lock in a transaction kept open for fn's duration,
// so it ends with the transaction: at commit, or when the connection drops
// (a crashed holder, a restarted server).
func (s *Store) RunExclusive(ctx context.Context, name string, fn func(context.Context) error) (bool, error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return false, s.fail(err, "taking lock %s", name)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // a no-op after Commit
	var got bool
	if err := tx.QueryRow(ctx, `SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))`, name).Scan(&got); err != nil {
		return false, s.fail(err, "taking lock %s", name)
	}
	if !got {
		return false, nil
	}
	ferr := fn(ctx)
	if err := tx.Commit(ctx); err != nil && ferr == nil {
		return true, s.fail(err, "releasing lock %s", name)
	}
	return true, ferr
}
