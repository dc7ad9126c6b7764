package tools

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/tools/toolstest"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// toolServer serves hello-1.0.0.tar.gz, counting requests. While stall is
// set it sends the headers and a few bytes, then hangs until released.
type toolServer struct {
	*httptest.Server
	requests atomic.Int32
	stall    atomic.Bool
	stalled  chan struct{} // receives when a request is stalling
	release  chan struct{}
}

func newToolServer(t *testing.T) *toolServer {
	t.Helper()
	tgz := helloTarball(t)
	s := &toolServer{stalled: make(chan struct{}, 16), release: make(chan struct{})}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.requests.Add(1)
		if r.URL.Path != "/hello-1.0.0.tar.gz" {
			http.NotFound(w, r)
			return
		}
		if s.stall.Load() {
			w.Header().Set("Content-Length", fmt.Sprint(len(tgz)))
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write(tgz[:len(tgz)/2])
			w.(http.Flusher).Flush()
			s.stalled <- struct{}{}
			select {
			case <-s.release:
			case <-r.Context().Done():
			}
			return // a truncated body
		}
		w.Header().Set("Content-Type", "application/gzip")
		_, _ = w.Write(tgz)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *toolServer) spec(t *testing.T, version string) Spec {
	t.Helper()
	sp, err := ParseSpec("http:hello[url=" + s.URL + "/hello-{{version}}.tar.gz]@" + version)
	require.NoError(t, err)
	return sp
}

// helloTarball is hello-1.0.0/bin/hello, a shell script that greets.
func helloTarball(t *testing.T) []byte { return toolstest.HelloTarball(t, "1.0.0") }

// newTestMise returns an installer on a fresh cache, skipping when mise is
// missing.
func newTestMise(t *testing.T, env map[string]string) *Mise {
	t.Helper()
	if _, err := exec.LookPath(MiseBinaryDefault); err != nil {
		testenv.Skip(t, "mise is not installed (%v); install it with `sudo scripts/setup.sh`", err)
	}
	m, err := NewMise(Config{Root: t.TempDir(), Env: env, AllowPrivateURLs: true})
	require.NoError(t, err)
	return m
}

// runTool runs name with the set's bin directories in front of PATH, as a
// guest exec will.
func runTool(t *testing.T, set *Set, name string, args ...string) string {
	t.Helper()
	path := set.PathEnv(os.Getenv("PATH"))
	var bin string
	for _, d := range set.Path {
		if _, err := os.Stat(filepath.Join(d, name)); err == nil {
			bin = filepath.Join(d, name)
			break
		}
	}
	require.NotEmpty(t, bin, "%s is in none of %v", name, set.Path)
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "PATH="+path)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s: %s", name, out)
	return string(out)
}

// requireNoEntries checks the cache holds no entry and no leftover.
func requireNoEntries(t *testing.T, m *Mise) {
	t.Helper()
	entries, err := m.List(context.Background())
	require.NoError(t, err)
	require.Empty(t, entries)
	dirs, err := os.ReadDir(m.root)
	require.NoError(t, err)
	for _, d := range dirs {
		require.True(t, strings.HasPrefix(d.Name(), "."), "leftover %s in the cache", d.Name())
	}
}

func TestInstallHTTPThenCached(t *testing.T) {
	srv := newToolServer(t)
	m := newTestMise(t, nil)
	ctx := context.Background()
	spec := srv.spec(t, "1.0.0")

	start := time.Now()
	set, err := m.Install(ctx, []Spec{spec})
	require.NoError(t, err)
	first := time.Since(start)
	require.EqualValues(t, 1, srv.requests.Load())
	require.Len(t, set.Entries, 1)
	e := set.Entries[0]
	require.Equal(t, "1.0.0", e.Version)
	require.Equal(t, spec.Tool(), e.Tool)
	require.Equal(t, filepath.Join(m.root, e.Key), e.Dir)
	require.Equal(t, []Mount{{Host: e.Dir, Guest: e.Dir}}, set.Mounts)
	require.NotEmpty(t, set.Path)
	require.Equal(t, "hello from the tool cache\n", runTool(t, set, "hello"))

	start = time.Now()
	again, err := m.Install(ctx, []Spec{spec, spec})
	require.NoError(t, err)
	t.Logf("first install %v, cached %v", first.Round(time.Microsecond), time.Since(start).Round(time.Microsecond))
	require.EqualValues(t, 1, srv.requests.Load(), "a cached version is never fetched again")
	require.Len(t, again.Entries, 1, "duplicates collapse")
	require.Equal(t, e.Key, again.Entries[0].Key)

	// A new installer on the same root (another worker process) reuses it.
	m2, err := NewMise(Config{Root: m.root, AllowPrivateURLs: true})
	require.NoError(t, err)
	_, err = m2.Install(ctx, []Spec{spec})
	require.NoError(t, err)
	require.EqualValues(t, 1, srv.requests.Load())

	entries, err := m.List(ctx)
	require.NoError(t, err)
	require.Len(t, entries, 1)
	require.Equal(t, spec.String(), entries[0].Spec)
	require.Equal(t, "1.0.0", entries[0].Version)
	require.Positive(t, entries[0].Size)
	require.WithinDuration(t, time.Now(), entries[0].LastUsed, time.Minute)

	pruned, err := m.Prune(ctx, time.Hour, nil)
	require.NoError(t, err)
	require.Empty(t, pruned, "a fresh entry is kept")
	pruned, err = m.Prune(ctx, 0, nil)
	require.NoError(t, err)
	require.Len(t, pruned, 1)
	requireNoEntries(t, m)
	pruned, err = m.Prune(ctx, 0, nil)
	require.NoError(t, err)
	require.Empty(t, pruned, "prune is idempotent")
}

