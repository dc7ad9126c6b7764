package testenv

import (
	"fmt"
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/aetherium/aetherium-core/pkg/network"
)

// NewNetns creates a network namespace for t alone, with its loopback up,
// without moving any thread of the test into it. The namespace (and every
// link, route and nftables table in it) vanishes when t ends and the
// handle is closed. Use NetnsPath to name it in configuration and InNetns
// to run code inside it. It skips t (see Skip) when namespaces cannot be
// made, which needs root or CAP_SYS_ADMIN.
func NewNetns(t testing.TB) netns.NsHandle {
	t.Helper()
	type result struct {
		ns  netns.NsHandle
		err error
	}
	res := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			res <- result{-1, err}
			return
		}
		defer orig.Close()
		ns, err := netns.New() // also moves this thread into it
		if err != nil {
			runtime.UnlockOSThread()
			res <- result{-1, err}
			return
		}
		if err := netns.Set(orig); err != nil {
			// The thread stays locked and dies with this goroutine.
			ns.Close()
			res <- result{-1, fmt.Errorf("returning to the original namespace: %w", err)}
			return
		}
		runtime.UnlockOSThread()
		res <- result{ns, nil}
	}()
	r := <-res
	if r.err != nil {
		if os.Geteuid() != 0 {
			Skip(t, "creating a network namespace: %v; run the tests as root (they only touch namespaces they create)", r.err)
		}
		t.Fatalf("creating a network namespace: %v", r.err)
	}
	t.Cleanup(func() { r.ns.Close() })
	h, err := netlink.NewHandleAt(r.ns)
	if err != nil {
		t.Fatalf("opening netlink in the test namespace: %v", err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("bringing lo up in the test namespace: %v", err)
	}
	return r.ns
}

// NetnsPath is a path that names ns while this process holds it open, for
// configuration that takes a namespace path (network.Config.Netns).
func NetnsPath(ns netns.NsHandle) string {
	return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), int(ns))
}

// NetlinkAt returns a netlink handle acting in ns, closed when t ends.
func NetlinkAt(t testing.TB, ns netns.NsHandle) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatalf("opening netlink in a test namespace: %v", err)
	}
	t.Cleanup(h.Close)
	return h
}

// InNetns runs fn on an OS thread switched into ns, and returns when fn
// does. Sockets fn opens and processes it starts (exec.Cmd.Start) live in
// ns; goroutines fn starts do not. The thread is returned to its namespace
// afterwards, or retired if that fails. fn runs on another goroutine, so
// it should return errors rather than call t.Fatal or require.
func InNetns(t testing.TB, ns netns.NsHandle, fn func()) {
	t.Helper()
	if err := network.RunInNetns(ns, func() error { fn(); return nil }); err != nil {
		t.Fatalf("running in a test network namespace: %v", err)
	}
}
