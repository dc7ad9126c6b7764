// Package vmutil holds what every VM backend needs in the same form: a lock
// per VM id, the exec, file and dial paths to the guest agent, and log
// tails for error messages.
package vmutil

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// KeyedMutex serialises the life-cycle steps of one VM while leaving
// different VMs independent. The zero value is ready; entries are dropped
// once nobody holds or waits for them. With Dir set, the lock holds across
// processes too.
type KeyedMutex struct {
	// Dir, when set, makes each key's lock also an flock on
	// Dir/.<key>.lock, taken after the in-process lock, so two
	// orchestrators (two workers, or a worker and a CLI) sharing a run
	// directory never act on one VM at once. The file exists only while
	// the lock is held; its leading dot keeps it from being taken for a
	// VM's directory.
	Dir string

	mu    sync.Mutex
	locks map[string]*keyedEntry
}

type keyedEntry struct {
	sem  chan struct{} // holds a token while locked
	refs int
}

// Lock locks key and returns its unlock function.
func (k *KeyedMutex) Lock(key string) (unlock func()) {
	unlock, _ = k.LockContext(context.Background(), key)
	return unlock
}

// LockContext locks key, or gives up when ctx ends first and returns
// ctx's error, so a caller is never stuck behind a long step of another.
func (k *KeyedMutex) LockContext(ctx context.Context, key string) (unlock func(), err error) {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = map[string]*keyedEntry{}
	}
	e, ok := k.locks[key]
	if !ok {
		e = &keyedEntry{sem: make(chan struct{}, 1)}
		k.locks[key] = e
	}
	e.refs++
	k.mu.Unlock()
	release := func() {
		k.mu.Lock()
		if e.refs--; e.refs == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
	}
	select {
	case e.sem <- struct{}{}:
	case <-ctx.Done():
		release()
		return nil, fmt.Errorf("waiting for another operation on %s: %w", key, ctx.Err())
	}
	funlock := func() {}
	if k.Dir != "" {
		if err := types.ValidateID(key); err != nil {
			<-e.sem
			release()
			return nil, err // the key names a file: never a path
		}
		path := filepath.Join(k.Dir, "."+key+".lock")
		funlock, err = lockFile(ctx, path)
		if err != nil {
			<-e.sem
			release()
			if ctx.Err() != nil {
				return nil, fmt.Errorf("waiting for another process on this host (a second worker or a CLI sharing %s) to finish its operation on %s: %w", k.Dir, key, err)
			}
			return nil, err
		}
	}
	return func() {
		funlock()
		<-e.sem
		release()
	}, nil
}

// Exec runs cmd in VM id through its agent. The command's environment is
// base (the VM's defaults) overlaid with cmd.Env; the agent itself starts
// commands with only what it is given. A failing stream writer does not
// stop the command, so the result is returned with the error. stream's
// ExecutionID, ReattachOnly, Started and Detach go to the agent as
// documented on vmm.ExecIO; the agent's ErrUnknownExecution and
// ErrDetached are also reported as vmm's.
func Exec(ctx context.Context, c *agent.Client, id string, base map[string]string, cmd types.Command, stream vmm.ExecIO) (*types.ExecResult, error) {
	env := make(map[string]string, len(base)+len(cmd.Env))
	maps.Copy(env, base)
	maps.Copy(env, cmd.Env)
	cmd.Env = env
	res, err := c.ExecWith(ctx, cmd, agent.ExecOptions{
		Stdout:       stream.Stdout,
		Stderr:       stream.Stderr,
		ExecutionID:  stream.ExecutionID,
		ReattachOnly: stream.ReattachOnly,
		Started:      stream.Started,
		Detach:       stream.Detach,
	})
	if err != nil {
		return res, fmt.Errorf("running %q in vm %s: %w", cmd.Cmd, id, alsoVMMError(err))
	}
	return res, nil
}

// alsoVMMError makes err match vmm's sentinel for the agent's one it
// wraps, keeping its message: pkg/agent, which also builds the guest's
// fc-agent, does not import pkg/vmm.
func alsoVMMError(err error) error {
	switch {
	case errors.Is(err, agent.ErrUnknownExecution):
		return vmmError{err: err, kind: vmm.ErrUnknownExecution}
	case errors.Is(err, agent.ErrDetached):
		return vmmError{err: err, kind: vmm.ErrDetached}
	}
	return err
}

// vmmError is err, also matching kind with errors.Is.
type vmmError struct{ err, kind error }

func (e vmmError) Error() string   { return e.err.Error() }
func (e vmmError) Unwrap() []error { return []error{e.err, e.kind} }

// RunningAgent returns the agent client of VM id when it runs, or the
// backend's error for an unknown (types.ErrNotFound) or stopped
// (types.ErrConflict) VM.
type RunningAgent func(ctx context.Context, id string) (*agent.Client, error)

// checkPath rejects a guest path the agent would refuse, before any VM is
// looked up, so the caller's mistake is reported as such.
func checkPath(path string) error {
	if !strings.HasPrefix(path, "/") {
		return fmt.Errorf("%w: guest file path %q is relative; give an absolute path", types.ErrInvalid, path)
	}
	return nil
}