func TestInstallUnknownVersion(t *testing.T) {
	srv := newToolServer(t)
	m := newTestMise(t, nil)
	_, err := m.Install(context.Background(), []Spec{srv.spec(t, "2.0.0")})
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "404")
	require.ErrorContains(t, err, "hello-2.0.0.tar.gz")
	require.NotContains(t, err.Error(), "\n", "mise's reason in one line")
	t.Logf("error: %v", err)
	requireNoEntries(t, m)
}

func TestInstallUnknownTool(t *testing.T) {
	m := newTestMise(t, nil)
	_, err := m.Install(context.Background(), []Spec{{Name: "nosuchtoolxyz", Version: "1.0.0"}})
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "nosuchtoolxyz")
	t.Logf("error: %v", err)
	requireNoEntries(t, m)
}

func TestInstallDownloadFails(t *testing.T) {
	m := newTestMise(t, nil)
	spec, err := ParseSpec("http:hello[url=http://127.0.0.1:1/hello-{{version}}.tar.gz]@1.0.0")
	require.NoError(t, err)
	_, err = m.Install(context.Background(), []Spec{spec})
	require.ErrorIs(t, err, types.ErrUnavailable)
	require.NotContains(t, err.Error(), "\n")
	t.Logf("error: %v", err)
	requireNoEntries(t, m)
}

func TestInstallConcurrent(t *testing.T) {
	srv := newToolServer(t)
	m := newTestMise(t, nil)
	// A second installer on the same root stands for another process: it
	// shares only the lock files.
	other, err := NewMise(Config{Root: m.root, AllowPrivateURLs: true})
	require.NoError(t, err)
	spec := srv.spec(t, "1.0.0")
	var wg sync.WaitGroup
	keys := make([]string, 6)
	errs := make([]error, 6)
	for i := range keys {
		wg.Go(func() {
			inst := m
			if i == 5 {
				inst = other
			}
			set, err := inst.Install(context.Background(), []Spec{spec})
			errs[i] = err
			if err == nil {
				keys[i] = set.Entries[0].Key
			}
		})
	}
	wg.Wait()
	for i := range keys {
		require.NoError(t, errs[i])
		require.Equal(t, keys[0], keys[i])
	}
	require.EqualValues(t, 1, srv.requests.Load(), "one download for all")
}

func TestInstallKilledMidway(t *testing.T) {
	srv := newToolServer(t)
	m := newTestMise(t, nil)
	spec := srv.spec(t, "1.0.0")
	srv.stall.Store(true)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		_, err := m.Install(ctx, []Spec{spec})
		errc <- err
	}()
	select {
	case <-srv.stalled:
	case err := <-errc:
		t.Fatalf("install ended before the download stalled: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("mise never asked for the tarball")
	}
	// The download is midway: the entry's directory exists, its record not.
	key := entryKey(spec.Tool(), "1.0.0")
	require.DirExists(t, filepath.Join(m.root, key))
	cancel()
	select {
	case err := <-errc:
		require.ErrorIs(t, err, context.Canceled)
	case <-time.After(30 * time.Second):
		t.Fatal("cancelling did not stop the install")
	}
	requireNoEntries(t, m)

	srv.stall.Store(false)
	close(srv.release)
	set, err := m.Install(context.Background(), []Spec{spec})
	require.NoError(t, err)
	require.Equal(t, "hello from the tool cache\n", runTool(t, set, "hello"))
}

