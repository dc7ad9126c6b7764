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
	"syscall"
	"testing"
	"time"
)

// Redis starts a private redis-server for t alone and returns its address
// (127.0.0.1:PORT). It keeps nothing on disk, and it is killed when t ends.
//
// It skips t (see Skip) when redis-server is not installed.
func Redis(t testing.TB) string {
	t.Helper()
	bin, err := lookRedis()
	if err != nil {
		Skip(t, "redis-server is not installed (%v); run `make setup` to install it", err)
	}
	dir := t.TempDir()
	logPath := filepath.Join(dir, "redis.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatalf("creating redis-server's log: %v", err)
	}
	defer logFile.Close()
	port := strconv.Itoa(FreePort(t))
	addr := net.JoinHostPort("127.0.0.1", port)
	cmd := exec.Command(bin,
		"--port", port,
		"--bind", "127.0.0.1",
		"--dir", dir,
		"--save", "",
		"--appendonly", "no",
		"--daemonize", "no",
		"--loglevel", "warning",
	)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("running %s: %v", bin, err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	// Registered after t.TempDir, so it runs before the directory goes.
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	if err := waitReady("redis-server", func() error { return pingRedis(addr) }, exited, 30*time.Second); err != nil {
		t.Fatalf("starting redis-server: %v; its log ends with:\n%s", err, tailFile(logPath, 20))
	}
	return addr
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
