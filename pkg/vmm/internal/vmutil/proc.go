package vmutil

import (
	"bytes"
	"context"
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

// Proc is a VMM-side process of one VM (QEMU, Firecracker, or the
// vhost-device-vsock of a qemu VM started before the serial channel), started by this worker or found again from its pidfile
// after a restart. Its end is watched in both cases: through Wait for a
// child, through a pidfd for an adopted process, so nobody polls kill(0).
type Proc struct {
	pid  int
	done chan struct{} // closed when the process has exited
	// status is set before done closes: how it ended, for logs.
	status string
}

// Spawn starts cmd in its own session, so that a worker restart or a
// Ctrl-C on the worker does not take the VM down, and writes its pid to
// pidPath. start starts cmd (nil: cmd.Start); a backend passes one that
// runs cmd.Start in the network's namespace. The child is reaped by a
// goroutine while this worker lives.
func Spawn(cmd *exec.Cmd, pidPath string, start func() error) (*Proc, error) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setsid = true
	if start == nil {
		start = cmd.Start
	}
	if err := start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", cmd.Path, err)
	}
	p := &Proc{pid: cmd.Process.Pid, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		p.status = exitStatus(cmd.ProcessState, err)
		close(p.done)
	}()
	if err := os.WriteFile(pidPath, []byte(strconv.Itoa(p.pid)+"\n"), 0o600); err != nil {
		p.Stop(syscall.SIGKILL, 0)
		return nil, fmt.Errorf("writing %s: %w", pidPath, err)
	}
	return p, nil
}

// SpawnLogged is Spawn for bin with args, its output appended to logPath.
func SpawnLogged(bin string, args []string, logPath, pidPath string, start func(*exec.Cmd) error) (*Proc, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	var s func() error
	if start != nil {
		s = func() error { return start(cmd) }
	}
	return Spawn(cmd, pidPath, s)
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

// afterPidfdOpen, when set by a test, runs between opening the pidfd and
// checking the process, where a pid reuse is the race Adopt must survive.
var afterPidfdOpen func(pid int)

// Adopt finds a process again from its pidfile and returns nil when no
// process of the VM runs. The pidfd is opened first and the process
// checked after: owns must accept its command line (split at NULs), it
// must not be a zombie, and the pidfd must still reach a live process
// once the command line has been read. A pid reused by another process
// between the steps then fails the check (the pinned process is gone),
// and one reused after it cannot be reached through the pidfd, so a
// stranger is never adopted.
func Adopt(pidPath string, owns func(args []string) bool) *Proc {
	b, err := os.ReadFile(pidPath)
	if err != nil {
		return nil
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return nil
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil
	}
	if afterPidfdOpen != nil {
		afterPidfdOpen(pid)
	}
	// The command line is read through /proc/PID, which names whatever
	// process holds the pid now. Only if the pinned process is still
	// alive after that read was the command line its own: a process that
	// died before the read may have handed its pid to the one read.
	if !isOwned(pid, owns) || unix.PidfdSendSignal(fd, 0, nil, 0) != nil {
		unix.Close(fd)
		return nil
	}
	p := &Proc{pid: pid, done: make(chan struct{})}
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

// isOwned reports whether pid is alive (not a zombie) and owns accepts
// its command line.
func isOwned(pid int, owns func(args []string) bool) bool {
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil || !owns(strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")) {
		return false
	}
	if stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err == nil {
		// The state follows the command name in parentheses; Z has exited.
		if i := bytes.LastIndexByte(stat, ')'); i > 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
			return false
		}
	}
	return true
}

// MentionsDir returns an owns function for Adopt that accepts a command
// line with an argument under dir: the VM's run directory marks its
// processes. "<dir>/" is looked for, so VM vm1's directory does not match
// VM vm10's process.
func MentionsDir(dir string) func([]string) bool {
	marker := strings.TrimSuffix(dir, "/") + "/"
	return func(args []string) bool {
		for _, a := range args {
			if strings.Contains(a, marker) {
				return true
			}
		}
		return false
	}
}

// HasFlag returns an owns function for Adopt that accepts a command line
// with "flag value" or "flag=value".
func HasFlag(flag, value string) func([]string) bool {
	return func(args []string) bool {
		for i, a := range args {
			if a == flag+"="+value || (a == flag && i+1 < len(args) && args[i+1] == value) {
				return true
			}
		}
		return false
	}
}

// Pid returns the process id.
func (p *Proc) Pid() int { return p.pid }

// Done is closed once the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Status says how the process ended; it is valid once Done is closed.
func (p *Proc) Status() string {
	select {
	case <-p.done:
		return p.status
	default:
		return "running"
	}
}

// Alive reports whether the process runs; a nil Proc does not.
func (p *Proc) Alive() bool {
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

// Signal sends sig to a process that still runs.
func (p *Proc) Signal(sig syscall.Signal) error {
	if !p.Alive() {
		return nil
	}
	if err := syscall.Kill(p.pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return err
	}
	return nil
}

// Wait waits up to d for the process to end, or until ctx ends, and
// reports whether it has ended.
func (p *Proc) Wait(ctx context.Context, d time.Duration) bool {
	if !p.Alive() {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.done:
		return true
	case <-t.C:
	case <-ctx.Done():
	}
	return false
}

// Stop sends sig, waits up to grace, then SIGKILLs and waits for the exit.
func (p *Proc) Stop(sig syscall.Signal, grace time.Duration) {
	if !p.Alive() {
		return
	}
	_ = syscall.Kill(p.pid, sig)
	if p.Wait(context.Background(), grace) {
		return
	}
	_ = syscall.Kill(p.pid, syscall.SIGKILL)
	<-p.done
}

// WaitFile waits until path exists, p dies, or timeout passes.
func WaitFile(path string, p *Proc, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for delay := time.Millisecond; ; delay = min(delay*2, 20*time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if !p.Alive() {
			return fmt.Errorf("it %s before creating %s", p.Status(), path)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %s", path, timeout)
		}
		time.Sleep(delay)
	}
}
