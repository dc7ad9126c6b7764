// Package tools provisions command-line tools (node, python, npm packages,
// tarballs served over HTTP, ...) for VMs. Tools are installed on the host
// by the real mise binary into a content-addressed cache, one entry per tool
// and resolved version, and delivered read-only into guests at the very path
// they were installed to, because mise installs hold absolute paths. See
// docs/tools.md for the cache layout, the keys and the locking.
package tools

import (
	"context"
	"strings"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// DefaultRoot is the cache root on the host and, because installs hold
// absolute paths, the directory under which every entry is mounted in
// guests.
const DefaultRoot = "/opt/aetherium/tools"

// Installer installs tool specs into a host cache and describes how to hand
// them to a guest.
type Installer interface {
	// Install makes every spec available and returns the set to deliver.
	// A tool version already in the cache is never fetched again; concurrent
	// calls for one spec share one install. It is idempotent. An unknown
	// tool or version returns an error wrapping types.ErrInvalid, a failed
	// download one wrapping types.ErrUnavailable, each with mise's reason in
	// one line. When mise cannot resolve a spec for lack of network, the
	// entry that spec last installed is returned, if any. Cancelling ctx stops the running install (killing mise and
	// its children) and leaves no partial entry behind; entries already
	// completed for earlier specs stay cached.
	Install(ctx context.Context, specs []Spec) (*Set, error)
	// List returns the complete entries of the cache, sorted by key. An
	// empty cache gives an empty list, not an error. Installs in progress
	// are not listed.
	List(ctx context.Context) ([]Entry, error)
	// Prune removes the entries not used for olderThan, with their images,
	// and returns them. Entries for which keep returns true (those VMs
	// still use; nil keeps none) are skipped, and so are entries being
	// installed or locked by another process, and leftovers of killed
	// installs that are still locked; unlocked leftovers (directories
	// without a record, half-built images) are removed. It is idempotent;
	// cancelling ctx stops it between entries.
	Prune(ctx context.Context, olderThan time.Duration, keep func(key string) bool) ([]Entry, error)
	// Image returns the path of a read-only ext4 image of entry e's
	// directory (its marker included), for VM backends to attach. The image
	// is built once per key, under the key's lock, and appears only
	// complete; later calls return it at once. An entry not in the cache
	// returns types.ErrNotFound. Cancelling ctx stops a build and leaves
	// no image.
	Image(ctx context.Context, e Entry) (string, error)
	// MiseVolume returns the cache entry holding the mise binary itself
	// (ROOT/mise-VERSION/bin/mise), copying it in once per mise version,
	// so that guests can run `mise exec` and `mise ls`. Idempotent;
	// cancelling ctx leaves no partial entry.
	MiseVolume(ctx context.Context) (Entry, error)
	// Root returns the cache root: the ToolSet root of every delivery.
	Root() string
}

// Entry is one tool version in the cache.
type Entry struct {
	// Key names the entry: its directory under the cache root.
	Key string `json:"key"`
	// Spec is the spec that first installed the entry, e.g. "node@22".
	Spec string `json:"spec"`
	// Tool is the spec without its version, e.g. "npm:cowsay".
	Tool string `json:"tool"`
	// Version is the version mise resolved the request to, e.g. "22.11.0".
	Version string `json:"version"`
	// Dir is the entry's directory, the same on the host and in guests.
	Dir string `json:"dir"`
	// BinPaths are the directories holding the tool's executables.
	BinPaths []string `json:"bin_paths"`
	// Size is the entry's size on disk in bytes.
	Size int64 `json:"size"`
	// InstalledAt is when the install completed.
	InstalledAt time.Time `json:"installed_at"`
	// LastUsed is when Install last returned the entry.
	LastUsed time.Time `json:"-"`
}

// Mount is a directory to deliver read-only into a guest.
type Mount struct {
	// Host is the directory on the host.
	Host string
	// Guest is where it must appear in the guest. It equals Host, because
	// mise installs refer to themselves by absolute path.
	Guest string
}

// Set is what a VM needs to use a group of tools.
type Set struct {
	// Entries are the cache entries, in the order of the specs asked for
	// (duplicates removed).
	Entries []Entry
	// Mounts are the directories to deliver read-only, one per entry.
	Mounts []Mount
	// Path lists the bin directories, in spec order, to put in front of
	// PATH for every exec in the guest.
	Path []string
}

// PathEnv returns the PATH value for a guest exec: the set's bin directories
// followed by base (the guest's own PATH).
func (s *Set) PathEnv(base string) string {
	parts := append([]string(nil), s.Path...)
	if base != "" {
		parts = append(parts, base)
	}
	return strings.Join(parts, ":")
}

// Volume returns e as a volume to deliver, without an image.
func (e Entry) Volume() types.ToolVolume {
	return types.ToolVolume{Key: e.Key, Spec: e.Spec, Dir: e.Dir, BinPaths: e.BinPaths}
}
