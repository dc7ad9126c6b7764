package testenv

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// redisStopGrace is how long a SIGTERM'd redis-server gets to write its
// append-only file and exit before it is killed.
const redisStopGrace = 20 * time.Second

// Redis starts a private redis-server for t alone and returns its address
// (127.0.0.1:PORT). It runs as StartRedis's server does (append-only file,
// fsync every second, in a directory of t's), and it is killed when t ends.
//
// It skips t (see Skip) when redis-server is not installed.
func Redis(t testing.TB) string {
	t.Helper()
	return StartRedis(t).Addr()
}

// RedisServer is a private redis-server on 127.0.0.1 that a test can stop,
// start again on the same port and directory, and wipe, as the chaos suite
// (test/chaos) does to check what survives a Redis restart. It runs with
// the persistence the project's services use: an append-only file synced
// every second and no RDB snapshots.
type RedisServer struct {
	bin  string
	port int
	dir  string // holds data/ (the server's --dir) and redis.log

	mu     sync.Mutex
	cmd    *exec.Cmd     // nil when stopped
	exited chan struct{} // closed when cmd has exited
}

// StartRedis starts a redis-server for t alone. It is killed when t ends
// and its directory removed. It skips t (see Skip) when redis-server is
// not installed.
func StartRedis(t testing.TB) *RedisServer {
	t.Helper()
	bin, err := lookRedis()
	if err != nil {
		Skip(t, "redis-server is not installed (%v); run `make setup` to install it", err)
	}
	s := &RedisServer{bin: bin, port: FreePort(t), dir: t.TempDir()}
	if err := os.Mkdir(s.dataDir(), 0o755); err != nil {
		t.Fatalf("making redis-server's data directory: %v", err)
	}
	// Registered after t.TempDir, so it runs before the directory goes.
	t.Cleanup(s.Kill)
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	return s
}

// Addr returns the server's address, 127.0.0.1:PORT; it stays the same
// across Stop and Start.
func (s *RedisServer) Addr() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port))
}

func (s *RedisServer) dataDir() string { return filepath.Join(s.dir, "data") }
func (s *RedisServer) logPath() string { return filepath.Join(s.dir, "redis.log") }

// Start starts the server (again) on its port and data directory, so it
// loads what its append-only file holds, and waits until it answers PING.
// Starting a running server does nothing.
func (s *RedisServer) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return nil
	}
	logFile, err := os.OpenFile(s.logPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("opening redis-server's log: %w", err)
	}
	defer logFile.Close()
	cmd := exec.Command(s.bin,
		"--port", strconv.Itoa(s.port),
		"--bind", "127.0.0.1",
		"--dir", s.dataDir(),
		"--save", "",
		"--appendonly", "yes",
		"--appendfsync", "everysec",
		"--daemonize", "no",
		"--loglevel", "warning",
	)
	cmd.Dir = s.dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("running %s: %w", s.bin, err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	s.cmd, s.exited = cmd, exited
	addr := s.Addr()
	if err := waitReady("redis-server", func() error { return pingRedis(addr) }, exited, 30*time.Second); err != nil {
		s.stopLocked(syscall.SIGKILL)
		return fmt.Errorf("starting redis-server: %w; its log ends with:\n%s", err, tailFile(s.logPath(), 20))
	}
	return nil
}

// Stop shuts the server down with SIGTERM, which makes it flush its
// append-only file, and waits for it to exit. Stopping a stopped server
// does nothing.
func (s *RedisServer) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopLocked(syscall.SIGTERM)
}

// Kill kills the server with SIGKILL, as a crash would: what was written
// in the last second may be missing from its append-only file. Killing a
// stopped server does nothing.
func (s *RedisServer) Kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopLocked(syscall.SIGKILL)
}

func (s *RedisServer) stopLocked(sig syscall.Signal) {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Signal(sig)
	select {
	case <-s.exited:
	case <-time.After(redisStopGrace):
		fmt.Fprintf(os.Stderr, "testenv: redis-server (pid %d) did not stop within %s; killing it\n", s.cmd.Process.Pid, redisStopGrace)
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
	s.cmd, s.exited = nil, nil
}

// Wipe removes everything the stopped server kept, so that the next Start
// begins empty, as after a disk loss. It fails if the server runs.
func (s *RedisServer) Wipe() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return fmt.Errorf("wiping redis-server's data: it still runs; Stop it first")
	}
	if err := os.RemoveAll(s.dataDir()); err != nil {
		return fmt.Errorf("wiping redis-server's data: %w", err)
	}
	return os.Mkdir(s.dataDir(), 0o755)
}

func lookRedis() (string, error) {
	if p, err := exec.LookPath("redis-server"); err == nil {
		return p, nil
	}
	const debian = "/usr/bin/redis-server"
	if !isExecutable(debian) {
		return "", fmt.Errorf("no redis-server in PATH or at %s", debian)
	}
	return debian, nil
}

// waitReady calls check until it succeeds, the process whose exit closes
// exited is gone, or the timeout passes. name names the process in errors.
func waitReady(name string, check func() error, exited <-chan struct{}, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("%s exited before it was ready", name)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s was not ready within %s: %v", name, timeout, err)
		}
	}
}

// pingRedis sends one PING in RESP and expects +PONG.
func pingRedis(addr string) error {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := conn.Write([]byte("*1\r\n$4\r\nPING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if line = strings.TrimSpace(line); line != "+PONG" {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}
