package testenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// dockerdStopGrace is how long a stopping dockerd gets to stop its
// containers and its containerd before it is killed.
const dockerdStopGrace = 20 * time.Second

var (
	dockerdMu   sync.Mutex
	dockerdHost string
	dockerdErr  error
	// dockerdStop stops the running engine; nil when none runs.
	dockerdStop func()
)

// Dockerd returns the host ("unix:///...") of a private Docker engine shared
// by every test of this test binary. The engine is started on first use with
// its own socket, data root and exec root, without touching the host's
// network (no bridge, no iptables), and it is stopped by Main. Packages that
// call Dockerd must call Main from TestMain.
//
// It skips t (see Skip) when dockerd is not installed.
func Dockerd(t testing.TB) string {
	t.Helper()
	bin, err := lookDockerd()
	if err != nil {
		Skip(t, "dockerd is not installed (%v); install docker.io with `make setup`", err)
	}
	dockerdMu.Lock()
	defer dockerdMu.Unlock()
	if dockerdHost == "" && dockerdErr == nil {
		requireMain(t)
		dockerdHost, dockerdStop, dockerdErr = startDockerd(bin)
		if dockerdErr == nil {
			AtExit(stopDockerd)
		}
	}
	if dockerdErr != nil {
		t.Fatalf("starting a private dockerd: %v", dockerdErr)
	}
	return dockerdHost
}

func lookDockerd() (string, error) {
	if p, err := exec.LookPath("dockerd"); err == nil {
		return p, nil
	}
	// Debian installs it in /usr/sbin, which a non-root PATH may lack.
	const debian = "/usr/sbin/dockerd"
	if _, err := os.Stat(debian); err != nil {
		return "", fmt.Errorf("no dockerd in PATH or at %s", debian)
	}
	return debian, nil
}

// stopDockerd stops the shared engine, if one runs, so that the next call
// to Dockerd starts a new one.
func stopDockerd() {
	dockerdMu.Lock()
	defer dockerdMu.Unlock()
	if dockerdStop != nil {
		dockerdStop()
	}
	dockerdHost, dockerdStop, dockerdErr = "", nil, nil
}

// startDockerd starts dockerd and waits until it answers /_ping. Its
// directory lives under /tmp with a short name because containerd's sockets
// end up below the exec root and unix socket paths are limited to 108 bytes.
func startDockerd(bin string) (host string, stop func(), err error) {
	dir, err := os.MkdirTemp("", "aed-")
	if err != nil {
		return "", nil, fmt.Errorf("making its directory: %w", err)
	}
	sock := filepath.Join(dir, "docker.sock")
	logPath := filepath.Join(dir, "dockerd.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("creating its log: %w", err)
	}
	defer logFile.Close()

	cmd := exec.Command(bin,
		"--host", "unix://"+sock,
		"--data-root", filepath.Join(dir, "data"),
		"--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "docker.pid"),
		"--bridge=none",
		"--iptables=false",
		"--ip-masq=false",
		"--ip-forward=false",
	)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its temporary files, and its containerd's (which dumps its stacks
	// to $TMPDIR/containerd.PID.stacks.log on some shutdowns), go below
	// its directory, removed with it.
	tmp := filepath.Join(dir, "tmp")
	if err := os.Mkdir(tmp, 0o700); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("making its temporary directory: %w", err)
	}
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	// SIGTERM rather than SIGKILL on our death, so that dockerd still stops
	// its containers and its containerd on the way out.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM, Setpgid: true}
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("running %s: %w", bin, err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	stop = func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(dockerdStopGrace):
			fmt.Fprintf(os.Stderr, "testenv: dockerd (pid %d) did not stop within %s; killing it\n", cmd.Process.Pid, dockerdStopGrace)
			cmd.Process.Kill()
			<-exited
		}
		if err := os.RemoveAll(dir); err != nil {
			fmt.Fprintf(os.Stderr, "testenv: removing dockerd's directory: %v\n", err)
		}
	}

	if err := waitPing(sock, exited, 60*time.Second); err != nil {
		stop()
		return "", nil, fmt.Errorf("%w; its log ends with:\n%s", err, tailFile(logPath, 20))
	}
	return "unix://" + sock, stop, nil
}

// waitPing polls the engine's /_ping until it answers OK, the process exits
// or the timeout passes.
func waitPing(sock string, exited <-chan struct{}, timeout time.Duration) error {
	hc := &http.Client{
		Timeout: 2 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}},
	}
	defer hc.CloseIdleConnections()
	return waitReady("dockerd", func() error {
		resp, err := hc.Get("http://docker/_ping")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return errors.New(resp.Status)
		}
		return nil
	}, exited, timeout)
}

// tailFile returns the last n lines of a file, for error messages.
func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}