// WriteFile implements vmm.VMOrchestrator.WriteFile for every backend:
// r is streamed into path in VM id through its agent.
func WriteFile(ctx context.Context, running RunningAgent, id, path string, r io.Reader, o types.FileOptions) (int64, error) {
	if err := checkPath(path); err != nil {
		return 0, err
	}
	c, err := running(ctx, id)
	if err != nil {
		return 0, err
	}
	n, err := c.WriteFile(ctx, path, r, o)
	if err != nil {
		return n, fmt.Errorf("vm %s: %w", id, err)
	}
	return n, nil
}

// ReadFile implements vmm.VMOrchestrator.ReadFile for every backend: path
// in VM id is streamed to w through its agent, with no size limit, as the
// content is never held whole.
func ReadFile(ctx context.Context, running RunningAgent, id, path string, w io.Writer) (int64, error) {
	if err := checkPath(path); err != nil {
		return 0, err
	}
	c, err := running(ctx, id)
	if err != nil {
		return 0, err
	}
	n, err := c.ReadFileTo(ctx, path, w, 0)
	if err != nil {
		return n, fmt.Errorf("vm %s: %w", id, err)
	}
	return n, nil
}

// RunningDialer returns how to reach the agent of VM id when it runs, or
// the backend's error for an unknown (types.ErrNotFound) or stopped
// (types.ErrConflict) VM.
type RunningDialer func(ctx context.Context, id string) (agent.Dialer, error)

// DialAgent implements vmm.VMOrchestrator.DialAgent for every backend: a
// new connection to VM id's agent, outside the backend's cached client so
// that the caller owns it alone. A failed dial is types.ErrUnavailable,
// or ctx's error when ctx ended.
func DialAgent(ctx context.Context, running RunningDialer, id string) (net.Conn, error) {
	d, err := running(ctx, id)
	if err != nil {
		return nil, err
	}
	conn, err := d(ctx)
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, fmt.Errorf("connecting to vm %s's agent: %w", id, ctxErr)
		}
		return nil, fmt.Errorf("%w: connecting to vm %s's agent: %w", types.ErrUnavailable, id, err)
	}
	return conn, nil
}

// Tail returns the last n lines of a log file (reading at most its last
// 64 KiB), "(empty)" for an empty one, or why it cannot be read.
func Tail(path string, n int) string {
	s, err := tailFrom(path, 0, n)
	if err != nil {
		return "(no output: " + err.Error() + ")"
	}
	if s == "" {
		return "(empty)"
	}
	return s
}

// TailFrom returns the last n lines written to a log file past offset
// from (reading at most its last 64 KiB), and "" when nothing was written
// past it or the file cannot be read. A log appended across boots is thus
// read for one boot only, and a caller can tell an empty one apart.
func TailFrom(path string, from int64, n int) string {
	s, _ := tailFrom(path, from, n)
	return s
}

func tailFrom(path string, from int64, n int) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	const maxRead = 64 << 10
	if fi, err := f.Stat(); err == nil {
		from = max(from, fi.Size()-maxRead)
	}
	if from > 0 {
		if _, err := f.Seek(from, io.SeekStart); err != nil {
			return "", err
		}
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return "", err
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n"), nil
}

// AgentIO is the agent-facing part of vmm.VMOrchestrator (WriteFile,
// ReadFile, DialAgent), the same in every backend once it says how to find
// a running VM's agent. Backends embed it and set both funcs in New.
type AgentIO struct {
	// Agent returns the cached agent client of a running VM.
	Agent RunningAgent
	// Dialer returns how to reach a running VM's agent afresh.
	Dialer RunningDialer
}

// WriteFile implements vmm.VMOrchestrator.WriteFile (see WriteFile).
func (a AgentIO) WriteFile(ctx context.Context, id, path string, r io.Reader, o types.FileOptions) (int64, error) {
	return WriteFile(ctx, a.Agent, id, path, r, o)
}

// ReadFile implements vmm.VMOrchestrator.ReadFile (see ReadFile).
func (a AgentIO) ReadFile(ctx context.Context, id, path string, w io.Writer) (int64, error) {
	return ReadFile(ctx, a.Agent, id, path, w)
}

// DialAgent implements vmm.VMOrchestrator.DialAgent (see DialAgent).
func (a AgentIO) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	return DialAgent(ctx, a.Dialer, id)
}

// ReadyError is StartVM's error for an agent that did not answer: ctx's
// error when the caller gave up, otherwise types.ErrUnavailable with err and
// the last lines of what the VM wrote (tail, named by what), so that the
// reader sees why the guest never came up.
func ReadyError(ctx context.Context, id string, timeout time.Duration, err error, what, tail string) error {
	if ctx.Err() != nil {
		return fmt.Errorf("starting vm %s: waiting for its agent: %w", id, ctx.Err())
	}
	return fmt.Errorf("%w: starting vm %s: its agent did not answer within %s: %v; %s ends with:\n%s",
		types.ErrUnavailable, id, timeout, err, what, tail)
}
