package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/digitalocean/go-qemu/qmp"

	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// qmpTimeout bounds one monitor session of Pause, Resume, Suspend and
// Snapshot, a migration's wait included.
const qmpTimeout = 5 * time.Minute

// monitor is one session with a VM's QMP monitor.
type monitor struct{ m *qmp.SocketMonitor }

// run executes command with args (nil: none) and decodes its "return"
// into out (nil: ignored). file, when not nil, is passed along with the
// command (SCM_RIGHTS), as getfd wants.
func (m monitor) run(command string, args any, out any, file *os.File) error {
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	raw, err := m.m.RunWithFile(b, file)
	if err != nil {
		return fmt.Errorf("QMP %s: %w", command, err)
	}
	if out == nil {
		return nil
	}
	var resp struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(raw, &resp); err != nil {
		return fmt.Errorf("QMP %s: decoding %q: %w", command, raw, err)
	}
	if err := json.Unmarshal(resp.Return, out); err != nil {
		return fmt.Errorf("QMP %s: decoding %q: %w", command, resp.Return, err)
	}
	return nil
}

// status returns QEMU's run state (query-status): "running", "paused",
// "inmigrate", "postmigrate", ...
func (m monitor) status() (string, error) {
	var st struct {
		Status string `json:"status"`
	}
	err := m.run("query-status", nil, &st, nil)
	return st.Status, err
}

// rootSize is the size in bytes of the root disk (the drive "root") as
// QEMU has it open (query-block). It is read from QEMU, not by running
// qemu-img as root on the active layer, whose header the VM's uid can
// write.
func (m monitor) rootSize() (int64, error) {
	var blocks []struct {
		Device   string `json:"device"`
		Inserted *struct {
			Image struct {
				VirtualSize int64 `json:"virtual-size"`
			} `json:"image"`
		} `json:"inserted"`
	}
	if err := m.run("query-block", nil, &blocks, nil); err != nil {
		return 0, err
	}
	for _, b := range blocks {
		if b.Device == "root" && b.Inserted != nil && b.Inserted.Image.VirtualSize > 0 {
			return b.Inserted.Image.VirtualSize, nil
		}
	}
	return 0, fmt.Errorf("QMP query-block: no root drive with a size in QEMU's answer")
}

// passFD gives QEMU f under name (getfd), for an fd: migration URI.
func (m monitor) passFD(name string, f *os.File) error {
	return m.run("getfd", map[string]string{"fdname": name}, nil, f)
}

// waitMigration polls query-migrate until the migration completed or
// failed, or ctx ends.
func (m monitor) waitMigration(ctx context.Context) error {
	delay := time.Millisecond
	for {
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := m.run("query-migrate", nil, &st, nil); err != nil {
			return err
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("migration %s: %s", st.Status, st.ErrorDesc)
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		delay = min(delay*2, 20*time.Millisecond)
	}
}

// withMonitor runs fn in a session with VM id's monitor, reached only
// while its socket is the VM's uid's (see vmutil.OwnedSocket).
//
// go-qemu bounds only the connect, and QMP serves one client at a time,
// so a wedged monitor would block fn forever: fn runs in a goroutine and
// is given up when ctx ends or after qmpTimeout; the session then closes,
// which fails fn's next command.
func (o *Orchestrator) withMonitor(ctx context.Context, id string, fn func(m monitor) error) error {
	return o.monitorSession(ctx, id, nil, fn)
}

// withNewMonitor is withMonitor for a QEMU that was just started: its
// socket file can exist before QEMU listens on it (bind, then listen),
// so a refused connection is tried again while starting lives, for up
// to monitorStartTimeout.
func (o *Orchestrator) withNewMonitor(ctx context.Context, id string, starting *vmutil.Proc, fn func(m monitor) error) error {
	return o.monitorSession(ctx, id, starting, fn)
}

const monitorStartTimeout = 10 * time.Second

func (o *Orchestrator) monitorSession(ctx context.Context, id string, starting *vmutil.Proc, fn func(m monitor) error) error {
	p, release, err := vmutil.OwnedSocket(o.path(id, fileQMP), o.sockOwner(id))
	if err != nil {
		return err
	}
	defer release()
	deadline := time.Now().Add(monitorStartTimeout)
	var m *qmp.SocketMonitor
	for delay := time.Millisecond; ; delay = min(delay*2, 20*time.Millisecond) {
		m, err = qmp.NewSocketMonitor("unix", p, 2*time.Second)
		if err == nil || starting == nil || !errors.Is(err, syscall.ECONNREFUSED) ||
			!starting.Alive() || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(delay)
	}
	if err != nil {
		return fmt.Errorf("connecting to vm %s's QEMU monitor: %w", id, err)
	}
	ctx, cancel := context.WithTimeout(ctx, qmpTimeout)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		if err := m.Connect(); err != nil {
			done <- fmt.Errorf("connecting to vm %s's QEMU monitor: %w", id, err)
			return
		}
		done <- fn(monitor{m})
	}()
	select {
	case err = <-done:
	case <-ctx.Done():
		err = ctx.Err()
	}
	m.Disconnect()
	return err
}
