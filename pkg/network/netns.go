package network

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// Do runs fn on an OS thread switched into the Manager's network namespace
// (Config.Netns) and returns its error. Processes that fn starts
// (exec.Cmd.Start) inherit that namespace: the QEMU backend starts QEMU
// this way so that it can open its TAP. With no Config.Netns, fn runs in
// the calling goroutine.
func (m *Manager) Do(fn func() error) error {
	if m.ns < 0 {
		return fn()
	}
	return RunInNetns(m.ns, fn)
}

// RunInNetns runs fn on a locked OS thread switched into ns, in a
// goroutine of its own so the caller's thread is never touched, and
// returns fn's error. Sockets fn opens and processes it starts
// (exec.Cmd.Start) live in ns; goroutines fn starts do not. When the
// thread cannot be switched back, it stays locked and dies with its
// goroutine instead of serving other goroutines from the wrong namespace.
// A panic in fn, or fn ending its goroutine (runtime.Goexit), is returned
// as an error.
func RunInNetns(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("reading the thread's network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering network namespace: %w", err)
			return
		}
		var ferr error
		finished := false
		defer func() {
			switch r := recover(); {
			case r != nil:
				ferr = fmt.Errorf("panic in network namespace: %v", r)
			case !finished:
				ferr = fmt.Errorf("the function ended its goroutine (runtime.Goexit, t.FailNow?)")
			}
			// Leave the thread locked if it cannot go back: the runtime
			// ends it with this goroutine.
			if netns.Set(orig) == nil {
				runtime.UnlockOSThread()
			}
			errc <- ferr
		}()
		ferr = fn()
		finished = true
	}()
	return <-errc
}
