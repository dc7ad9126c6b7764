package service

import (
	"context"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Scope is who a call acts for: the tenant whose VMs it may see and touch
// and the limits its creations must stay within. The HTTP API sets it from
// the caller's API key; a call without a scope (the local command line,
// talking to PostgreSQL and Redis directly) acts as admin.
type Scope struct {
	// Tenant owns the VMs the caller creates and is the only tenant a
	// non-admin caller sees.
	Tenant string
	// Admin callers see and act on every tenant's VMs.
	Admin bool
	// Limits bound the caller's tenant (zero fields: no limit).
	Limits types.Limits
}

type scopeKey struct{}

// WithScope returns a context whose calls act for sc. A VM of another
// tenant then answers types.ErrNotFound, exactly like a missing one.
func WithScope(ctx context.Context, sc Scope) context.Context {
	return context.WithValue(ctx, scopeKey{}, sc)
}

// ScopeFrom returns the scope set by WithScope, if any.
func ScopeFrom(ctx context.Context) (Scope, bool) {
	sc, ok := ctx.Value(scopeKey{}).(Scope)
	return sc, ok
}

// scopeOf returns the call's scope; no scope is an admin of tenant "".
func scopeOf(ctx context.Context) Scope {
	if sc, ok := ScopeFrom(ctx); ok {
		return sc
	}
	return Scope{Admin: true}
}

// sees reports whether the scope may see a VM of tenant.
func (sc Scope) sees(tenant string) bool { return sc.Admin || sc.Tenant == tenant }
