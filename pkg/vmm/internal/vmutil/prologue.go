package vmutil

import (
	"context"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Enter is the prologue of every life-cycle step on an existing VM, the
// same in every backend: the id is checked first (an id no VM can have is
// types.ErrNotFound, before any lock or file is touched), then the VM's lock
// is taken with ctx (a cancelled ctx returns its error instead of waiting
// behind another step), then the record is loaded with load (which returns
// types.ErrNotFound for a VM that does not exist). On success the caller
// holds the lock and must call unlock.
func Enter[R any](ctx context.Context, locks *KeyedMutex, id string, load func(id string) (R, error)) (rec R, unlock func(), err error) {
	if types.ValidateID(id) != nil {
		return rec, nil, NotFound(id)
	}
	unlock, err = locks.LockContext(ctx, id)
	if err != nil {
		return rec, nil, err
	}
	if load == nil {
		return rec, unlock, nil
	}
	rec, err = load(id)
	if err != nil {
		unlock()
		return rec, nil, err
	}
	return rec, unlock, nil
}

// Lock is Enter without a record: the id is checked (ok false for an id no
// VM can have) and the lock taken with ctx. DeleteVM uses it, since it
// must also clean up after VMs whose record is gone or unreadable.
func Lock(ctx context.Context, locks *KeyedMutex, id string) (unlock func(), ok bool, err error) {
	if types.ValidateID(id) != nil {
		return nil, false, nil
	}
	unlock, err = locks.LockContext(ctx, id)
	return unlock, err == nil, err
}
