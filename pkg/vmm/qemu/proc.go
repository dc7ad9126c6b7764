package qemu

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// proc is a VMM-side process of one VM (QEMU or vhost-device-vsock),
// started by this worker or found again from its pidfile after a restart.
type proc struct {
	pid  int
	done chan struct{} // closed when the process has exited
	// status is set before done closes: how it ended, for logs.
	status string
}

// spawn starts bin in its own session, so that a worker restart or a
// Ctrl-C on the worker does not take the VM down, with output appended to
// logPath. The child is reaped by a goroutine while this worker lives.
func spawn(bin string, args []string, logPath, pidPath string) (*proc, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	p := &proc{pid: cmd.Process.Pid, done: make(chan struct{})}
	if err := os.WriteFile(pidPath, []byte(strconv.Itoa(p.pid)+"\n"), 0o600); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("writing %s: %w", pidPath, err)
	}
	go func() {
		err := cmd.Wait()
		p.status = exitStatus(cmd.ProcessState, err)
		close(p.done)
	}()
	return p, nil
}

func exitStatus(ps *os.ProcessState, err error) string {
	if ps == nil {
		return fmt.Sprintf("wait failed: %v", err)
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return "killed by signal " + ws.Signal().String()
	}
	return fmt.Sprintf("exited with code %d", ps.ExitCode())
}

// adopt finds a process again from its pidfile. It checks that the pid
// still belongs to a process whose command line mentions marker (the VM's
// run directory), so a recycled pid is never mistaken for the VM. It
// returns nil when no such process runs.
func adopt(pidPath, marker string) *proc {
	b, err := os.ReadFile(pidPath)
	if err != nil {
		return nil
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return nil
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	// The marker is a directory: "<dir>/" so that VM vm1's directory does
	// not match VM vm10's process.
	if err != nil || !bytes.Contains(cmdline, []byte(strings.TrimSuffix(marker, "/")+"/")) {
		return nil
	}
	if stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err == nil {
		// A zombie (state Z) has exited already.
		if i := bytes.LastIndexByte(stat, ')'); i > 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
			return nil
		}
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil
	}
	p := &proc{pid: pid, done: make(chan struct{})}
	go func() {
		defer unix.Close(fd)
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			if _, err := unix.Poll(fds, -1); err == nil || !errors.Is(err, unix.EINTR) {
				break
			}
		}
		p.status = "exited (not a child of this worker, so its status is unknown)"
		close(p.done)
	}()
	return p
}

func (p *proc) alive() bool {
	if p == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop sends sig, waits up to grace, then SIGKILLs and waits for the exit.
func (p *proc) stop(sig syscall.Signal, grace time.Duration) {
	if !p.alive() {
		return
	}
	_ = syscall.Kill(p.pid, sig)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
		return
	case <-t.C:
	}
	_ = syscall.Kill(p.pid, syscall.SIGKILL)
	<-p.done
}

// waitFile waits until path exists, the process dies, or timeout passes.
func waitFile(path string, p *proc, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for delay := time.Millisecond; ; delay = min(delay*2, 20*time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if !p.alive() {
			return fmt.Errorf("it %s before creating %s", p.status, path)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %s", path, timeout)
		}
		time.Sleep(delay)
	}
}
