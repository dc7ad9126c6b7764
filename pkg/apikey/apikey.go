// Package apikey makes and checks Aetherium API keys. A key is
// "aek_<id>_<secret>": the id finds the stored row, and only the SHA-256 of
// the secret is stored, compared in constant time. The secret has 256 bits
// of randomness, so a fast hash is enough (no password stretching needed).
package apikey

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Prefix starts every key, so that leaked keys are easy to scan for.
const Prefix = "aek_"

// ErrUnauthenticated is returned for a missing, malformed, unknown or
// revoked key. It never says which, so that keys cannot be probed.
var ErrUnauthenticated = errors.New("a valid API key is required: pass it as `Authorization: Bearer <key>` or `X-API-Key: <key>`; create one with `aether-cli apikey create NAME`")

// Store is what this package needs of storage.Store.
type Store interface {
	CreateAPIKey(ctx context.Context, k *types.APIKey) error
	GetAPIKey(ctx context.Context, id string) (*types.APIKey, error)
}

var (
	keyRE  = regexp.MustCompile(`^aek_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$`)
	nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9 ._-]{0,62}$`)
)

// Options describe a new key.
type Options struct {
	Name   string
	Tenant string // default: "default"
	Admin  bool
	Limits types.Limits
}

// DefaultTenant is the tenant of keys created without one.
const DefaultTenant = "default"

// Create makes a key, stores it and returns the stored row and the whole
// key, which exists nowhere else: show it to the user once.
func Create(ctx context.Context, st Store, o Options) (*types.APIKey, string, error) {
	if !nameRE.MatchString(o.Name) {
		return nil, "", fmt.Errorf("%w: key name %q must be 1-63 characters of letters, digits, spaces, '.', '_' and '-'", types.ErrInvalid, o.Name)
	}
	if o.Tenant == "" {
		o.Tenant = DefaultTenant
	}
	if err := types.ValidateTenant(o.Tenant); err != nil {
		return nil, "", err
	}
	if err := o.Limits.Validate(); err != nil {
		return nil, "", err
	}
	var idb [8]byte
	var secret [32]byte
	if _, err := rand.Read(idb[:]); err != nil {
		return nil, "", err
	}
	if _, err := rand.Read(secret[:]); err != nil {
		return nil, "", err
	}
	sec := base64.RawURLEncoding.EncodeToString(secret[:])
	k := &types.APIKey{ID: hex.EncodeToString(idb[:]), Name: o.Name, Tenant: o.Tenant, Admin: o.Admin,
		Hash: hash(sec), Limits: o.Limits, CreatedAt: time.Now().UTC().Truncate(time.Microsecond)}
	if err := st.CreateAPIKey(ctx, k); err != nil {
		return nil, "", err
	}
	return k, Prefix + k.ID + "_" + sec, nil
}

func hash(secret string) []byte {
	h := sha256.Sum256([]byte(secret))
	return h[:]
}

// ID returns the id part of a well-formed key, for logs that must not show
// the key itself; "" when key is malformed.
func ID(key string) string {
	m := keyRE.FindStringSubmatch(key)
	if m == nil {
		return ""
	}
	return m[1]
}

// Authenticate returns the stored key that key is, or ErrUnauthenticated.
// Other errors (the store is down) are returned as they are.
func Authenticate(ctx context.Context, st Store, key string) (*types.APIKey, error) {
	m := keyRE.FindStringSubmatch(strings.TrimSpace(key))
	if m == nil {
		return nil, ErrUnauthenticated
	}
	k, err := st.GetAPIKey(ctx, m[1])
	if errors.Is(err, types.ErrNotFound) {
		return nil, ErrUnauthenticated
	}
	if err != nil {
		return nil, err
	}
	if subtle.ConstantTimeCompare(k.Hash, hash(m[2])) != 1 || k.RevokedAt != nil {
		return nil, ErrUnauthenticated
	}
	return k, nil
}
