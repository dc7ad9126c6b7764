package tools

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// MiseBinaryDefault is the mise binary looked up in PATH when Config.Mise is
// empty; scripts/setup.sh installs it as /usr/local/bin/mise.
const MiseBinaryDefault = "mise"

// Config configures a Mise installer. The zero value means the defaults.
type Config struct {
	// Root is the cache directory, absolute. Entries are mounted in guests
	// at the same path, so it must be a path guests can use too. Default
	// DefaultRoot.
	Root string
	// Mise is the mise binary, a path or a name in PATH. Default
	// MiseBinaryDefault.
	Mise string
	// Env holds mise's own settings passed through to every mise run, e.g.
	// MISE_NPM_PACKAGE_MANAGER=npm or a mirror URL. It may not set the
	// variables the cache pins (MISE_DATA_DIR, MISE_CACHE_DIR,
	// MISE_CONFIG_DIR, MISE_STATE_DIR, MISE_YES).
	Env map[string]string
	// AllowPrivateURLs lets specs fetch from loopback, link-local and
	// private addresses (tests serve tarballs on 127.0.0.1). Off by
	// default: mise runs on the worker's host, where such an address
	// reaches the host's own services or a cloud metadata endpoint, and a
	// caller's spec must not make the host fetch them for it.
	AllowPrivateURLs bool
	// Mkfs is the mkfs.ext4 binary that builds the read-only images VM
	// backends attach, a path or a name in PATH (then /usr/sbin and /sbin).
	// Default MkfsBinaryDefault.
	Mkfs string
	// Logger receives one line per install. Default slog.Default().
	Logger *slog.Logger
}

// keptEnv are the only variables of the worker's environment mise gets:
// what finding programs and reaching the network through a proxy need.
// Everything else (database URLs, API keys, the host's MISE_* settings)
// stays out, because mise runs the install steps of packages callers name
// (npm, gem, pipx, cargo can run package code at install time).
var keptEnv = []string{"PATH", "LANG", "LC_ALL", "TZ",
	"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
	// Trust settings: hosts behind a TLS-inspecting proxy name its CA
	// here, and the package managers mise runs (node, curl, pip, git)
	// each read their own variable.
	"SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "GIT_SSL_CAINFO"}

// miseBaseEnv picks keptEnv from environ and adds the defaults that keep
// package managers from running package scripts on the host; Config.Env
// may override those.
func miseBaseEnv(environ []string) []string {
	var env []string
	for _, kv := range environ {
		k, _, _ := strings.Cut(kv, "=")
		if slices.Contains(keptEnv, k) {
			env = append(env, kv)
		}
	}
	// npm (and mise's npm backend through it) skips install scripts.
	return append(env, "npm_config_ignore_scripts=true")
}

// pinnedEnv are the variables the cache sets itself for every mise run.
var pinnedEnv = []string{"MISE_DATA_DIR", "MISE_CACHE_DIR", "MISE_CONFIG_DIR", "MISE_STATE_DIR", "MISE_YES"}

// Mise is the Installer that drives the mise binary.
type Mise struct {
	// allowPrivate lets specs fetch from internal addresses
	// (Config.AllowPrivateURLs).
	allowPrivate bool
	root         string
	mise         string
	mkfs         string
	env          []string // the base environment of every mise run, without pins
	log          *slog.Logger
	keyMu        keyMutex
	now          func() time.Time
	layout       layout

	verMu    sync.Mutex
	versions map[string]string // mise's version by its binary's size/mtime
}

var _ Installer = (*Mise)(nil)

// NewMise checks cfg and returns an installer. The cache root is created
// if needed. A missing mise binary gives an error wrapping
// types.ErrUnavailable that says how to install it.
func NewMise(cfg Config) (*Mise, error) {
	root := filepath.Clean(cmp.Or(cfg.Root, DefaultRoot))
	if !filepath.IsAbs(root) {
		return nil, fmt.Errorf("%w: tools cache root %q must be an absolute path, because guests mount entries at the same path", types.ErrInvalid, cfg.Root)
	}
	bin, err := exec.LookPath(cmp.Or(cfg.Mise, MiseBinaryDefault))
	if err != nil {
		return nil, fmt.Errorf("%w: mise binary %q not found (%v); install it with `sudo scripts/setup.sh` or set tools.mise_binary", types.ErrUnavailable, cmp.Or(cfg.Mise, MiseBinaryDefault), err)
	}
	env := miseBaseEnv(os.Environ())
	keys := make([]string, 0, len(cfg.Env))
	for k := range cfg.Env {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if slices.Contains(pinnedEnv, k) {
			return nil, fmt.Errorf("%w: tools env may not set %s: the cache pins it", types.ErrInvalid, k)
		}
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(cfg.Env[k], 0) {
			return nil, fmt.Errorf("%w: tools env variable %q is not a valid name=value", types.ErrInvalid, k)
		}
		env = append(env, k+"="+cfg.Env[k])
	}
	l := layout{root: root}
	for _, d := range []string{root, l.metaDir(), l.lockDir(), l.imageDir(), l.miseDir("cache"), l.miseDir("config"), l.miseDir("state"), l.miseDir("resolve"), l.miseDir("home")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("creating tools cache directory %s: %w", d, err)
		}
	}
	return &Mise{
		allowPrivate: cfg.AllowPrivateURLs,
		root:         root,
		mise:         bin,
		mkfs:         cmp.Or(cfg.Mkfs, MkfsBinaryDefault),
		env:          env,
		log:          cmp.Or(cfg.Logger, slog.Default()),
		now:          time.Now,
		layout:       l,
	}, nil
}

