package vmutil

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/types"
)

func TestProcSpawnAdoptStop(t *testing.T) {
	dir := t.TempDir()
	pidPath := filepath.Join(dir, "p.pid")
	// The marker is an argument under dir, as a VM's run directory is.
	p, err := SpawnLogged("sh", []string{"-c", "sleep 30", dir + "/marker"}, filepath.Join(dir, "log"), pidPath, nil)
	require.NoError(t, err)
	require.True(t, p.Alive())
	b, err := os.ReadFile(pidPath)
	require.NoError(t, err)
	require.Equal(t, strconv.Itoa(p.Pid())+"\n", string(b))

	a := Adopt(pidPath, MentionsDir(dir))
	require.NotNil(t, a, "adopts its own VM's process")
	require.Equal(t, p.Pid(), a.Pid())
	require.Nil(t, Adopt(pidPath, MentionsDir(dir+"0")), "a directory that is a prefix of another does not match")
	require.Nil(t, Adopt(pidPath, HasFlag("--id", "x")))

	start := time.Now()
	p.Stop(syscall.SIGTERM, 5*time.Second)
	require.Less(t, time.Since(start), 5*time.Second)
	require.False(t, p.Alive())
	require.Contains(t, p.Status(), "signal")
	select {
	case <-a.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the pidfd watcher did not see the exit")
	}
	require.Nil(t, Adopt(pidPath, MentionsDir(dir)), "a dead process is not adopted")
}

func TestProcStopEscalates(t *testing.T) {
	dir := t.TempDir()
	p, err := SpawnLogged("sh", []string{"-c", "trap '' TERM; sleep 30 & wait"}, filepath.Join(dir, "log"), filepath.Join(dir, "pid"), nil)
	require.NoError(t, err)
	time.Sleep(100 * time.Millisecond) // let the trap be set
	start := time.Now()
	p.Stop(syscall.SIGTERM, 200*time.Millisecond)
	require.GreaterOrEqual(t, time.Since(start), 200*time.Millisecond)
	require.Contains(t, p.Status(), "killed")
}

// TestAdoptRefusesReusedPid: a pidfile naming a live process that is not
// the VM's (the pid was reused) is refused.
func TestAdoptRefusesReusedPid(t *testing.T) {
	dir := t.TempDir()
	stranger := exec.Command("sleep", "30")
	require.NoError(t, stranger.Start())
	t.Cleanup(func() { stranger.Process.Kill(); stranger.Wait() })
	pidPath := filepath.Join(dir, "vmm.pid")
	require.NoError(t, os.WriteFile(pidPath, []byte(strconv.Itoa(stranger.Process.Pid)), 0o600))
	require.Nil(t, Adopt(pidPath, MentionsDir(dir)))
	require.Nil(t, Adopt(pidPath, HasFlag("--id", "vm1")))
	require.NoError(t, os.WriteFile(pidPath, []byte("1"), 0o600))
	require.Nil(t, Adopt(pidPath, func([]string) bool { return true }), "pid 1 is never a VMM")
}

