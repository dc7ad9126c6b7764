package vmmtest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// RunShared runs only the cases that guard what every backend does the
// same way through the shared toolkit (pkg/vmm/internal/vmutil): the
// lifecycle prologue (id check, then the VM's lock taken with ctx), the
// hostname, the atomic record and adoption after a restart. Run includes
// them; a backend tested against a fake VMM that cannot run the whole
// suite runs these alone. h.New and h.LockVM are required.
func RunShared(t *testing.T, h Harness) {
	require.NotNil(t, h.New, "Harness.New is required")
	require.NotNil(t, h.LockVM, "Harness.LockVM is required")
	h.defaults()
	s := &suite{h: h, o: h.New(t)}
	s.runShared(t)
}

func (s *suite) runShared(t *testing.T) {
	t.Run("LockWaitHonoursCtx", s.testLockWait)
	t.Run("InvalidID", s.testInvalidID)
	t.Run("MemoryOverMaximum", s.testMemoryOverMax)
	t.Run("Hostname", s.testHostname)
	// A backend whose VMs' state lives in an engine (docker) keeps no
	// record file and adopts no host process: these cases do not apply to
	// it, so they are not registered rather than skipped (CI fails on
	// skips it does not know, see scripts/check-skips.sh).
	if s.h.RecordPath != nil && s.h.Restart != nil {
		t.Run("RecordSurvivesCrashedWrite", s.testRecordCrash)
	}
	if s.h.PIDFiles != nil && s.h.Restart != nil {
		t.Run("AdoptionRefusesReusedPid", s.testReusedPid)
	}
}

// testLockWait: a call that must wait for the VM's lock, held by another
// call, gives up when its ctx ends instead of hanging behind it.
func (s *suite) testLockWait(t *testing.T) {
	t.Parallel()
	o := s.o
	sp := s.spec(t)
	_, err := o.CreateVM(s.ctx(t), sp)
	require.NoError(t, err)
	t.Cleanup(func() { o.DeleteVM(context.Background(), sp.ID) })

	unlock := s.h.LockVM(o, sp.ID)
	calls := []struct {
		name string
		call func(ctx context.Context) error
	}{
		{"CreateVM", func(ctx context.Context) error { _, err := o.CreateVM(ctx, sp); return err }},
		{"StartVM", func(ctx context.Context) error { return o.StartVM(ctx, sp.ID) }},
		{"StopVM", func(ctx context.Context) error { return o.StopVM(ctx, sp.ID, true) }},
		{"DeleteVM", func(ctx context.Context) error { return o.DeleteVM(ctx, sp.ID) }},
	}
	for _, c := range calls {
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		start := time.Now()
		err := c.call(ctx)
		cancel()
		require.ErrorIs(t, err, context.DeadlineExceeded, "%s must give up waiting for the VM's lock when its ctx ends", c.name)
		require.Less(t, time.Since(start), 5*time.Second, c.name)
	}
	unlock()
	st, err := o.GetVMStatus(s.ctx(t), sp.ID)
	require.NoError(t, err, "the calls that gave up left the VM alone")
	require.Equal(t, types.VMStopped, st.State)
}

// BadIDs are VM ids every backend refuses (types.ValidateID).
var BadIDs = []string{"", "../etc", "a/b", "a_b", "a.b", "-a", "a b", "vm\x00", strings.Repeat("a", 65)}

// testInvalidID: an id no VM can have is refused the same way by every
// backend: types.ErrInvalid at create, types.ErrNotFound for a VM to act
// on, and nil for a delete, before any state is touched.
// testMemoryOverMax: every backend has a per-VM memory maximum, reported
// in Capabilities; a spec over it is refused as invalid input, with the
// limit and the setting that raises it, before anything is made.
func (s *suite) testMemoryOverMax(t *testing.T) {
	t.Parallel()
	o := s.o
	ctx := s.ctx(t)
	maxMB := o.Capabilities().MaxMemoryMB
	require.GreaterOrEqual(t, maxMB, types.MinMemoryMB, "Capabilities.MaxMemoryMB")
	sp := s.spec(t)
	sp.MemoryMB = maxMB + 1
	st, err := o.CreateVM(ctx, sp)
	if err == nil {
		o.DeleteVM(context.WithoutCancel(ctx), sp.ID)
	}
	require.ErrorIs(t, err, types.ErrInvalid)
	require.Nil(t, st)
	require.ErrorContains(t, err, fmt.Sprintf("at most %d MiB", maxMB))
	require.ErrorContains(t, err, "max_memory_mb", "the message names the setting that raises the limit")
	_, err = o.GetVMStatus(ctx, sp.ID)
	require.ErrorIs(t, err, types.ErrNotFound, "a refused spec left a VM behind")
	require.NotContains(t, listIDs(t, o), sp.ID)
}

func (s *suite) testInvalidID(t *testing.T) {
	t.Parallel()
	o := s.o
	ctx := s.ctx(t)
	snap, hasSnap := vmm.AsSnapshotter(o)
	for _, id := range BadIDs {
		sp := s.spec(t)
		sp.ID = id
		_, err := o.CreateVM(ctx, sp)
		require.ErrorIs(t, err, types.ErrInvalid, "CreateVM %q", id)
		require.ErrorIs(t, o.StartVM(ctx, id), types.ErrNotFound, "StartVM %q", id)
		require.ErrorIs(t, o.StopVM(ctx, id, false), types.ErrNotFound, "StopVM %q", id)
		_, err = o.GetVMStatus(ctx, id)
		require.ErrorIs(t, err, types.ErrNotFound, "GetVMStatus %q", id)
		_, err = o.ExecuteCommand(ctx, id, types.Command{Cmd: "true"}, vmm.ExecIO{})
		require.ErrorIs(t, err, types.ErrNotFound, "ExecuteCommand %q", id)
		_, err = o.DialAgent(ctx, id)
		require.ErrorIs(t, err, types.ErrNotFound, "DialAgent %q", id)
		_, err = o.ReadFile(ctx, id, "/etc/hostname", &strings.Builder{})
		require.ErrorIs(t, err, types.ErrNotFound, "ReadFile %q", id)
		if hasSnap {
			require.ErrorIs(t, snap.Pause(ctx, id), types.ErrNotFound, "Pause %q", id)
		}
		require.NoError(t, o.DeleteVM(ctx, id), "DeleteVM %q", id)
	}
	for _, v := range listIDs(t, o) {
		require.NotContains(t, BadIDs, v)
	}
}

