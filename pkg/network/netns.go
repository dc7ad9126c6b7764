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
	return runInNetns(m.ns, fn)
}

// runInNetns runs fn on a locked thread switched into ns, in a goroutine of
// its own so the caller's thread is never touched. When the thread cannot
// be switched back, it stays locked and dies with its goroutine instead of
// serving other goroutines from the wrong namespace.
func runInNetns(ns netns.NsHandle, fn func() error) error {
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
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			// Leave the thread locked: the runtime ends it with this goroutine.
			errc <- ferr
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
