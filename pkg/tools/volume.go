package tools

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// MkfsBinaryDefault is the mkfs.ext4 of e2fsprogs that builds entry images.
const MkfsBinaryDefault = "mkfs.ext4"

// ImageLabel is the ext4 label of every tool image.
const ImageLabel = "aet-tool"

// MiseTool is the Tool of the entry holding mise itself (MiseVolume).
const MiseTool = "mise"

// Root implements Installer.
func (m *Mise) Root() string { return m.root }

// writeMarker writes e's marker file at the root of its directory: the
// JSON of its volume without the image, which the guest reads to find the
// volume's bin directories.
func writeMarker(e Entry) error {
	b, err := json.Marshal(e.Volume())
	if err != nil {
		return fmt.Errorf("encoding the marker of tool entry %s: %w", e.Key, err)
	}
	path := filepath.Join(e.Dir, types.ToolMarkerFile)
	if err := writeFileAtomic(path, append(b, '\n')); err != nil {
		return fmt.Errorf("writing the marker of tool entry %s: %w", e.Key, err)
	}
	// Readable by every guest user, like the tools it describes.
	if err := os.Chmod(path, 0o644); err != nil {
		return fmt.Errorf("writing the marker of tool entry %s: %w", e.Key, err)
	}
	return nil
}

// ensureMarker adds the marker to an entry made before markers existed (or
// repairs one that differs); the caller holds the entry's lock.
func ensureMarker(e Entry) error {
	want, err := json.Marshal(e.Volume())
	if err != nil {
		return fmt.Errorf("encoding the marker of tool entry %s: %w", e.Key, err)
	}
	have, err := os.ReadFile(filepath.Join(e.Dir, types.ToolMarkerFile))
	if err == nil && bytes.Equal(bytes.TrimSpace(have), want) {
		return nil
	}
	return writeMarker(e)
}

// lockKey takes key's in-process mutex and its lock file, waiting as long
// as ctx allows.
func (m *Mise) lockKey(ctx context.Context, key string) (release func(), err error) {
	unlock, err := m.keyMu.lock(ctx, key)
	if err != nil {
		return nil, err
	}
	rel, err := lockFile(ctx, m.layout.lockFile(key), true)
	if err != nil {
		unlock()
		return nil, err
	}
	return func() { rel(); unlock() }, nil
}

// Image implements Installer.
func (m *Mise) Image(ctx context.Context, e Entry) (string, error) {
	img := m.layout.imageFile(e.Key)
	if _, err := os.Stat(img); err == nil {
		return img, nil
	}
	release, err := m.lockKey(ctx, e.Key)
	if err != nil {
		return "", fmt.Errorf("waiting for tool entry %s: %w", e.Key, err)
	}
	defer release()
	if _, err := os.Stat(img); err == nil {
		return img, nil
	}
	cur, ok := m.lookup(e.Key)
	if !ok {
		return "", fmt.Errorf("%w: tool entry %s is not in the cache (pruned?); install its spec again", types.ErrNotFound, e.Key)
	}
	if err := ensureMarker(cur); err != nil {
		return "", err
	}
	start := m.now()
	if err := m.buildImage(ctx, cur.Dir, img, m.layout.imageTemp(cur.Key)); err != nil {
		return "", fmt.Errorf("building the image of tool entry %s: %w", cur.Key, err)
	}
	m.log.Info("tool image built", "key", cur.Key, "image", img, "duration", m.now().Sub(start).Round(time.Millisecond))
	return img, nil
}