// OpenCache returns a Mise on an existing cache root for maintenance
// (List, Prune, Image) where mise itself may be missing, e.g. in
// `aether-cli tools cache`: Install and MiseVolume then fail with
// types.ErrUnavailable. A root that does not exist returns
// types.ErrNotFound.
func OpenCache(root string, log *slog.Logger) (*Mise, error) {
	root = filepath.Clean(root)
	if !filepath.IsAbs(root) {
		return nil, fmt.Errorf("%w: tools cache root %q must be an absolute path", types.ErrInvalid, root)
	}
	if fi, err := os.Stat(filepath.Join(root, ".meta")); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("%w: %s is not a tools cache (no .meta directory): nothing was installed there yet, or tools.cache_dir names another directory", types.ErrNotFound, root)
	}
	return &Mise{root: root, mkfs: MkfsBinaryDefault, log: cmp.Or(log, slog.Default()), now: time.Now, layout: layout{root: root}}, nil
}

// layout names the files of the cache; see docs/tools.md.
//
//	ROOT/KEY/              MISE_DATA_DIR of one tool version (mounted read-only)
//	ROOT/.meta/KEY.json    the entry's record, written last: no record, no entry
//	ROOT/.meta/KEY.used    its mtime is the entry's last use
//	ROOT/.meta/spec-H.key  the key spec H (hashed) last resolved to
//	ROOT/.locks/KEY.lock   flock held while the entry is installed or pruned
//	ROOT/.images/KEY.ext4  the entry's read-only image, built on demand
//	ROOT/.mise/{cache,config,state,resolve,home}  mise's pinned directories
type layout struct{ root string }

func (l layout) entryDir(key string) string { return filepath.Join(l.root, key) }
func (l layout) metaDir() string            { return filepath.Join(l.root, ".meta") }
func (l layout) metaFile(key string) string { return filepath.Join(l.metaDir(), key+".json") }
func (l layout) usedFile(key string) string { return filepath.Join(l.metaDir(), key+".used") }
func (l layout) aliasFile(spec string) string {
	sum := sha256.Sum256([]byte(spec))
	return filepath.Join(l.metaDir(), "spec-"+hex.EncodeToString(sum[:8])+".key")
}
func (l layout) lockDir() string            { return filepath.Join(l.root, ".locks") }
func (l layout) lockFile(key string) string { return filepath.Join(l.lockDir(), key+".lock") }
func (l layout) miseDir(name string) string { return filepath.Join(l.root, ".mise", name) }
func (l layout) imageDir() string           { return filepath.Join(l.root, ".images") }
func (l layout) imageFile(key string) string {
	return filepath.Join(l.imageDir(), key+".ext4")
}

// imageTemp is where key's image is built before its rename: one name per
// key, since only the key's lock holder builds it.
func (l layout) imageTemp(key string) string {
	return filepath.Join(l.imageDir(), ".tmp-"+key+".ext4")
}

var unsafeKeyChars = regexp.MustCompile(`[^a-z0-9._-]+`)

