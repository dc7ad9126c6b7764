package vmutil

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
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
