// Package faults lets the fault-injection tests (test/chaos) stop a real
// worker process at a named point of its work, so that they can kill it,
// or Redis or PostgreSQL, exactly there instead of guessing with sleeps.
//
// It is off unless the process's environment names a directory in DirEnv
// and the points in PointsEnv. At an enabled point, Reach creates
// DIR/<point>.reached (with a counter, so a point reached twice is seen
// twice), then waits until DIR/<point>.release exists or ctx ends. A test
// waits for the .reached file, injects its fault, and either kills the
// process or creates the .release file to let it go on. Points not listed
// cost one map lookup.
package faults

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Environment variables that enable fault points. They are read once.
const (
	DirEnv    = "AETHERIUM_TEST_FAULT_DIR"
	PointsEnv = "AETHERIUM_TEST_FAULT_POINTS"
)

// Points the worker offers. Each is named for where it stops.
const (
	// CreateBooted: a create task's VM runs, before it is marked running.
	CreateBooted = "create.booted"
	// ExecStarted: the agent reported a command's start and the worker
	// recorded it, before any output is awaited.
	ExecStarted = "exec.started"
	// ExecEnded: a command ended, before its execution is stored.
	ExecEnded = "exec.ended"
	// TaskClaimed: an attempt of any task was recorded running, before its
	// handler runs.
	TaskClaimed = "task.claimed"
	// VMOpDone: a pause, resume or suspend is done in the backend, before
	// the VM's new state is stored.
	VMOpDone = "vmop.done"
	// SnapshotTaken: a snapshot's files are written, before the snapshot
	// is recorded ready.
	SnapshotTaken = "snapshot.taken"
)

var (
	once    sync.Once
	dir     string
	enabled map[string]bool
	mu      sync.Mutex
	counts  = map[string]int{}
)

func load() {
	dir = os.Getenv(DirEnv)
	enabled = map[string]bool{}
	if dir == "" {
		return
	}
	for _, p := range strings.Split(os.Getenv(PointsEnv), ",") {
		if p = strings.TrimSpace(p); p != "" {
			enabled[p] = true
		}
	}
}

// Enabled reports whether point is on in this process.
func Enabled(point string) bool {
	once.Do(load)
	return enabled[point]
}

// Reach stops at point when it is enabled; see the package comment. It
// returns ctx's error if ctx ended before the release, else nil. A file
// that cannot be written is returned as an error: a test that asked for
// the point must not run on unaware.
func Reach(ctx context.Context, point string) error {
	if !Enabled(point) {
		return nil
	}
	mu.Lock()
	counts[point]++
	n := counts[point]
	mu.Unlock()
	reached := filepath.Join(dir, point+".reached")
	if err := appendLine(reached, fmt.Sprint(n)); err != nil {
		return fmt.Errorf("fault point %s: %w", point, err)
	}
	release := filepath.Join(dir, point+".release")
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		if _, err := os.Stat(release); err == nil {
			return nil
		} else if !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("fault point %s: %w", point, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

func appendLine(path, line string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(line + "\n"); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