// entryKey is the content address of a tool version: a readable prefix
// (name and version) for people reading `ls`, and a hash of the tool (with
// its backend and options) and the resolved version that makes it unique.
// Keys never start with '.', which the cache's own files use.
func entryKey(tool, version string) string {
	sum := sha256.Sum256([]byte("aetherium-tools-v1\x00" + tool + "\x00" + version))
	name := tool
	if i := strings.IndexAny(name, "["); i >= 0 {
		name = name[:i]
	}
	name = strings.Trim(unsafeKeyChars.ReplaceAllString(strings.ToLower(name+"-"+version), "_"), "._-")
	if len(name) > 48 {
		name = name[:48]
	}
	return name + "-" + hex.EncodeToString(sum[:8])
}

// Install implements Installer.
func (m *Mise) Install(ctx context.Context, specs []Spec) (*Set, error) {
	set := &Set{}
	seen := map[string]bool{}
	for _, s := range specs {
		e, err := m.installOne(ctx, s)
		if err != nil {
			return nil, err
		}
		if seen[e.Key] {
			continue
		}
		seen[e.Key] = true
		set.Entries = append(set.Entries, e)
		set.Mounts = append(set.Mounts, Mount{Host: e.Dir, Guest: e.Dir})
		set.Path = append(set.Path, e.BinPaths...)
	}
	return set, nil
}

func (m *Mise) installOne(ctx context.Context, s Spec) (Entry, error) {
	// Validate again: a Spec may have been built by hand.
	if _, err := ParseSpec(s.String()); err != nil {
		return Entry{}, err
	}
	if !m.allowPrivate {
		if err := checkURLs(ctx, s, net.DefaultResolver); err != nil {
			return Entry{}, err
		}
	}
	// An entry whose resolved version is the version asked for answers an
	// exact request without asking mise (or the network) anything.
	if e, ok := m.lookup(entryKey(s.Tool(), s.Version)); ok {
		return m.touch(e), nil
	}
	version, err := m.resolve(ctx, s)
	if errors.Is(err, types.ErrUnavailable) {
		// Offline, or the registry is down: a request already served (e.g.
		// node@22) keeps working from the cache, with the version it got.
		if e, ok := m.lastFor(s); ok {
			m.log.Warn("cannot resolve tool version; using the cached one", "spec", s.String(), "version", e.Version, "error", err)
			return m.touch(e), nil
		}
	}
	if err != nil {
		return Entry{}, err
	}
	key := entryKey(s.Tool(), version)
	if e, ok := m.lookup(key); ok {
		m.remember(s, e)
		return m.touch(e), nil
	}

	// One install per key: in this process through keyMu, across processes
	// through the lock file. Whoever comes second finds the entry made.
	unlock, err := m.keyMu.lock(ctx, key)
	if err != nil {
		return Entry{}, fmt.Errorf("waiting for the install of %s: %w", s, err)
	}
	defer unlock()
	release, err := lockFile(ctx, m.layout.lockFile(key), true)
	if err != nil {
		return Entry{}, fmt.Errorf("waiting for the install of %s: %w", s, err)
	}
	defer release()
	if e, ok := m.lookup(key); ok {
		m.remember(s, e)
		return m.touch(e), nil
	}

	start := m.now()
	e, err := m.install(ctx, s, version, key)
	if err != nil {
		// Nothing half-made may survive: without its record an entry does
		// not exist, and its directory goes too.
		_ = os.RemoveAll(m.layout.entryDir(key))
		return Entry{}, err
	}
	m.log.Info("tool installed", "spec", s.String(), "version", version, "key", key,
		"size", e.Size, "duration", m.now().Sub(start).Round(time.Millisecond))
	m.remember(s, e)
	return m.touch(e), nil
}

