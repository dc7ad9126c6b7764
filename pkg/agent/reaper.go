package agent

import (
	"errors"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// waitResult is how a started command ended.
type waitResult struct {
	status syscall.WaitStatus
	err    error // the status could not be collected
}

// waiter starts commands and collects their exit status. There are two:
// the plain one that leaves waiting to os/exec, and the reaper, needed when
// orphans are re-parented to the agent.
type waiter interface {
	// start starts cmd; the channel then delivers its result exactly once.
	start(cmd *exec.Cmd) (<-chan waitResult, error)
}

// directWaiter waits with os/exec, one goroutine per command.
type directWaiter struct{}

func (directWaiter) start(cmd *exec.Cmd) (<-chan waitResult, error) {
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	ch := make(chan waitResult, 1)
	go func() {
		ps, err := cmd.Process.Wait()
		if err != nil {
			ch <- waitResult{err: err}
			return
		}
		ch <- waitResult{status: ps.Sys().(syscall.WaitStatus)}
	}()
	return ch, nil
}

// reaper collects every child of the process with wait4(-1), as init must,
// or orphans would pile up as zombies. os/exec's Wait cannot be used next to
// it: whichever calls wait first takes the status and the other gets ECHILD.
// So the reaper is the only waiter. It hands the statuses of commands the
// agent started to whoever registered their pid, and discards the rest.
//
// Starting a command and registering its pid happen under mu, and the reaper
// looks a reaped pid up under mu, so a child that exits before its pid is
// registered is still delivered: the lookup waits for the registration.
type reaper struct {
	mu      sync.Mutex
	waiting map[int]chan<- waitResult

	orphans atomic.Int64 // reaped processes nobody waited for
}

var (
	reaperOnce    sync.Once
	processReaper *reaper
)

// sharedReaper returns the process's reaper, starting it on first use.
// There is one per process because wait4(-1) sees every child.
func sharedReaper() *reaper {
	reaperOnce.Do(func() {
		r := newReaper()
		sigc := make(chan os.Signal, 1)
		signal.Notify(sigc, syscall.SIGCHLD)
		go func() {
			for range sigc {
				r.reap(wait4Any)
			}
		}()
		// Children that ended before SIGCHLD was caught.
		r.reap(wait4Any)
		processReaper = r
	})
	return processReaper
}

func newReaper() *reaper {
	return &reaper{waiting: make(map[int]chan<- waitResult)}
}

func (r *reaper) start(cmd *exec.Cmd) (<-chan waitResult, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	ch := make(chan waitResult, 1)
	r.waiting[cmd.Process.Pid] = ch
	return ch, nil
}

// wait4Any collects one ended child without blocking; pid 0 means none has
// ended.
func wait4Any(ws *syscall.WaitStatus) (int, error) {
	return syscall.Wait4(-1, ws, syscall.WNOHANG, nil)
}

// reap collects ended children until none is left. SIGCHLD is not queued,
// so one signal may stand for many children.
func (r *reaper) reap(wait4 func(*syscall.WaitStatus) (int, error)) {
	for {
		var ws syscall.WaitStatus
		pid, err := wait4(&ws)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			return // ECHILD: no children at all; 0: none has ended
		}
		r.mu.Lock()
		ch, ok := r.waiting[pid]
		delete(r.waiting, pid)
		r.mu.Unlock()
		if !ok {
			r.orphans.Add(1)
			continue
		}
		ch <- waitResult{status: ws}
	}
}

// needsReaper reports whether orphans are re-parented to this process: it
// is PID 1 (init of a VM or container), or it was made a child subreaper.
func needsReaper() bool {
	if os.Getpid() == 1 {
		return true
	}
	var on int32
	err := unix.Prctl(unix.PR_GET_CHILD_SUBREAPER, uintptr(unsafe.Pointer(&on)), 0, 0, 0)
	return err == nil && on != 0
}
