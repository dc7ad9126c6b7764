package jail

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// IDs are the uid and gid of one confined VM.
type IDs struct {
	UID int `json:"uid"`
	GID int `json:"gid"`
}

// Leases hands out uids (and the gids paired with them) from a range, one
// per holder, across every process sharing the directory. A lease is the
// file <dir>/<uid> holding its holder, a VM's run directory: made by
// link(2) of a complete temporary file, so it appears whole or not at all
// and two processes can never take the same uid.
type Leases struct {
	dir              string
	uidBase, gidBase int
	count            int
}

// NewLeases returns the leases kept in dir (made if missing, mode 0700)
// for uids uidBase..uidBase+count-1 paired with gids gidBase+i.
func NewLeases(dir string, uidBase, gidBase, count int) (*Leases, error) {
	if uidBase < 1 || gidBase < 1 || count < 1 {
		return nil, fmt.Errorf("%w: jail: uid base %d, gid base %d and count %d must be positive", types.ErrInvalid, uidBase, gidBase, count)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("making the uid lease directory: %w", err)
	}
	return &Leases{dir: dir, uidBase: uidBase, gidBase: gidBase, count: count}, nil
}

// Dir returns the lease directory.
func (l *Leases) Dir() string { return l.dir }

// ids returns the pair of the i-th slot.
func (l *Leases) ids(i int) IDs { return IDs{UID: l.uidBase + i, GID: l.gidBase + i} }

// slot returns the index of uid in the range, or -1.
func (l *Leases) slot(uid int) int {
	if uid < l.uidBase || uid >= l.uidBase+l.count {
		return -1
	}
	return uid - l.uidBase
}

// Acquire leases a free uid to holder and returns it with its gid. It is
// idempotent: a holder that has a lease gets the same one back.
func (l *Leases) Acquire(holder string) (IDs, error) {
	held, err := l.List()
	if err != nil {
		return IDs{}, err
	}
	for uid, h := range held {
		if h == holder {
			return l.ids(uid - l.uidBase), nil
		}
	}
	for i := range l.count {
		ids := l.ids(i)
		if _, taken := held[ids.UID]; taken {
			continue
		}
		switch err := l.create(ids.UID, holder); {
		case err == nil:
			return ids, nil
		case errors.Is(err, os.ErrExist):
			continue // taken since List, by another process
		default:
			return IDs{}, err
		}
	}
	return IDs{}, fmt.Errorf("%w: all %d jail uids from %d are leased; delete VMs or raise vmm.<backend>.jail.count", types.ErrUnavailable, l.count, l.uidBase)
}

// Claim takes ids for holder again (a VM booting with the uid its record
// names). It succeeds when holder has the lease or the uid is free, and is
// types.ErrConflict when another holder has it or ids are not in range.
func (l *Leases) Claim(ids IDs, holder string) error {
	i := l.slot(ids.UID)
	if i < 0 || l.ids(i) != ids {
		return fmt.Errorf("%w: uid %d/gid %d is outside the jail range %d+%d; the VM was made with another jail configuration, delete and re-create it", types.ErrConflict, ids.UID, ids.GID, l.uidBase, l.count)
	}
	for {
		h, err := l.holder(ids.UID)
		switch {
		case err == nil && h == holder:
			return nil
		case err == nil:
			return fmt.Errorf("%w: uid %d is leased to %s, not %s", types.ErrConflict, ids.UID, h, holder)
		case !errors.Is(err, os.ErrNotExist):
			return err
		}
		if err := l.create(ids.UID, holder); !errors.Is(err, os.ErrExist) {
			return err
		}
	}
}

// Release gives uid back if holder has it. A lease that is gone, or held
// by someone else, is left as it is: Release is idempotent. The check and
// the removal happen under the directory's lock, so a release racing
// another process's release and re-lease of the same uid never removes
// the new lease.
func (l *Leases) Release(uid int, holder string) error {
	unlock, err := l.lock()
	if err != nil {
		return err
	}
	defer unlock()
	h, err := l.holder(uid)
	if errors.Is(err, os.ErrNotExist) || (err == nil && h != holder) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := os.Remove(l.path(uid)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("releasing jail uid %d: %w", uid, err)
	}
	return nil
}

// lock takes the lease directory's lock (flock on .lock, shared by every
// process using the directory) for a release; creating a lease needs none,
// because link(2) is its atomic test-and-set.
func (l *Leases) lock() (func(), error) {
	f, err := os.OpenFile(filepath.Join(l.dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("locking the jail uid leases: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking the jail uid leases: %w", err)
	}
	return func() { f.Close() }, nil
}

// List returns every lease: holder by uid. Files that are not leases of
// this range (temporary files of a create in progress) are skipped.
func (l *Leases) List() (map[int]string, error) {
	ents, err := os.ReadDir(l.dir)
	if err != nil {
		return nil, fmt.Errorf("listing jail uid leases: %w", err)
	}
	out := map[int]string{}
	for _, e := range ents {
		uid, err := strconv.Atoi(e.Name())
		if err != nil || l.slot(uid) < 0 {
			continue
		}
		h, err := l.holder(uid)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out[uid] = h
	}
	return out, nil
}

// Reap releases the leases that no VM holds any more and returns their
// uids. A lease whose holder is under dir (a backend's run directory) goes
// when live(holder) is false; any other lease goes when its holder
// directory has not existed for grace, which frees the uids of run
// directories removed wholesale (a test's, a wiped host's) without racing
// another process's create, whose directory appears moments after its
// lease.
func (l *Leases) Reap(dir string, live func(holder string) bool, grace time.Duration) ([]int, error) {
	held, err := l.List()
	if err != nil {
		return nil, err
	}
	var reaped []int
	var errs []error
	for uid, h := range held {
		mine := strings.HasPrefix(h, strings.TrimSuffix(dir, "/")+"/")
		if mine && live(h) {
			continue
		}
		if !mine {
			if _, err := os.Stat(h); err == nil || !errors.Is(err, os.ErrNotExist) {
				continue
			}
			if fi, err := os.Stat(l.path(uid)); err != nil || time.Since(fi.ModTime()) < grace {
				continue
			}
		}
		if err := l.Release(uid, h); err != nil {
			errs = append(errs, err)
			continue
		}
		reaped = append(reaped, uid)
	}
	return reaped, errors.Join(errs...)
}

func (l *Leases) path(uid int) string { return filepath.Join(l.dir, strconv.Itoa(uid)) }

func (l *Leases) holder(uid int) (string, error) {
	b, err := os.ReadFile(l.path(uid))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", err
		}
		return "", fmt.Errorf("reading jail uid lease %d: %w", uid, err)
	}
	return string(b), nil
}

// create makes uid's lease for holder, or fails with os.ErrExist.
func (l *Leases) create(uid int, holder string) error {
	f, err := os.CreateTemp(l.dir, ".lease-*")
	if err != nil {
		return fmt.Errorf("leasing jail uid %d: %w", uid, err)
	}
	defer os.Remove(f.Name())
	_, err = f.WriteString(holder)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("leasing jail uid %d: %w", uid, err)
	}
	// link(2) fails with EEXIST when the lease exists: the atomic
	// test-and-set across processes, with the content already in place.
	if err := os.Link(f.Name(), l.path(uid)); err != nil {
		if errors.Is(err, os.ErrExist) {
			return os.ErrExist
		}
		return fmt.Errorf("leasing jail uid %d: %w", uid, err)
	}
	return nil
}
