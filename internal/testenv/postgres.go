package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// postgresStopGrace is how long a fast shutdown may take before the server
// is killed.
const postgresStopGrace = 30 * time.Second

var (
	postgresMu     sync.Mutex
	postgresShared *PostgresServer
	postgresErr    error
)

// Postgres returns the DSN of a new, empty database on a PostgreSQL server
// shared by every test of this test binary. The server is started on first
// use and stopped by Main, so packages that call Postgres must call Main
// from TestMain. The database is dropped when t ends.
//
// It skips t (see Skip) when PostgreSQL is not installed.
func Postgres(t testing.TB) string {
	t.Helper()
	bin, cred := lookPostgres(t)
	requireMain(t)
	postgresMu.Lock()
	if postgresShared == nil && postgresErr == nil {
		postgresShared, postgresErr = startPostgresServer(bin, cred, FreePort(t))
		if postgresErr == nil {
			AtExit(postgresShared.close)
		}
	}
	s, err := postgresShared, postgresErr
	postgresMu.Unlock()
	if err != nil {
		t.Fatalf("starting the shared PostgreSQL server: %v", err)
	}
	return s.CreateDatabase(t)
}

// UnreachablePostgresDSN returns a DSN for a port on 127.0.0.1 where
// nothing listens, for tests of what happens when PostgreSQL is down.
func UnreachablePostgresDSN(t testing.TB) string {
	t.Helper()
	return fmt.Sprintf("postgres://aetherium@127.0.0.1:%d/aetherium?sslmode=disable&connect_timeout=5", FreePort(t))
}

// PostgresServer is a private PostgreSQL server on a temporary data
// directory, listening on 127.0.0.1 only, with trust authentication for the
// superuser postgres.
type PostgresServer struct {
	// Port is where it listens; it keeps it across Stop and Start.
	Port int

	dir  string              // holds the data directory, the socket and the log
	bin  string              // directory of initdb and postgres
	cred *syscall.Credential // whom to run as; nil to stay ourselves
	dbs  atomic.Int64        // databases made by CreateDatabase

	mu     sync.Mutex
	cmd    *exec.Cmd     // nil when stopped
	exited chan struct{} // closed when cmd has exited
}

// StartPostgres starts a PostgreSQL server for t alone, for tests that stop
// and restart it. It is stopped and its directory removed when t ends. It
// skips t (see Skip) when PostgreSQL is not installed.
func StartPostgres(t testing.TB) *PostgresServer {
	t.Helper()
	bin, cred := lookPostgres(t)
	s, err := startPostgresServer(bin, cred, FreePort(t))
	if err != nil {
		t.Fatalf("starting a private PostgreSQL server: %v", err)
	}
	t.Cleanup(s.close)
	return s
}

// DSN returns the URL of database on the server, as superuser postgres.
func (s *PostgresServer) DSN(database string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", s.Port, database)
}

// CreateDatabase creates a new, empty database, returns its DSN and drops
// it when t ends (if the server still runs then).
func (s *PostgresServer) CreateDatabase(t testing.TB) string {
	t.Helper()
	name := fmt.Sprintf("test_%d_%d", os.Getpid(), s.dbs.Add(1))
	if err := s.admin("CREATE DATABASE " + name); err != nil {
		t.Fatalf("creating database %s: %v", name, err)
	}
	t.Cleanup(func() {
		if !s.running() {
			return
		}
		// FORCE ends connections a test left open.
		if err := s.admin("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)"); err != nil {
			t.Logf("dropping database %s: %v", name, err)
		}
	})
	return s.DSN(name)
}

// admin runs one statement on the postgres database.
func (s *PostgresServer) admin(sql string) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.DSN("postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, sql)
	return err
}