// HostileName is a VM name that would change the guest's boot if it
// reached the kernel command line as is.
const HostileName = "Evil Name; rm -rf / root=/dev/sdb init=/bin/sh"

// testHostname: a VM's hostname is its name sanitised by
// bootparams.SanitizeHostname; a hostile name is either refused at create
// (types.ErrInvalid, nothing left) or sanitised the same way.
func (s *suite) testHostname(t *testing.T) {
	t.Parallel()
	o := s.o
	ctx := s.ctx(t)
	hostile := s.spec(t)
	hostile.Name = HostileName
	if _, err := o.CreateVM(ctx, hostile); err != nil {
		require.ErrorIs(t, err, types.ErrInvalid)
		_, err = o.GetVMStatus(ctx, hostile.ID)
		require.ErrorIs(t, err, types.ErrNotFound, "a refused create leaves nothing")
	} else {
		t.Cleanup(func() { o.DeleteVM(context.Background(), hostile.ID) })
		require.NoError(t, o.StartVM(ctx, hostile.ID))
		require.Equal(t, bootparams.SanitizeHostname(HostileName), s.hostname(t, hostile.ID))
	}
	sp := s.spec(t)
	id := StartVM(t, o, sp)
	got := s.hostname(t, id)
	require.Equal(t, bootparams.SanitizeHostname(sp.Name), got)
	require.Equal(t, sp.Name, got, "a valid name is the hostname as it is")
}

func (s *suite) hostname(t *testing.T, id string) string {
	if s.h.Hostname != nil {
		return s.h.Hostname(t, s.o, id)
	}
	return strings.TrimSpace(Sh(t, s.o, id, "cat /proc/sys/kernel/hostname"))
}

// testRecordCrash: a crash in the middle of writing a VM's record leaves a
// half-written temporary file beside the whole record; after a restart the
// VM is still there, as it was, and can be deleted.
func (s *suite) testRecordCrash(t *testing.T) {
	o, ctx, sp := s.createOnOwn(t)
	path := s.h.RecordPath(o, sp.ID)
	whole, err := os.ReadFile(path)
	require.NoError(t, err)
	require.True(t, json.Valid(whole), "the record is whole JSON")
	torn := whole[:len(whole)/2]
	// What writers leave when killed mid-write: WriteRecord's fresh
	// temporary name, and the fixed name an older writer used.
	require.NoError(t, os.WriteFile(path+".4711.tmp", torn, 0o600))
	require.NoError(t, os.WriteFile(path+".tmp", torn, 0o600))

	o = s.h.Restart(t, o)
	st, err := o.GetVMStatus(ctx, sp.ID)
	require.NoError(t, err)
	require.Equal(t, types.VMStopped, st.State)
	require.Equal(t, sp.Name, st.Name)
	require.Contains(t, listIDs(t, o), sp.ID)
	require.NoError(t, o.DeleteVM(ctx, sp.ID))
	_, err = o.GetVMStatus(ctx, sp.ID)
	require.ErrorIs(t, err, types.ErrNotFound)
}

// testReusedPid: after a restart, a pidfile that names a live process
// which is not the VM's (its pid was reused) is not adopted: the VM is not
// reported running, and stopping or deleting it leaves that process alone.
func (s *suite) testReusedPid(t *testing.T) {
	o, ctx, sp := s.createOnOwn(t)

	stranger := exec.Command("sleep", "300")
	require.NoError(t, stranger.Start())
	exited := make(chan struct{})
	go func() { stranger.Wait(); close(exited) }()
	t.Cleanup(func() { stranger.Process.Kill(); <-exited })
	for _, f := range s.h.PIDFiles(o, sp.ID) {
		require.NoError(t, os.WriteFile(f, []byte(strconv.Itoa(stranger.Process.Pid)+"\n"), 0o600))
	}

	o = s.h.Restart(t, o)
	st, err := o.GetVMStatus(ctx, sp.ID)
	require.NoError(t, err)
	require.NotEqual(t, types.VMRunning, st.State, "a stranger's process is not the VM's VMM")
	require.NoError(t, o.StopVM(ctx, sp.ID, true))
	require.NoError(t, o.DeleteVM(ctx, sp.ID))
	select {
	case <-exited:
		t.Fatal("the backend killed a process that merely reused its VMM's pid")
	case <-time.After(200 * time.Millisecond):
	}
	require.False(t, slices.Contains(listIDs(t, o), sp.ID))
}

// createOnOwn creates a VM (not started) on an orchestrator of the test's
// own, which the test may restart without disturbing the others.
func (s *suite) createOnOwn(t *testing.T) (vmm.VMOrchestrator, context.Context, types.VMSpec) {
	t.Parallel()
	o := s.h.New(t)
	ctx := s.ctx(t)
	sp := s.spec(t)
	_, err := o.CreateVM(ctx, sp)
	require.NoError(t, err)
	return o, ctx, sp
}