func TestInstallReplacesLeftover(t *testing.T) {
	// A worker killed with SIGKILL mid-install leaves a directory and no
	// record; the next install, or a prune, must clear it.
	srv := newToolServer(t)
	m := newTestMise(t, nil)
	spec := srv.spec(t, "1.0.0")
	key := entryKey(spec.Tool(), "1.0.0")
	junk := filepath.Join(m.root, key, "installs", "http-hello", "1.0.0", "bin")
	require.NoError(t, os.MkdirAll(junk, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(junk, "hello"), []byte("#!/bin/sh\necho half\n"), 0o755))
	entries, err := m.List(context.Background())
	require.NoError(t, err)
	require.Empty(t, entries, "a leftover is not an entry")

	set, err := m.Install(context.Background(), []Spec{spec})
	require.NoError(t, err)
	require.Equal(t, "hello from the tool cache\n", runTool(t, set, "hello"))

	orphan := filepath.Join(m.root, "orphan-0123456789abcdef")
	require.NoError(t, os.MkdirAll(orphan, 0o755))
	_, err = m.Prune(context.Background(), time.Hour, nil)
	require.NoError(t, err)
	require.NoDirExists(t, orphan)
	require.DirExists(t, set.Entries[0].Dir, "a complete entry in use stays")
}

func TestNewMiseConfig(t *testing.T) {
	if _, err := exec.LookPath(MiseBinaryDefault); err != nil {
		testenv.Skip(t, "mise is not installed (%v); install it with `sudo scripts/setup.sh`", err)
	}
	_, err := NewMise(Config{Root: "relative/dir"})
	require.ErrorIs(t, err, types.ErrInvalid)
	_, err = NewMise(Config{Root: t.TempDir(), Env: map[string]string{"MISE_DATA_DIR": "/tmp"}})
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "MISE_DATA_DIR")
	_, err = NewMise(Config{Root: t.TempDir(), Mise: "/nonexistent/mise"})
	require.ErrorIs(t, err, types.ErrUnavailable)
	require.ErrorContains(t, err, "scripts/setup.sh")
}

func TestInstallNpmFromRegistry(t *testing.T) {
	if _, err := exec.LookPath("npm"); err != nil {
		testenv.Skip(t, "npm is not installed (%v); install nodejs and npm with `sudo scripts/setup.sh`", err)
	}
	m := newTestMise(t, map[string]string{"MISE_NPM_PACKAGE_MANAGER": "npm"})
	spec, err := ParseSpec("npm:cowsay@1.6.0")
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	set, err := m.Install(ctx, []Spec{spec})
	if errors.Is(err, types.ErrUnavailable) {
		testenv.Skip(t, "the npm registry is unreachable: %v", err)
	}
	require.NoError(t, err)
	first := time.Since(start)
	require.Equal(t, "1.6.0", set.Entries[0].Version)
	require.Contains(t, runTool(t, set, "cowsay", "moo from the cache"), "moo from the cache")

	start = time.Now()
	_, err = m.Install(ctx, []Spec{spec})
	require.NoError(t, err)
	t.Logf("npm:cowsay@1.6.0 first install %v, cached %v, %d bytes", first.Round(time.Millisecond), time.Since(start).Round(time.Microsecond), set.Entries[0].Size)

	// A version prefix is resolved by mise each time; when the registry
	// is unreachable, the entry it got last time serves.
	prefix, err := ParseSpec("npm:cowsay@1")
	require.NoError(t, err)
	set, err = m.Install(ctx, []Spec{prefix})
	require.NoError(t, err)
	require.Equal(t, "1.6.0", set.Entries[0].Version)
	// mise caches version lists; drop them so it must ask the registry.
	require.NoError(t, os.RemoveAll(filepath.Join(m.root, ".mise", "cache")))
	offline, err := NewMise(Config{Root: m.root, Env: map[string]string{
		"MISE_NPM_PACKAGE_MANAGER":           "npm",
		"MISE_FETCH_REMOTE_VERSIONS_TIMEOUT": "2s",
		"npm_config_registry":                "http://127.0.0.1:1/",
	}})
	require.NoError(t, err)
	set, err = offline.Install(ctx, []Spec{prefix})
	require.NoError(t, err, "the cached entry serves when the registry is down")
	require.Equal(t, "1.6.0", set.Entries[0].Version)
	_, err = offline.Install(ctx, []Spec{{Backend: "npm", Name: "cowsay", Version: "1.5"}})
	require.ErrorIs(t, err, types.ErrUnavailable, "nothing cached for this spec")
	require.NotContains(t, err.Error(), "\n")
	t.Logf("offline error: %v", err)
}