// buildImage makes a read-only ext4 image of dir at img, through tmp and a
// rename, so that img never exists half-built. mkfs.ext4 -d copies the
// tree without mounting anything; no journal, since it is never written.
func (m *Mise) buildImage(ctx context.Context, dir, img, tmp string) error {
	mkfs, err := lookMkfs(m.mkfs)
	if err != nil {
		return err
	}
	// A killed build left tmp behind; only the lock holder gets here.
	if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	kib, inodes, err := imageSize(dir)
	if err != nil {
		return fmt.Errorf("measuring %s: %w", dir, err)
	}
	cmd := exec.CommandContext(ctx, mkfs, "-q", "-F", "-b", "4096", "-N", fmt.Sprint(inodes),
		"-d", dir, "-L", ImageLabel, "-O", "^has_journal",
		tmp, fmt.Sprintf("%dk", kib))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		_ = os.Remove(tmp)
		if ctx.Err() != nil {
			return fmt.Errorf("mkfs.ext4 stopped: %w", context.Cause(ctx))
		}
		return fmt.Errorf("%w: %s %s: %v: %s", types.ErrUnavailable, mkfs, tmp, err, oneLine(out.String()))
	}
	if err := finishFile(tmp, 0o444); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, img); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	return syncDir(filepath.Dir(img))
}

// lookMkfs finds mkfs.ext4, which lives in /usr/sbin (often not in the
// PATH of an unprivileged shell).
func lookMkfs(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	if !strings.Contains(name, "/") {
		for _, d := range []string{"/usr/sbin", "/sbin"} {
			if p, err := exec.LookPath(filepath.Join(d, name)); err == nil {
				return p, nil
			}
		}
	}
	return "", fmt.Errorf("%w: %s not found; install e2fsprogs (`apt-get install e2fsprogs`)", types.ErrUnavailable, name)
}

// imageSize returns the size in KiB and the inode count of an ext4 image
// that holds dir: every file rounded up to 4 KiB blocks, plus room for
// directories, inode tables and metadata, with a margin.
func imageSize(dir string) (kib, inodes int64, err error) {
	var blocks, files int64
	err = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		files++
		if d.IsDir() {
			blocks++
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		blocks += (fi.Size() + 4095) / 4096
		return nil
	})
	if err != nil {
		return 0, 0, err
	}
	inodes = files + files/10 + 64
	// 256-byte inodes, a 10% margin for indirect blocks and group
	// descriptors, and 4 MiB for the fixed metadata of a small file system.
	kib = blocks*4 + inodes/4 + (blocks*4)/10 + 4096
	kib = (kib + 1023) / 1024 * 1024
	return kib, inodes, nil
}

