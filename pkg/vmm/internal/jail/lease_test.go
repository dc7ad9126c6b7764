package jail

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
)

func TestLeasesConcurrentAcquireNeverShares(t *testing.T) {
	dir := t.TempDir()
	// Several Leases values stand for several processes sharing the
	// directory: nothing in memory is shared between them.
	const holders, count = 40, 64
	var wg sync.WaitGroup
	got := make([]IDs, holders)
	errs := make([]error, holders)
	for i := range holders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := NewLeases(dir, 900000, 800000, count)
			if err == nil {
				got[i], err = l.Acquire(fmt.Sprintf("/run/vms/vm%d", i))
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	seen := map[int]bool{}
	for i := range holders {
		require.NoError(t, errs[i])
		require.False(t, seen[got[i].UID], "uid %d given twice", got[i].UID)
		seen[got[i].UID] = true
		require.Equal(t, got[i].UID-900000, got[i].GID-800000, "uid and gid are paired")
	}
	l, err := NewLeases(dir, 900000, 800000, count)
	require.NoError(t, err)
	held, err := l.List()
	require.NoError(t, err)
	require.Len(t, held, holders)
	// Idempotent: the same holder gets its lease back.
	again, err := l.Acquire("/run/vms/vm7")
	require.NoError(t, err)
	require.Equal(t, got[7], again)
}

func TestLeasesExhaustedClaimRelease(t *testing.T) {
	l, err := NewLeases(t.TempDir(), 900000, 900000, 2)
	require.NoError(t, err)
	a, err := l.Acquire("/r/a")
	require.NoError(t, err)
	b, err := l.Acquire("/r/b")
	require.NoError(t, err)
	_, err = l.Acquire("/r/c")
	require.ErrorIs(t, err, types.ErrUnavailable)

	require.NoError(t, l.Claim(a, "/r/a"), "claiming one's own lease")
	require.ErrorIs(t, l.Claim(a, "/r/b"), types.ErrConflict)
	require.ErrorIs(t, l.Claim(IDs{UID: 1, GID: 1}, "/r/a"), types.ErrConflict, "outside the range")

	require.NoError(t, l.Release(b.UID, "/r/a"), "another holder's release leaves it")
	require.ErrorIs(t, l.Claim(b, "/r/a"), types.ErrConflict)
	require.NoError(t, l.Release(b.UID, "/r/b"))
	require.NoError(t, l.Release(b.UID, "/r/b"), "idempotent")
	require.NoError(t, l.Claim(b, "/r/c"), "a released uid can be claimed")
}

func TestLeasesReap(t *testing.T) {
	run := t.TempDir()
	other := t.TempDir()
	l, err := NewLeases(t.TempDir(), 900000, 900000, 10)
	require.NoError(t, err)
	live := filepath.Join(run, "live")
	require.NoError(t, os.Mkdir(live, 0o700))
	for _, h := range []string{live, filepath.Join(run, "gone"), filepath.Join(other, "gone"), filepath.Join(other, "old")} {
		_, err := l.Acquire(h)
		require.NoError(t, err)
	}
	held, _ := l.List()
	for uid, h := range held {
		if h == filepath.Join(other, "old") {
			old := time.Now().Add(-2 * time.Hour)
			require.NoError(t, os.Chtimes(filepath.Join(l.Dir(), fmt.Sprint(uid)), old, old))
		}
	}
	reaped, err := l.Reap(run, func(h string) bool { _, err := os.Stat(h); return err == nil }, time.Hour)
	require.NoError(t, err)
	require.Len(t, reaped, 2, "this run dir's dead VM and another's long-gone one")
	held, err = l.List()
	require.NoError(t, err)
	var left []string
	for _, h := range held {
		left = append(left, h)
	}
	require.ElementsMatch(t, []string{live, filepath.Join(other, "gone")}, left, "a fresh lease of another run dir may be a create in progress")
}

func TestConfigValidate(t *testing.T) {
	off := false
	for _, tc := range []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"defaults", Config{}, true},
		{"off", Config{Enabled: &off}, true},
		{"uid zero", Config{UIDBase: -5, Count: 10}, false},
		{"range past max", Config{UIDBase: maxID, Count: 2}, false},
		{"bad version", Config{CgroupVersion: "3"}, false},
		{"absolute parent", Config{CgroupParent: "/aetherium"}, false},
		{"escaping parent", Config{CgroupParent: "../x"}, false},
		{"relative state dir", Config{StateDir: "jail"}, false},
		{"io weight", Config{IOWeight: 20000}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if tc.ok {
				require.NoError(t, err)
			} else {
				require.ErrorIs(t, err, types.ErrInvalid)
			}
		})
	}
}

func TestSpecArgsRoundTrip(t *testing.T) {
	s := Spec{UID: 900001, GID: 900001, Root: "/run/vm/jail", ReadOnly: []string{"/usr", "/boot/vmlinuz"},
		ReadWrite: []string{"/run/vm"}, Devices: []string{"/dev/null"}, Cgroups: []string{"/sys/fs/cgroup/aetherium/x"},
		Argv: []string{"/usr/bin/qemu-system-x86_64", "--", "-name", "x"}}
	a, err := s.Args()
	require.NoError(t, err)
	back, err := ParseArgs(a)
	require.NoError(t, err)
	require.Equal(t, s, back)

	for _, bad := range []Spec{
		{UID: 0, GID: 1, Root: "/r", Argv: []string{"/bin/x"}},
		{UID: 1, GID: 1, Root: "/r", Argv: []string{"x"}},
		{UID: 1, GID: 1, Root: "/r", ReadOnly: []string{"/usr/../etc"}, Argv: []string{"/bin/x"}},
		{UID: 1, GID: 1, Root: "/", Argv: []string{"/bin/x"}},
	} {
		_, err := bad.Args()
		require.ErrorIs(t, err, types.ErrInvalid, "%+v", bad)
	}
	_, err = ParseArgs([]string{"--uid", "5"})
	require.ErrorIs(t, err, types.ErrInvalid)
}