// install runs mise for key, whose lock the caller holds, and writes the
// entry's record last.
func (m *Mise) install(ctx context.Context, s Spec, version, key string) (Entry, error) {
	dir := m.layout.entryDir(key)
	// A directory without a record is what a killed install left.
	if err := os.RemoveAll(dir); err != nil {
		return Entry{}, fmt.Errorf("removing the leftover of an earlier install at %s: %w", dir, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Entry{}, fmt.Errorf("creating tool directory %s: %w", dir, err)
	}
	want := s.Tool() + "@" + version
	if _, err := m.run(ctx, dir, "install", want); err != nil {
		return Entry{}, fmt.Errorf("installing %s: %w", s, err)
	}
	out, err := m.run(ctx, dir, "bin-paths", want)
	if err != nil {
		return Entry{}, fmt.Errorf("finding the bin directories of %s: %w", s, err)
	}
	var bins []string
	for line := range strings.Lines(string(out)) {
		p := filepath.Clean(strings.TrimSpace(line))
		if p == "." || !filepath.IsAbs(p) || !strings.HasPrefix(p, dir+string(filepath.Separator)) {
			continue
		}
		if fi, err := os.Stat(p); err == nil && fi.IsDir() {
			bins = append(bins, p)
		}
	}
	// Downloads are only the archives mise unpacked; guests need none.
	_ = os.RemoveAll(filepath.Join(dir, "downloads"))
	size, err := dirSize(dir)
	if err != nil {
		return Entry{}, fmt.Errorf("measuring %s: %w", dir, err)
	}
	e := Entry{
		Key: key, Spec: s.String(), Tool: s.Tool(), Version: version, Dir: dir,
		BinPaths: bins, Size: size, InstalledAt: m.now().UTC(),
	}
	return e, m.seal(e)
}

// seal writes e's marker into its directory, flushes the directory and
// writes e's record last; the caller holds e's lock.
func (m *Mise) seal(e Entry) error {
	dir, key := e.Dir, e.Key
	if err := writeMarker(e); err != nil {
		return err
	}
	if err := syncTree(dir); err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	rec, err := json.MarshalIndent(e, "", "  ")
	if err != nil {
		return fmt.Errorf("recording tool entry %s: %w", key, err)
	}
	if err := writeFileAtomic(m.layout.metaFile(key), append(rec, '\n')); err != nil {
		return fmt.Errorf("recording tool entry %s: %w", key, err)
	}
	return nil
}

// resolve asks mise which version s stands for. Backends that cannot list
// versions (http) answer nothing; then the version asked for is taken as
// it is, and must therefore be exact.
func (m *Mise) resolve(ctx context.Context, s Spec) (string, error) {
	// mise keeps each tool's version list in one cache file, which two
	// concurrent `mise latest` of the same tool write and remove under
	// each other ("failed rm: .../remote_versions-N.msgpack.z"): one
	// resolve per tool at a time, across processes.
	sum := sha256.Sum256([]byte(s.Tool()))
	release, err := lockFile(ctx, m.layout.lockFile(".resolve-"+hex.EncodeToString(sum[:8])), true)
	if err != nil {
		return "", fmt.Errorf("resolving %s: %w", s, err)
	}
	defer release()
	out, err := m.run(ctx, m.layout.miseDir("resolve"), "latest", s.String())
	if err != nil {
		return "", fmt.Errorf("resolving %s: %w", s, err)
	}
	v := strings.TrimSpace(string(out))
	if i := strings.LastIndexByte(v, '\n'); i >= 0 {
		v = strings.TrimSpace(v[i+1:])
	}
	if v == "" {
		if s.Version == "latest" {
			return "", fmt.Errorf("%w: tool spec %q: mise cannot list the versions of %s; give an exact version, e.g. %s@1.0.0", types.ErrInvalid, s, s.Tool(), s.Tool())
		}
		return s.Version, nil
	}
	if !validChars(v, "._+-:") {
		return "", fmt.Errorf("%w: mise resolved %s to %q, which is not a version", types.ErrUnavailable, s, v)
	}
	return v, nil
}

// run runs mise with args in its own process group, with the data
// directory dataDir and the cache's pinned directories, and returns its
// stdout. Cancelling ctx kills the whole group, so no npm or tar is left
// behind.
func (m *Mise) run(ctx context.Context, dataDir string, args ...string) ([]byte, error) {
	if m.mise == "" {
		return nil, fmt.Errorf("%w: this tools cache was opened without mise; install it with `sudo scripts/setup.sh` or set tools.mise_binary", types.ErrUnavailable)
	}
	cmd := exec.CommandContext(ctx, m.mise, args...)
	cmd.Dir = m.layout.miseDir("resolve")
	cmd.Env = append(slices.Clip(m.env),
		"MISE_DATA_DIR="+dataDir,
		"MISE_CACHE_DIR="+m.layout.miseDir("cache"),
		"MISE_CONFIG_DIR="+m.layout.miseDir("config"),
		"MISE_STATE_DIR="+m.layout.miseDir("state"),
		"MISE_YES=1",
		"NO_COLOR=1",
		// The worker's own home (and the credentials in it) is not mise's.
		"HOME="+m.layout.miseDir("home"),
	)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err == nil {
		return stdout.Bytes(), nil
	}
	if ctx.Err() != nil {
		return nil, fmt.Errorf("mise %s stopped: %w", args[0], context.Cause(ctx))
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return nil, fmt.Errorf("%w: running %s: %v", types.ErrUnavailable, m.mise, err)
	}
	return nil, miseError(stderr.String())
}

var ansi = regexp.MustCompile(`\x1b\[[0-9;]*[A-Za-z]`)

// miseError reduces mise's stderr to its reason, one line, wrapping
// ErrInvalid when the tool or version does not exist and ErrUnavailable
// otherwise (downloads, registries, anything retrying may fix).
func miseError(stderr string) error {
	stderr = ansi.ReplaceAllString(stderr, "")
	reason := ""
	for line := range strings.Lines(stderr) {
		line = strings.TrimSpace(line)
		if r, ok := strings.CutPrefix(line, "mise ERROR "); ok {
			reason = r
			break
		}
	}
	if reason == "" {
		// No ERROR line: take the last non-empty line.
		for line := range strings.Lines(stderr) {
			if l := strings.TrimSpace(line); l != "" {
				reason = l
			}
		}
	}
	// "Failed to install X@V: why" -> "why"; the caller names the spec.
	if strings.HasPrefix(reason, "Failed to install ") {
		if _, why, ok := strings.Cut(reason, ": "); ok {
			reason = why
		}
	}
	reason = cmp.Or(reason, "mise failed without saying why")
	if len(reason) > 500 {
		reason = reason[:500] + "..."
	}
	kind := types.ErrUnavailable
	low := strings.ToLower(reason)
	for _, s := range []string{"not found", "404", "410", "no such", "no matching", "no versions", "does not exist", "invalid", "unknown", "not a valid"} {
		if strings.Contains(low, s) {
			kind = types.ErrInvalid
			break
		}
	}
	return fmt.Errorf("%w: %s", kind, reason)
}

// lookup returns the complete entry key, if there is one.
func (m *Mise) lookup(key string) (Entry, bool) {
	b, err := os.ReadFile(m.layout.metaFile(key))
	if err != nil {
		return Entry{}, false
	}
	var e Entry
	if json.Unmarshal(b, &e) != nil || e.Key != key {
		return Entry{}, false
	}
	if fi, err := os.Stat(m.layout.usedFile(key)); err == nil {
		e.LastUsed = fi.ModTime()
	} else {
		e.LastUsed = e.InstalledAt
	}
	return e, true
}

// lastFor returns the entry the spec s was last resolved to, if it is
// still cached.
func (m *Mise) lastFor(s Spec) (Entry, bool) {
	b, err := os.ReadFile(m.layout.aliasFile(s.String()))
	if err != nil {
		return Entry{}, false
	}
	return m.lookup(strings.TrimSpace(string(b)))
}

// remember records that s resolved to e, for lastFor. It is best effort:
// without it only the offline fallback is lost.
func (m *Mise) remember(s Spec, e Entry) {
	if s.Version == e.Version {
		return
	}
	if err := writeFileAtomic(m.layout.aliasFile(s.String()), []byte(e.Key+"\n")); err != nil {
		m.log.Warn("cannot record a tool spec's resolution", "spec", s.String(), "key", e.Key, "error", err)
	}
}

// touch records that e was used now.
func (m *Mise) touch(e Entry) Entry {
	now := m.now()
	p := m.layout.usedFile(e.Key)
	if err := os.Chtimes(p, now, now); errors.Is(err, fs.ErrNotExist) {
		if f, err := os.Create(p); err == nil {
			f.Close()
			_ = os.Chtimes(p, now, now)
		}
	}
	e.LastUsed = now
	return e
}

// List implements Installer.
func (m *Mise) List(ctx context.Context) ([]Entry, error) {
	names, err := os.ReadDir(m.layout.metaDir())
	if err != nil {
		return nil, fmt.Errorf("reading the tools cache %s: %w", m.root, err)
	}
	entries := []Entry{}
	for _, n := range names {
		key, ok := strings.CutSuffix(n.Name(), ".json")
		if !ok {
			continue
		}
		if e, ok := m.lookup(key); ok {
			entries = append(entries, e)
		}
	}
	slices.SortFunc(entries, func(a, b Entry) int { return strings.Compare(a.Key, b.Key) })
	return entries, ctx.Err()
}

// Prune implements Installer.
func (m *Mise) Prune(ctx context.Context, olderThan time.Duration, keep func(key string) bool) ([]Entry, error) {
	if keep == nil {
		keep = func(string) bool { return false }
	}
	entries, err := m.List(ctx)
	if err != nil {
		return nil, err
	}
	cutoff := m.now().Add(-olderThan)
	pruned := []Entry{}
	for _, e := range entries {
		if err := ctx.Err(); err != nil {
			return pruned, err
		}
		if !e.LastUsed.Before(cutoff) || keep(e.Key) {
			continue
		}
		ok, err := m.remove(ctx, e.Key, func() bool {
			// Check again under the lock: an install may have used it since.
			cur, ok := m.lookup(e.Key)
			return ok && cur.LastUsed.Before(cutoff) && !keep(e.Key)
		})
		if err != nil {
			return pruned, err
		}
		if ok {
			pruned = append(pruned, e)
		}
	}
	// Leftovers of killed installs: directories without a record.
	dirs, err := os.ReadDir(m.root)
	if err != nil {
		return pruned, fmt.Errorf("reading the tools cache %s: %w", m.root, err)
	}
	for _, d := range dirs {
		if strings.HasPrefix(d.Name(), ".") || !d.IsDir() {
			continue
		}
		key := d.Name()
		if _, err := m.remove(ctx, key, func() bool { _, ok := m.lookup(key); return !ok }); err != nil {
			return pruned, err
		}
	}
	// Images of killed builds, and images whose entry is gone.
	imgs, err := os.ReadDir(m.layout.imageDir())
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return pruned, fmt.Errorf("reading the tools cache %s: %w", m.root, err)
	}
	for _, f := range imgs {
		name, ok := strings.CutSuffix(f.Name(), ".ext4")
		if !ok {
			continue
		}
		key, tmp := strings.CutPrefix(name, ".tmp-")
		release, err := lockFile(ctx, m.layout.lockFile(key), false)
		if errors.Is(err, errLocked) {
			continue
		}
		if err != nil {
			return pruned, err
		}
		if _, ok := m.lookup(key); tmp || !ok {
			_ = os.Remove(filepath.Join(m.layout.imageDir(), f.Name()))
		}
		release()
	}
	// Resolutions pointing at entries gone.
	metas, err := os.ReadDir(m.layout.metaDir())
	if err != nil {
		return pruned, fmt.Errorf("reading the tools cache %s: %w", m.root, err)
	}
	for _, f := range metas {
		if !strings.HasPrefix(f.Name(), "spec-") || !strings.HasSuffix(f.Name(), ".key") {
			continue
		}
		p := filepath.Join(m.layout.metaDir(), f.Name())
		if b, err := os.ReadFile(p); err == nil {
			if _, ok := m.lookup(strings.TrimSpace(string(b))); !ok {
				_ = os.Remove(p)
			}
		}
	}
	return pruned, nil
}

// remove deletes entry key if it is not locked and cond holds under the
// lock; the record goes first, so the entry vanishes at once.
func (m *Mise) remove(ctx context.Context, key string, cond func() bool) (bool, error) {
	release, err := lockFile(ctx, m.layout.lockFile(key), false)
	if errors.Is(err, errLocked) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer release()
	if !cond() {
		return false, nil
	}
	if err := os.Remove(m.layout.metaFile(key)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("removing tool entry %s: %w", key, err)
	}
	for _, img := range []string{m.layout.imageFile(key), m.layout.imageTemp(key)} {
		if err := os.Remove(img); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return false, fmt.Errorf("removing the image of tool entry %s: %w", key, err)
		}
	}
	if err := os.RemoveAll(m.layout.entryDir(key)); err != nil {
		return false, fmt.Errorf("removing tool entry %s: %w", key, err)
	}
	_ = os.Remove(m.layout.usedFile(key))
	return true, nil
}
