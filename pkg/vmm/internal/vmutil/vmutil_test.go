package vmutil

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestKeyedMutex(t *testing.T) {
	var k KeyedMutex
	var mu sync.Mutex
	inside := map[string]int{}
	var wg sync.WaitGroup
	for i := range 40 {
		key := []string{"a", "b"}[i%2]
		wg.Go(func() {
			unlock := k.Lock(key)
			mu.Lock()
			inside[key]++
			if inside[key] != 1 {
				t.Errorf("two holders of %s", key)
			}
			mu.Unlock()
			time.Sleep(time.Millisecond)
			mu.Lock()
			inside[key]--
			mu.Unlock()
			unlock()
		})
	}
	wg.Wait()
	if len(k.locks) != 0 {
		t.Fatalf("%d entries left after every unlock", len(k.locks))
	}
	// Different keys do not block each other.
	ua := k.Lock("a")
	done := make(chan struct{})
	go func() { k.Lock("b")(); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Second):
		t.Fatal("lock b waited for lock a")
	}
	ua()
}

func TestLockContext(t *testing.T) {
	var k KeyedMutex
	unlock := k.Lock("a")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := k.LockContext(ctx, "a"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want the deadline", err)
	}
	unlock()
	u, err := k.LockContext(context.Background(), "a")
	if err != nil {
		t.Fatal(err)
	}
	u()
	if len(k.locks) != 0 {
		t.Fatalf("%d entries left", len(k.locks))
	}
}

func TestTail(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "log")
	if got := Tail(p, 3); !strings.HasPrefix(got, "(no output:") {
		t.Fatalf("missing file: %q", got)
	}
	os.WriteFile(p, nil, 0o600)
	if got := Tail(p, 3); got != "(empty)" {
		t.Fatalf("empty file: %q", got)
	}
	os.WriteFile(p, []byte("1\n2\n3\n4\n"), 0o600)
	if got := Tail(p, 2); got != "3\n4" {
		t.Fatalf("Tail = %q", got)
	}
	big := strings.Repeat("x", 100<<10) + "\nlast\n"
	os.WriteFile(p, []byte(big), 0o600)
	if got := Tail(p, 1); got != "last" {
		t.Fatalf("Tail of a big file = %q", got)
	}
}

// TestKeyedMutexAcrossProcesses: KeyedMutex values sharing a Dir (as two
// orchestrators in two processes do; each flock is its own open file, so
// separate values in one process contend the same way) exclude each other
// per key, even while lock files are removed and made again on every
// release, and leave no file behind.
func TestKeyedMutexAcrossProcesses(t *testing.T) {
	dir := t.TempDir()
	ms := make([]*KeyedMutex, 4)
	for i := range ms {
		ms[i] = &KeyedMutex{Dir: dir}
	}
	var inside atomic.Int32
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Go(func() {
			unlock, err := ms[i%len(ms)].LockContext(context.Background(), "vm-a")
			if err != nil {
				t.Error(err)
				return
			}
			if inside.Add(1) != 1 {
				t.Error("two holders of vm-a")
			}
			time.Sleep(time.Millisecond)
			inside.Add(-1)
			unlock()
		})
	}
	wg.Wait()
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 0 {
		t.Fatalf("lock files left behind: %v %v", entries, err)
	}

	unlock := ms[0].Lock("vm-b")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := ms[1].LockContext(ctx, "vm-b"); !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("a held lock gave %v, want a deadline error naming another process", err)
	}
	if _, err := ms[1].LockContext(context.Background(), "../x"); err == nil {
		t.Fatal("a key that is a path was accepted")
	}
	unlock()
	u2, err := ms[1].LockContext(context.Background(), "vm-b")
	if err != nil {
		t.Fatal(err)
	}
	u2()
}
