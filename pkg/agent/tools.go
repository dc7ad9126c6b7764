package agent

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// maxMarkerBytes bounds a tool volume's marker file: it holds a key, a
// spec and a few paths.
const maxMarkerBytes = 64 << 10

// ReadToolMarker reads the marker (types.ToolMarkerFile) at the top of
// dir, a tool volume's content, and checks it against the tools root: the
// key is a plain directory name, the volume's Dir is root/<key> and its
// bin paths lie under Dir. dir itself may be anywhere (a staging mount
// point); callers that read a volume in place also check that dir is the
// Dir the marker names. A missing marker wraps fs.ErrNotExist, an invalid
// one types.ErrInvalid. The Image field is cleared: it names a host path.
func ReadToolMarker(dir, root string) (types.ToolVolume, error) {
	path := filepath.Join(dir, types.ToolMarkerFile)
	f, err := os.Open(path)
	if err != nil {
		return types.ToolVolume{}, fmt.Errorf("reading tool marker: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxMarkerBytes+1))
	if err != nil {
		return types.ToolVolume{}, fmt.Errorf("reading tool marker %s: %w", path, err)
	}
	if len(b) > maxMarkerBytes {
		return types.ToolVolume{}, fmt.Errorf("%w: tool marker %s is larger than %d bytes", types.ErrInvalid, path, maxMarkerBytes)
	}
	var v types.ToolVolume
	if err := json.Unmarshal(b, &v); err != nil {
		return types.ToolVolume{}, fmt.Errorf("%w: tool marker %s is not JSON of a tool volume: %v", types.ErrInvalid, path, err)
	}
	v.Image = ""
	if err := checkToolVolume(root, v); err != nil {
		return types.ToolVolume{}, fmt.Errorf("tool marker %s: %w", path, err)
	}
	return v, nil
}

// checkToolVolume checks one volume against the tools root with the rules
// every backend applies (types.ToolSet.Validate).
func checkToolVolume(root string, v types.ToolVolume) error {
	if root == "" {
		return fmt.Errorf("%w: no tools root is set", types.ErrInvalid)
	}
	set := types.ToolSet{Root: root, Volumes: []types.ToolVolume{v}}
	return set.Validate()
}

// toolRegistry is what the agent knows of the tool volumes under its tools
// root: their markers, read from root/*/types.ToolMarkerFile, and the PATH
// prefix their bin directories make. It rescans when the root's directory
// changes (a volume added or removed changes its mtime), which costs one
// stat per command.
type toolRegistry struct {
	log *slog.Logger

	mu    sync.Mutex
	root  string // "": none yet
	seen  dirStamp
	vols  []types.ToolVolume // sorted by key
	path  string             // bin paths joined with ':'
	valid bool               // vols and path match seen
}

// dirStamp tells one state of a directory from another.
type dirStamp struct {
	dev, ino uint64
	mtime    int64
}

func stampOf(dir string) (dirStamp, bool) {
	var st unix.Stat_t
	if unix.Stat(dir, &st) != nil {
		return dirStamp{}, false
	}
	return dirStamp{dev: st.Dev, ino: st.Ino, mtime: st.Mtim.Nano()}, true
}

func newToolRegistry(root string, log *slog.Logger) *toolRegistry {
	r := &toolRegistry{root: root, log: log}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.scanLocked()
	if root != "" {
		keys := make([]string, len(r.vols))
		for i, v := range r.vols {
			keys[i] = v.Key
		}
		log.Info("tool volumes on PATH", "root", root, "volumes", strings.Join(keys, ","), "path", r.path)
	}
	return r
}

// snapshot returns the root, the volumes and the PATH prefix, rescanning
// first when the root changed since the last scan.
func (r *toolRegistry) snapshot() (root string, vols []types.ToolVolume, path string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.root != "" {
		if st, ok := stampOf(r.root); !ok || st != r.seen || !r.valid {
			r.scanLocked()
		}
	}
	return r.root, slices.Clone(r.vols), r.path
}

// refresh rescans the root whatever its stamp says.
func (r *toolRegistry) refresh() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.scanLocked()
}

// useRoot makes root the tools root if none is set. A different root than
// the one set is refused: volumes are addressed by absolute paths, so one
// guest has one root.
func (r *toolRegistry) useRoot(root string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch r.root {
	case root:
		return nil
	case "":
		r.root = root
		r.scanLocked()
		return nil
	default:
		return fmt.Errorf("%w: the guest's tools root is %s, not %s; tool volumes of one VM share one root", types.ErrInvalid, r.root, root)
	}
}

// scanLocked reads every volume's marker under the root. Entries starting
// with '.' (AddTools's work in progress) are not volumes; an invalid
// marker is logged and its volume left out.
func (r *toolRegistry) scanLocked() {
	r.vols, r.path, r.valid = nil, "", false
	if r.root == "" {
		return
	}
	// Stamp first: a change during the scan triggers another.
	st, ok := stampOf(r.root)
	if !ok {
		// No root yet (no tools delivered): nothing to find, and the
		// next look stats it again.
		return
	}
	entries, err := os.ReadDir(r.root)
	if err != nil {
		r.log.Warn("cannot list the tool volumes", "root", r.root, "err", err)
		return
	}
	var bins []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") || !e.IsDir() {
			continue
		}
		dir := filepath.Join(r.root, e.Name())
		v, err := ReadToolMarker(dir, r.root)
		if err == nil && v.Dir != dir {
			err = fmt.Errorf("%w: the marker in %s names dir %s", types.ErrInvalid, dir, v.Dir)
		}
		if err != nil {
			r.log.Warn("ignoring a tool volume: its tools are not on PATH", "dir", dir, "err", err)
			continue
		}
		r.vols = append(r.vols, v)
		bins = append(bins, v.BinPaths...)
	}
	// ReadDir sorts by name, which is the key.
	r.path = strings.Join(bins, string(os.PathListSeparator))
	// File times come from a clock that ticks every few milliseconds: a
	// change within the tick of this scan would leave the stamp as it is,
	// so a scan that recent is not trusted for long. A time in the future
	// is a clock that was set back, not a change.
	age := time.Since(time.Unix(0, st.mtime))
	r.seen, r.valid = st, age < 0 || age >= stampSettle
}

// stampSettle is how old a root's mtime must be before a scan of it is
// reused: well above the file system clock's tick.
const stampSettle = 100 * time.Millisecond

// commandPath is the PATH of a command that sets none: the tools' bin
// directories, then defaultPath.
func (r *toolRegistry) commandPath() string {
	_, _, p := r.snapshot()
	if p == "" {
		return defaultPath
	}
	return p + string(os.PathListSeparator) + defaultPath
}

// validToolsRoot checks a tools root as types.ToolSet.Validate does.
func validToolsRoot(root string) error {
	if !filepath.IsAbs(root) || filepath.Clean(root) != root || root == "/" {
		return fmt.Errorf("%w: tools root %q must be a clean absolute path other than /", types.ErrInvalid, root)
	}
	return nil
}
