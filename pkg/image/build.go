// Package image builds guest images from Debian's packages on the build
// host: the cloud kernel (a bzImage for QEMU and the ELF vmlinux inside it
// for Firecracker), an initramfs with fc-agent as /init and the modules it
// needs, and a root file system (a debootstrap minbase, or any tree given
// as a tar or a directory) as an ext4 image and as a tar for docker import,
// so every backend runs the same userland.
//
// Images live in a content-addressed cache: <cache>/images/<id>, where id
// hashes every input. Building from the same inputs again returns the
// existing image without rebuilding.
package image

import (
	"bytes"
	"cmp"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// FormatVersion is the version of the image layout and of how inputs are
// hashed. Raising it gives every image a new id.
const FormatVersion = 1

// CacheDirEnv names the variable that overrides DefaultCacheDir.
const CacheDirEnv = "AETHERIUM_IMAGE_DIR"

// defaultCacheDir is the cache when CacheDirEnv is unset.
const defaultCacheDir = "/var/cache/aetherium"

// DefaultRootfsSizeMB is the ext4 image's default size.
const DefaultRootfsSizeMB = 1024

// DefaultSuite is the Debian suite debootstrap installs.
const DefaultSuite = "bookworm"

// DefaultCacheDir returns $AETHERIUM_IMAGE_DIR, or /var/cache/aetherium.
func DefaultCacheDir() string { return cmp.Or(os.Getenv(CacheDirEnv), defaultCacheDir) }

// Options configure Build. The zero value of every field means its default.
type Options struct {
	// CacheDir is the cache root; images go in CacheDir/images/<id>.
	// Default DefaultCacheDir().
	CacheDir string
	// DebCacheDir holds downloaded kernel packages. Default CacheDir/debs.
	DebCacheDir string
	// AgentPath is a static fc-agent binary (required; `make build` makes
	// bin/fc-agent).
	AgentPath string
	// RootfsSizeMB is the ext4 image's size in MiB (a sparse file).
	// Default DefaultRootfsSizeMB.
	RootfsSizeMB int
	// FromTar makes the rootfs from this tar file (e.g. a `docker export`)
	// instead of debootstrap. Exclusive with FromDir.
	FromTar string
	// FromDir makes the rootfs from a copy of this directory tree instead
	// of debootstrap. Exclusive with FromTar.
	FromDir string
	// Suite is the Debian suite debootstrap installs. Default bookworm.
	Suite string
	// Mirror is the Debian archive debootstrap uses. Default: the first
	// URI in this machine's apt sources.
	Mirror string
	// KernelDeb is an already downloaded kernel .deb to use instead of the
	// current linux-image-cloud-amd64 from apt.
	KernelDeb string
	// Logger receives progress. Default: discard.
	Logger *slog.Logger
}

var idRe = regexp.MustCompile(`^[0-9a-f]{16}$`)

// Build builds the image described by o, or returns the existing one when
// an image with the same inputs is already in the cache and verifies. It
// is safe to call concurrently, also from several processes: builds of
// the same id wait for each other. Cancelling ctx stops the build and
// leaves the cache as it was.
func Build(ctx context.Context, o Options) (*Manifest, error) {
	if err := o.fill(); err != nil {
		return nil, err
	}
	log := o.Logger
	start := time.Now()

	debPath, err := o.kernelDeb(ctx)
	if err != nil {
		return nil, err
	}
	debSum, _, err := hashFile(debPath)
	if err != nil {
		return nil, fmt.Errorf("reading the kernel package: %w", err)
	}
	agentSum, _, err := hashFile(o.AgentPath)
	if err != nil {
		return nil, fmt.Errorf("reading fc-agent: %w", err)
	}
	rootfs, err := o.rootfsIdentity()
	if err != nil {
		return nil, err
	}
	id := imageID(debSum, agentSum, rootfs, o.RootfsSizeMB)
	imagesDir := filepath.Join(o.CacheDir, "images")
	dir := filepath.Join(imagesDir, id)
	log = log.With("image_id", id)

	if m, err := loadVerified(dir); err == nil {
		log.Info("guest image is up to date", "dir", dir)
		return m, nil
	}
	if err := os.MkdirAll(imagesDir, 0o755); err != nil {
		return nil, fmt.Errorf("making the image cache %s: %w", imagesDir, err)
	}
	unlock, err := lockFile(ctx, filepath.Join(imagesDir, ".lock-"+id))
	if err != nil {
		return nil, err
	}
	defer unlock()
	if m, err := loadVerified(dir); err == nil {
		log.Info("guest image was built concurrently", "dir", dir)
		return m, nil
	}
	// Holding the lock, whatever else exists for this id is left over from
	// a broken or killed earlier build.
	leftovers, _ := filepath.Glob(filepath.Join(imagesDir, ".build-"+id+"-*"))
	more, _ := filepath.Glob(filepath.Join(imagesDir, ".work-"+id+"-*"))
	for _, p := range append(append(leftovers, more...), dir) {
		if err := os.RemoveAll(p); err != nil {
			return nil, fmt.Errorf("removing the broken image build %s: %w", p, err)
		}
	}

	stage, err := os.MkdirTemp(imagesDir, ".build-"+id+"-")
	if err != nil {
		return nil, fmt.Errorf("making a build directory: %w", err)
	}
	defer os.RemoveAll(stage)
	work, err := os.MkdirTemp(imagesDir, ".work-"+id+"-")
	if err != nil {
		return nil, fmt.Errorf("making a work directory: %w", err)
	}
	defer os.RemoveAll(work)

	m := &Manifest{Format: FormatVersion, ID: id, Dir: stage, Rootfs: rootfs}
	m.Kernel.DebSHA256 = debSum
	m.Agent.SHA256 = agentSum
	log.Info("building guest image", "kernel_deb", debPath, "rootfs", rootfs.Source)
	if err := o.buildKernel(ctx, m, debPath, filepath.Join(work, "kernel")); err != nil {
		return nil, err
	}
	if err := o.buildRootfs(ctx, m, filepath.Join(work, "rootfs")); err != nil {
		return nil, err
	}

	m.Files, m.Sizes = map[string]string{}, map[string]int64{}
	for _, name := range outputFiles {
		sum, size, err := hashFile(m.Path(name))
		if err != nil {
			return nil, err
		}
		m.Files[name], m.Sizes[name] = sum, size
		// Read-only: VMs must copy the rootfs, never write the cached one.
		if err := os.Chmod(m.Path(name), 0o444); err != nil {
			return nil, err
		}
	}
	m.Kernel.Vmlinuz, m.Kernel.Vmlinux = m.Files[FileVmlinuz], m.Files[FileVmlinux]
	m.Created = time.Now().UTC()
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(m.Path(FileManifest), append(b, '\n'), 0o644); err != nil {
		return nil, fmt.Errorf("writing the manifest: %w", err)
	}
	if err := os.Chmod(stage, 0o755); err != nil {
		return nil, err
	}
	if err := os.Rename(stage, dir); err != nil {
		return nil, fmt.Errorf("moving the built image into place: %w", err)
	}
	m.Dir = dir
	log.Info("built guest image", "dir", dir, "took", time.Since(start).Round(time.Millisecond))
	return m, nil
}

// loadVerified returns the image in dir if it is complete and intact.
func loadVerified(dir string) (*Manifest, error) {
	m, err := Load(dir)
	if err != nil {
		return nil, err
	}
	if err := Verify(m); err != nil {
		return nil, err
	}
	return m, nil
}

func (o *Options) fill() error {
	o.CacheDir = cmp.Or(o.CacheDir, DefaultCacheDir())
	o.DebCacheDir = cmp.Or(o.DebCacheDir, filepath.Join(o.CacheDir, "debs"))
	o.RootfsSizeMB = cmp.Or(o.RootfsSizeMB, DefaultRootfsSizeMB)
	o.Suite = cmp.Or(o.Suite, DefaultSuite)
	o.Logger = cmp.Or(o.Logger, slog.New(slog.DiscardHandler))
	if o.AgentPath == "" {
		return fmt.Errorf("%w: no fc-agent binary given; build it with `make build` (bin/fc-agent)", types.ErrInvalid)
	}
	if fi, err := os.Stat(o.AgentPath); err != nil || !fi.Mode().IsRegular() {
		return fmt.Errorf("%w: fc-agent %s is not a file; build it with `make build` (bin/fc-agent)", types.ErrInvalid, o.AgentPath)
	}
	if o.FromTar != "" && o.FromDir != "" {
		return fmt.Errorf("%w: give a rootfs tar or a rootfs directory, not both", types.ErrInvalid)
	}
	if o.RootfsSizeMB < 16 {
		return fmt.Errorf("%w: rootfs size %d MiB is too small; give at least 16", types.ErrInvalid, o.RootfsSizeMB)
	}
	var err error
	for _, p := range []*string{&o.CacheDir, &o.DebCacheDir, &o.AgentPath, &o.FromTar, &o.FromDir, &o.KernelDeb} {
		if *p != "" {
			if *p, err = filepath.Abs(*p); err != nil {
				return err
			}
		}
	}
	if o.FromTar == "" && o.FromDir == "" {
		if o.Mirror == "" {
			if o.Mirror, err = DefaultMirror(); err != nil {
				return err
			}
		}
		if err := checkMirror(o.Suite, o.Mirror); err != nil {
			return err
		}
	}
	return nil
}

func (o *Options) kernelDeb(ctx context.Context) (string, error) {
	if o.KernelDeb != "" {
		if _, err := os.Stat(o.KernelDeb); err != nil {
			return "", fmt.Errorf("%w: kernel package %s: %v", types.ErrInvalid, o.KernelDeb, err)
		}
		return o.KernelDeb, nil
	}
	return fetchKernelDeb(ctx, o.DebCacheDir)
}

// rootfsIdentity names and hashes the rootfs source.
func (o *Options) rootfsIdentity() (RootfsInfo, error) {
	r := RootfsInfo{SizeMB: o.RootfsSizeMB}
	switch {
	case o.FromTar != "":
		sum, _, err := hashFile(o.FromTar)
		if err != nil {
			return r, fmt.Errorf("%w: rootfs tar: %v", types.ErrInvalid, err)
		}
		r.Source, r.SHA256 = "tar:"+o.FromTar, sum
	case o.FromDir != "":
		if fi, err := os.Stat(o.FromDir); err != nil || !fi.IsDir() {
			return r, fmt.Errorf("%w: rootfs directory %s is not a directory", types.ErrInvalid, o.FromDir)
		}
		sum, err := HashTree(o.FromDir)
		if err != nil {
			return r, err
		}
		r.Source, r.SHA256 = "dir:"+o.FromDir, sum
	default:
		r.Source = fmt.Sprintf("debootstrap %s %s", o.Suite, debootstrapVariant)
		r.SHA256 = o.baseKey()
	}
	return r, nil
}

// baseKey identifies a debootstrap tree: suite, variant, mirror and the
// packages added (none).
func (o *Options) baseKey() string {
	s := sha256.Sum256([]byte(fmt.Sprintf("debootstrap suite=%s variant=%s mirror=%s include=", o.Suite, debootstrapVariant, o.Mirror)))
	return hex.EncodeToString(s[:])
}

// imageID hashes every input of an image.
func imageID(debSum, agentSum string, r RootfsInfo, sizeMB int) string {
	s := sha256.Sum256([]byte(fmt.Sprintf("aetherium-image format=%d\nkernel-deb=%s\nagent=%s\nrootfs=%s\nrootfs-size-mb=%d\nmodules=%s\n",
		FormatVersion, debSum, agentSum, r.SHA256, sizeMB, strings.Join(GuestModules, ","))))
	return hex.EncodeToString(s[:])[:16]
}

// buildKernel writes vmlinuz, vmlinux and the initramfs into m.Dir.
func (o *Options) buildKernel(ctx context.Context, m *Manifest, deb, work string) error {
	if err := os.MkdirAll(work, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(work)
	k, err := unpackKernel(ctx, deb, work)
	if err != nil {
		return err
	}
	m.Kernel.Package, m.Kernel.Version, m.Kernel.Release = k.Package, k.Version, k.Release
	bz, err := os.ReadFile(k.Vmlinuz)
	if err != nil {
		return fmt.Errorf("reading the kernel: %w", err)
	}
	if err := os.WriteFile(m.Path(FileVmlinuz), bz, 0o644); err != nil {
		return fmt.Errorf("writing vmlinuz: %w", err)
	}
	elfKernel, comp, err := ExtractVmlinux(bz)
	if err != nil {
		return fmt.Errorf("extracting vmlinux from %s: %w", k.Package, err)
	}
	m.Kernel.Compression = comp
	if m.Kernel.PVH, err = HasPVHNote(elfKernel); err != nil {
		return err
	}
	if err := os.WriteFile(m.Path(FileVmlinux), elfKernel, 0o644); err != nil {
		return fmt.Errorf("writing vmlinux: %w", err)
	}

	read, err := ModuleReader(k.Modules)
	if err != nil {
		return err
	}
	mods, err := OrderModules(GuestModules, read)
	if err != nil {
		return fmt.Errorf("choosing the initramfs modules of %s: %w", k.Package, err)
	}
	agent, err := os.ReadFile(o.AgentPath)
	if err != nil {
		return fmt.Errorf("reading fc-agent: %w", err)
	}
	if m.Agent.Version, err = agentVersion(ctx, o.AgentPath); err != nil {
		return err
	}
	entries := []CpioEntry{
		{Name: "init", Mode: 0o755, Data: agent},
		{Name: "dev/console", Mode: fs.ModeDevice | fs.ModeCharDevice | 0o600, Major: 5, Minor: 1},
		{Name: "dev/null", Mode: fs.ModeDevice | fs.ModeCharDevice | 0o666, Major: 1, Minor: 3},
	}
	for _, d := range []string{"dev", "proc", "sys", "run", "tmp", "mnt", "mnt/root", "etc", "etc/aetherium", "lib", "lib/modules"} {
		entries = append(entries, CpioEntry{Name: d, Mode: fs.ModeDir | 0o755})
	}
	var order strings.Builder
	for _, mod := range mods {
		b, err := moduleFile(mod)
		if err != nil {
			return err
		}
		file := mod.Name + ".ko"
		entries = append(entries, CpioEntry{Name: "lib/modules/" + file, Mode: 0o644, Data: b})
		fmt.Fprintln(&order, file)
		s := sha256.Sum256(b)
		m.Modules = append(m.Modules, ModuleInfo{Name: mod.Name, SHA256: hex.EncodeToString(s[:])})
	}
	entries = append(entries, CpioEntry{Name: "etc/aetherium/modules.order", Mode: 0o644, Data: []byte(order.String())})
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if err := WriteCpio(zw, entries); err != nil {
		return fmt.Errorf("writing the initramfs: %w", err)
	}
	if err := zw.Close(); err != nil {
		return err
	}
	if err := os.WriteFile(m.Path(FileInitramfs), buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("writing the initramfs: %w", err)
	}
	return nil
}

// agentVersion runs `fc-agent --version`, which also checks that the
// binary runs on this architecture.
func agentVersion(ctx context.Context, agent string) (string, error) {
	out, err := run(ctx, "", agent, "--version")
	if err != nil {
		return "", fmt.Errorf("%w: fc-agent %s does not run: %v; build it with `make build`", types.ErrInvalid, agent, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// buildRootfs makes the root tree in work, adds fc-agent, and writes
// rootfs.tar and rootfs.ext4 into m.Dir.
func (o *Options) buildRootfs(ctx context.Context, m *Manifest, work string) error {
	if err := os.Mkdir(work, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(work)
	switch {
	case o.FromTar != "":
		if err := extractTarFile(o.FromTar, work); err != nil {
			return fmt.Errorf("unpacking the rootfs tar %s: %w", o.FromTar, err)
		}
	case o.FromDir != "":
		// cp -a keeps owners, modes, links, device nodes and xattrs.
		if _, err := run(ctx, "", "cp", "-a", "--", o.FromDir+"/.", work); err != nil {
			return fmt.Errorf("copying the rootfs directory: %w", err)
		}
	default:
		if err := o.debootstrapTree(ctx, work); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := installAgent(work, o.AgentPath); err != nil {
		return err
	}
	f, err := os.Create(m.Path(FileRootfsTar))
	if err != nil {
		return err
	}
	err = WriteTar(f, work)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return mkfsExt4(ctx, work, m.Path(FileRootfs), o.RootfsSizeMB, m.ID)
}

func extractTarFile(file, dir string) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	return ExtractTar(f, dir)
}

// debootstrapTree fills work with a debootstrap tree. The tree is cached
// as <cache>/bases/<key>.tar, so a new fc-agent does not mean a new
// debootstrap run.
func (o *Options) debootstrapTree(ctx context.Context, work string) error {
	bases := filepath.Join(o.CacheDir, "bases")
	if err := os.MkdirAll(bases, 0o755); err != nil {
		return fmt.Errorf("making %s: %w", bases, err)
	}
	key := o.baseKey()[:16]
	base := filepath.Join(bases, key+".tar")
	unlock, err := lockFile(ctx, filepath.Join(bases, ".lock-"+key))
	if err != nil {
		return err
	}
	defer unlock()
	if _, err := os.Stat(base); err == nil {
		o.Logger.Info("using the cached debootstrap tree", "base", base)
		return extractTarFile(base, work)
	}
	if err := debootstrap(ctx, o.Suite, o.Mirror, work, func(msg string, args ...any) { o.Logger.Info(msg, args...) }); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(bases, ".base-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	err = WriteTar(tmp, work)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("caching the debootstrap tree: %w", err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), base); err != nil {
		return fmt.Errorf("caching the debootstrap tree: %w", err)
	}
	return nil
}

// lockFile takes an exclusive flock on path, waiting until ctx ends, and
// returns the function that releases it.
func lockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening the lock %s: %w", path, err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for another image build (lock %s): %w", path, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