// lookPostgres finds PostgreSQL's binaries and, when we are root, the
// postgres user to run them as (postgres refuses to run as root). It skips
// t when either is missing.
func lookPostgres(t testing.TB) (bin string, cred *syscall.Credential) {
	t.Helper()
	bin, err := postgresBinDir()
	if err != nil {
		Skip(t, "PostgreSQL is not installed (%v); run `make setup` to install it", err)
	}
	if os.Geteuid() != 0 {
		return bin, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		Skip(t, "PostgreSQL cannot run as root and there is no postgres user to run it as (%v); run `make setup` to install PostgreSQL, which creates it", err)
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err := errors.Join(err1, err2); err != nil {
		t.Fatalf("reading the postgres user's ids: %v", err)
	}
	return bin, &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
}

// postgresBinDir returns the directory of the newest installed PostgreSQL
// server (Debian keeps each major version in /usr/lib/postgresql/N/bin), or
// of the initdb in PATH.
func postgresBinDir() (string, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(dirs, func(a, b string) int {
		va, _ := strconv.Atoi(filepath.Base(filepath.Dir(a)))
		vb, _ := strconv.Atoi(filepath.Base(filepath.Dir(b)))
		return vb - va
	})
	if p, err := exec.LookPath("initdb"); err == nil {
		dirs = append(dirs, filepath.Dir(p))
	}
	for _, d := range dirs {
		if isExecutable(filepath.Join(d, "initdb")) && isExecutable(filepath.Join(d, "postgres")) {
			return d, nil
		}
	}
	return "", errors.New("no initdb and postgres under /usr/lib/postgresql/*/bin or in PATH")
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// startPostgresServer initializes a data directory and starts the server on
// port. Durability is off (fsync and friends) since the data is thrown away.
func startPostgresServer(bin string, cred *syscall.Credential, port int) (*PostgresServer, error) {
	dir, err := os.MkdirTemp("", "aetherium-pg-")
	if err != nil {
		return nil, fmt.Errorf("making its directory: %w", err)
	}
	s := &PostgresServer{Port: port, dir: dir, bin: bin, cred: cred}
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("handing %s to the postgres user: %w", dir, err)
		}
	}
	initdb := exec.Command(filepath.Join(bin, "initdb"), "--pgdata", s.dataDir(), "--username", "postgres",
		"--auth", "trust", "--encoding", "UTF8", "--locale", "C", "--no-sync", "--no-instructions")
	initdb.Dir = dir // postgres may not be able to enter our working directory
	initdb.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if out, err := initdb.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("initdb: %w\n%s", err, out)
	}
	if err := s.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return s, nil
}

func (s *PostgresServer) dataDir() string { return filepath.Join(s.dir, "data") }
func (s *PostgresServer) logPath() string { return filepath.Join(s.dir, "postgres.log") }

func (s *PostgresServer) running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cmd != nil
}

// Start starts the server again after Stop and waits until it accepts
// connections. Starting a running server does nothing.
func (s *PostgresServer) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return nil
	}
	logFile, err := os.OpenFile(s.logPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("opening the PostgreSQL log: %w", err)
	}
	defer logFile.Close()
	cmd := exec.Command(filepath.Join(s.bin, "postgres"), "-D", s.dataDir(),
		"-c", "port="+strconv.Itoa(s.Port),
		"-c", "listen_addresses=127.0.0.1",
		"-c", "unix_socket_directories="+s.dir,
		"-c", "fsync=off",
		"-c", "synchronous_commit=off",
		"-c", "full_page_writes=off",
		"-c", "shared_buffers=16MB",
		"-c", "max_connections=200",
	)
	cmd.Dir = s.dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Pdeathsig: the server dies with the test binary even if Main never
	// runs (a panic, a timeout); its backends follow their postmaster.
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred, Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("running postgres: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	s.cmd, s.exited = cmd, exited
	if err := waitReady("postgres", s.acceptsConnections, exited, 60*time.Second); err != nil {
		s.stopLocked()
		return fmt.Errorf("%w; its log ends with:\n%s", err, tailFile(s.logPath(), 20))
	}
	return nil
}

// acceptsConnections connects to the server once.
func (s *PostgresServer) acceptsConnections() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.DSN("postgres"))
	if err != nil {
		return err
	}
	return conn.Close(ctx)
}

// Stop shuts the server down (a fast shutdown: open connections are ended)
// and waits for it to exit, keeping its data for Start. Stopping a stopped
// server does nothing.
func (s *PostgresServer) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopLocked()
}

func (s *PostgresServer) stopLocked() {
	if s.cmd == nil {
		return
	}
	pid := s.cmd.Process.Pid
	s.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-s.exited:
	case <-time.After(postgresStopGrace):
		fmt.Fprintf(os.Stderr, "testenv: postgres (pid %d) did not stop within %s; killing it\n", pid, postgresStopGrace)
		syscall.Kill(-pid, syscall.SIGKILL) // its process group: the postmaster and its backends
		<-s.exited
	}
	s.cmd, s.exited = nil, nil
}

// close stops the server and removes its directory.
func (s *PostgresServer) close() {
	s.Stop()
	if err := os.RemoveAll(s.dir); err != nil {
		fmt.Fprintf(os.Stderr, "testenv: removing PostgreSQL's directory: %v\n", err)
	}
}