// TestAdoptRefusesPidReusedAfterPidfd: the VMM dies right after Adopt
// has pinned it with a pidfd, and a new process with a matching command
// line takes its pid before the command line is read. The check then
// reads the newcomer's command line, so Adopt must see that the pinned
// process is gone and adopt nothing. The pid is reused for real, through
// /proc/sys/kernel/ns_last_pid.
func TestAdoptRefusesPidReusedAfterPidfd(t *testing.T) {
	const lastPid = "/proc/sys/kernel/ns_last_pid"
	if f, err := os.OpenFile(lastPid, os.O_WRONLY, 0); err != nil {
		testenv.Skip(t, "reusing a pid on purpose needs write access to %s (run as root): %v", lastPid, err)
	} else {
		f.Close()
	}
	dir := t.TempDir()
	pidPath := filepath.Join(dir, "vmm.pid")
	args := []string{"-c", "sleep 30", dir + "/marker"}
	vmm, err := SpawnLogged("sh", args, filepath.Join(dir, "log"), pidPath, nil)
	require.NoError(t, err)
	t.Cleanup(func() { vmm.Stop(syscall.SIGKILL, 0) })

	var newcomer *exec.Cmd
	t.Cleanup(func() {
		if newcomer != nil {
			syscall.Kill(-newcomer.Process.Pid, syscall.SIGKILL)
			newcomer.Wait()
		}
	})
	afterPidfdOpen = func(pid int) {
		vmm.Stop(syscall.SIGKILL, 0) // reaped: the pid is free
		// A Go process may start a thread (which takes a pid) between
		// writing ns_last_pid and forking, so a single-threaded shell does
		// both, microseconds apart; other processes on the host may still
		// fork in between, so it is tried a number of times.
		// "; :" keeps the inner shell from exec'ing sleep, which would
		// drop the marker from its command line.
		script := fmt.Sprintf(`echo %d > %s && { sh -c 'sleep 30; :' %s & } && wait`, pid-1, lastPid, dir+"/marker")
		for range 200 {
			c := exec.Command("sh", "-c", script)
			c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			require.NoError(t, c.Start())
			deadline := time.Now().Add(time.Second)
			for time.Now().Before(deadline) {
				b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
				// The inner shell once it has exec'd: before, the forked
				// subshell still shows the outer script, which mentions
				// the marker only inside a string, and Adopt (rightly)
				// would not take it.
				if err == nil && slices.Contains(strings.Split(strings.TrimRight(string(b), "\x00"), "\x00"), dir+"/marker") {
					newcomer = c
					return
				}
				if err == nil && len(b) > 0 && !strings.Contains(string(b), dir) {
					break // someone else's process took the pid
				}
				time.Sleep(time.Millisecond)
			}
			syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
			c.Wait()
		}
	}
	t.Cleanup(func() { afterPidfdOpen = nil })

	got := Adopt(pidPath, MentionsDir(dir))
	if newcomer == nil {
		testenv.Skip(t, "could not get pid %d reused within 200 tries: the host forks too much", vmm.Pid())
	}
	require.Nil(t, got, "adopted pid %d, whose pinned process had died and whose command line was a newcomer's", vmm.Pid())
	// The newcomer itself is adoptable by a fresh call, as it should be.
	afterPidfdOpen = nil
	again := Adopt(pidPath, MentionsDir(dir))
	require.NotNil(t, again)
}

func TestWaitFile(t *testing.T) {
	dir := t.TempDir()
	p, err := SpawnLogged("sh", []string{"-c", "sleep 0.1; touch " + dir + "/f; sleep 30"}, filepath.Join(dir, "log"), filepath.Join(dir, "pid"), nil)
	require.NoError(t, err)
	defer p.Stop(syscall.SIGKILL, 0)
	require.NoError(t, WaitFile(filepath.Join(dir, "f"), p, 5*time.Second))
	q, err := SpawnLogged("true", nil, filepath.Join(dir, "log"), filepath.Join(dir, "pid2"), nil)
	require.NoError(t, err)
	require.ErrorContains(t, WaitFile(filepath.Join(dir, "never"), q, 5*time.Second), "exited with code 0")
}

func TestRecord(t *testing.T) {
	d := RunDir(t.TempDir())
	require.NoError(t, os.MkdirAll(d.VM("vm1"), 0o700))
	require.NoError(t, os.MkdirAll(d.VM(".create-x"), 0o700))
	path := d.Path("vm1", "vm.json")
	var got map[string]int
	require.ErrorIs(t, ReadRecord(path, "vm1", &got), types.ErrNotFound)
	require.NoError(t, WriteRecord(path, map[string]int{"a": 1}))
	// A crash during a later write leaves its temporary file; the record
	// read is still the last whole one.
	require.NoError(t, os.WriteFile(path+".123.tmp", []byte(`{"a":`), 0o600))
	require.NoError(t, ReadRecord(path, "vm1", &got))
	require.Equal(t, map[string]int{"a": 1}, got)
	require.NoError(t, WriteRecord(path, map[string]int{"a": 2}))
	require.NoError(t, ReadRecord(path, "vm1", &got))
	require.Equal(t, 2, got["a"])
	fi, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	require.True(t, IsTemp(path+".123.tmp"))
	ids, err := d.IDs()
	require.NoError(t, err)
	require.Equal(t, []string{"vm1"}, ids)

	require.NoError(t, os.WriteFile(path, []byte("{"), 0o600))
	require.ErrorContains(t, ReadRecord(path, "vm1", &got), "corrupt")
}