// finishFile sets a file's mode and flushes it.
func finishFile(path string, mode os.FileMode) error {
	if err := os.Chmod(path, mode); err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// oneLine keeps the last non-empty line of a tool's output.
func oneLine(s string) string {
	last := ""
	for line := range strings.Lines(s) {
		if l := strings.TrimSpace(line); l != "" {
			last = l
		}
	}
	return last
}

// miseVersion asks the mise binary for its version, e.g. "2026.9.15". The
// answer is kept while the binary's size and mtime stay the same, so that
// a create with tools does not start mise only to learn its version.
func (m *Mise) miseVersion(ctx context.Context) (string, error) {
	fi, statErr := os.Stat(m.mise)
	stamp := ""
	if statErr == nil {
		stamp = fmt.Sprintf("%d/%d", fi.Size(), fi.ModTime().UnixNano())
		m.verMu.Lock()
		v, ok := m.versions[stamp]
		m.verMu.Unlock()
		if ok {
			return v, nil
		}
	}
	v, err := m.askVersion(ctx)
	if err == nil && stamp != "" {
		m.verMu.Lock()
		if m.versions == nil {
			m.versions = map[string]string{}
		}
		m.versions[stamp] = v
		m.verMu.Unlock()
	}
	return v, err
}

func (m *Mise) askVersion(ctx context.Context) (string, error) {
	out, err := m.run(ctx, m.layout.miseDir("resolve"), "--version")
	if err != nil {
		return "", fmt.Errorf("asking %s for its version: %w", m.mise, err)
	}
	f := strings.Fields(string(out))
	if len(f) == 0 || !validChars(f[0], "._+-") {
		return "", fmt.Errorf("%w: %s --version printed %q, which holds no version", types.ErrUnavailable, m.mise, strings.TrimSpace(string(out)))
	}
	return f[0], nil
}

// MiseVolume implements Installer.
func (m *Mise) MiseVolume(ctx context.Context) (Entry, error) {
	version, err := m.miseVersion(ctx)
	if err != nil {
		return Entry{}, err
	}
	key := MiseTool + "-" + version
	if e, ok := m.lookup(key); ok {
		return m.touch(e), nil
	}
	release, err := m.lockKey(ctx, key)
	if err != nil {
		return Entry{}, fmt.Errorf("waiting for the mise entry %s: %w", key, err)
	}
	defer release()
	if e, ok := m.lookup(key); ok {
		return m.touch(e), nil
	}
	e, err := m.copyMise(ctx, key, version)
	if err != nil {
		_ = os.RemoveAll(m.layout.entryDir(key))
		return Entry{}, err
	}
	return m.touch(e), nil
}

// copyMise copies the mise binary into entry key; the caller holds its
// lock.
func (m *Mise) copyMise(ctx context.Context, key, version string) (Entry, error) {
	dir := m.layout.entryDir(key)
	bin := filepath.Join(dir, "bin")
	if err := os.RemoveAll(dir); err != nil {
		return Entry{}, fmt.Errorf("removing the leftover of an earlier copy at %s: %w", dir, err)
	}
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return Entry{}, fmt.Errorf("creating %s: %w", bin, err)
	}
	if err := copyFile(ctx, m.mise, filepath.Join(bin, "mise"), 0o755); err != nil {
		return Entry{}, fmt.Errorf("copying %s into the tools cache: %w", m.mise, err)
	}
	size, err := dirSize(dir)
	if err != nil {
		return Entry{}, fmt.Errorf("measuring %s: %w", dir, err)
	}
	e := Entry{Key: key, Tool: MiseTool, Version: version, Dir: dir, BinPaths: []string{bin}, Size: size, InstalledAt: m.now().UTC()}
	return e, m.seal(e)
}

// copyFile copies src to dst with mode, stopping when ctx ends.
func copyFile(ctx context.Context, src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, ctxReader{ctx, in}); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// ctxReader stops a copy once its context ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, context.Cause(c.ctx)
	}
	return c.r.Read(p)
}

// WithMise returns the set's entries followed by the entry of mise
// itself (MiseVolume), which every tool set carries so that `mise exec`
// and `mise ls` work in the guest. A nil or empty set gives nil: a VM
// without tools gets no mise either.
func WithMise(ctx context.Context, inst Installer, set *Set) ([]Entry, error) {
	if set == nil || len(set.Entries) == 0 {
		return nil, nil
	}
	miseEntry, err := inst.MiseVolume(ctx)
	if err != nil {
		return nil, err
	}
	return append(append([]Entry(nil), set.Entries...), miseEntry), nil
}

// ToolSet turns cache entries into the tool set a backend delivers, in
// their order (see WithMise), each with its image when images is set: VM
// backends attach images, docker binds directories. No entries give nil.
// Errors are Image's, and too many entries for one VM wrap
// types.ErrInvalid.
func ToolSet(ctx context.Context, inst Installer, entries []Entry, images bool) (*types.ToolSet, error) {
	if len(entries) == 0 {
		return nil, nil
	}
	if len(entries) > types.MaxToolVolumes {
		return nil, fmt.Errorf("%w: %d tool volumes (mise included) asked for; a vm takes at most %d", types.ErrInvalid, len(entries), types.MaxToolVolumes)
	}
	ts := &types.ToolSet{Root: inst.Root()}
	for _, e := range entries {
		v := e.Volume()
		if images {
			var err error
			if v.Image, err = inst.Image(ctx, e); err != nil {
				return nil, err
			}
		}
		ts.Volumes = append(ts.Volumes, v)
	}
	if err := ts.Validate(); err != nil {
		return nil, err
	}
	return ts, nil
}