func TestEnter(t *testing.T) {
	var locks KeyedMutex
	load := func(id string) (string, error) {
		if id == "gone" {
			return "", NotFound(id)
		}
		return "rec-" + id, nil
	}
	_, _, err := Enter(context.Background(), &locks, "../etc", load)
	require.ErrorIs(t, err, types.ErrNotFound)
	_, _, err = Enter(context.Background(), &locks, "gone", load)
	require.ErrorIs(t, err, types.ErrNotFound)
	rec, unlock, err := Enter(context.Background(), &locks, "vm1", load)
	require.NoError(t, err)
	require.Equal(t, "rec-vm1", rec)
	// Held: a second caller gives up when its ctx ends.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, _, err = Enter(ctx, &locks, "vm1", load)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	unlock()
	_, ok, err := Lock(context.Background(), &locks, "bad/id")
	require.False(t, ok)
	require.NoError(t, err)
	unlock, ok, err = Lock(context.Background(), &locks, "vm1")
	require.True(t, ok)
	require.NoError(t, err)
	unlock()
}

func TestClients(t *testing.T) {
	var c Clients
	var dials atomic.Int32
	dial := func(ctx context.Context) (conn net.Conn, err error) {
		dials.Add(1)
		return nil, errors.New("no agent")
	}
	a, err := c.Get("vm1", dial)
	require.NoError(t, err)
	b, err := c.Get("vm1", dial)
	require.NoError(t, err)
	require.Same(t, a, b)
	c.Drop("vm1")
	b, err = c.Get("vm1", dial)
	require.NoError(t, err)
	require.NotSame(t, a, b)
	c.CloseAll()
	c.Drop("vm1") // nothing left: harmless
}

type fakeNet struct {
	attached map[string]bool
	failNext bool
}

func (f *fakeNet) Attach(ctx context.Context, id string) (*network.Attachment, error) {
	if f.failNext {
		f.failNext = false
		return nil, errors.New("boom")
	}
	f.attached[id] = true
	return &network.Attachment{TAP: "tap-" + id}, nil
}
func (f *fakeNet) Detach(ctx context.Context, id string) error { delete(f.attached, id); return nil }
func (f *fakeNet) Reconcile(ctx context.Context, live []string) ([]string, error) {
	return nil, nil
}
func (f *fakeNet) Do(fn func() error) error { return fn() }

func TestNet(t *testing.T) {
	ctx := context.Background()
	var none Net
	_, err := none.Attach(ctx, "vm1")
	require.ErrorIs(t, err, types.ErrInvalid)
	require.NoError(t, none.Detach(ctx, "vm1"))
	require.False(t, NewNet((*network.Manager)(nil)).Enabled())

	f := &fakeNet{attached: map[string]bool{}}
	n := NewNet(f)
	a, err := n.Attach(ctx, "vm1")
	require.NoError(t, err)
	require.Equal(t, "tap-vm1", a.TAP)
	_, err = n.Attach(ctx, "vm1") // re-attach at start
	require.NoError(t, err)
	f.failNext = true
	_, err = n.Attach(ctx, "vm2")
	require.ErrorContains(t, err, "attaching vm vm2")
	require.NoError(t, n.Detach(ctx, "vm1"))
	require.Empty(t, f.attached)
	require.NoError(t, n.Do(func() error { return nil }))
}

func TestReadyError(t *testing.T) {
	err := ReadyError(context.Background(), "vm1", time.Second, errors.New("refused"), "its log", "last line")
	require.ErrorIs(t, err, types.ErrUnavailable)
	require.ErrorContains(t, err, "its log ends with:\nlast line")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err = ReadyError(ctx, "vm1", time.Second, errors.New("refused"), "its log", "last line")
	require.ErrorIs(t, err, context.Canceled)
	require.NotErrorIs(t, err, types.ErrUnavailable)
}
