package image

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Names of the files in an image directory.
const (
	FileVmlinuz   = "vmlinuz"           // bzImage, for QEMU
	FileVmlinux   = "vmlinux"           // uncompressed ELF, for Firecracker
	FileInitramfs = "initramfs.cpio.gz" // fc-agent as /init plus modules
	FileRootfs    = "rootfs.ext4"       // the root file system
	FileRootfsTar = "rootfs.tar"        // the same tree, for docker import
	FileManifest  = "manifest.json"
)

// outputFiles are the files every image directory holds besides the manifest.
var outputFiles = []string{FileVmlinuz, FileVmlinux, FileInitramfs, FileRootfs, FileRootfsTar}

// Manifest describes one built image. It is stored as manifest.json in the
// image directory.
type Manifest struct {
	// Format is the builder's format version (FormatVersion when built).
	Format int `json:"format"`
	// ID is the first 16 hex digits of a sha256 over every input.
	ID string `json:"id"`
	// Created is when the image was built.
	Created time.Time `json:"created"`
	// Kernel describes the kernel files.
	Kernel KernelInfo `json:"kernel"`
	// Modules are the kernel modules in the initramfs, in load order.
	Modules []ModuleInfo `json:"modules"`
	// Agent describes the fc-agent binary in the initramfs and the rootfs.
	Agent AgentInfo `json:"agent"`
	// Rootfs describes the root file system.
	Rootfs RootfsInfo `json:"rootfs"`
	// Files maps each output file's name to its sha256.
	Files map[string]string `json:"files"`
	// Sizes maps each output file's name to its size in bytes.
	Sizes map[string]int64 `json:"sizes"`

	// Dir is the image directory; set by Load, not stored.
	Dir string `json:"-"`
}

// KernelInfo describes the kernel an image boots.
type KernelInfo struct {
	Package     string `json:"package"`     // e.g. linux-image-6.1.0-56-cloud-amd64
	Version     string `json:"version"`     // the package version, e.g. 6.1.192-2
	Release     string `json:"release"`     // uname -r, e.g. 6.1.0-56-cloud-amd64
	DebSHA256   string `json:"deb_sha256"`  // the .deb it came from
	Vmlinuz     string `json:"vmlinuz"`     // sha256 of vmlinuz
	Vmlinux     string `json:"vmlinux"`     // sha256 of vmlinux
	PVH         bool   `json:"pvh"`         // vmlinux has the Xen PVH entry note
	Compression string `json:"compression"` // of the bzImage payload: lz4, gzip
}

// ModuleInfo is one kernel module of the initramfs.
type ModuleInfo struct {
	Name   string `json:"name"`
	SHA256 string `json:"sha256"`
}

// AgentInfo describes fc-agent.
type AgentInfo struct {
	Version string `json:"version"` // what `fc-agent --version` printed
	SHA256  string `json:"sha256"`
}

// RootfsInfo describes the root file system's source.
type RootfsInfo struct {
	// Source is "debootstrap SUITE minbase", "tar:PATH" or "dir:PATH".
	Source string `json:"source"`
	// SizeMB is the ext4 image's size in MiB.
	SizeMB int `json:"size_mb"`
	// SHA256 identifies the source: the tar's hash, the directory's
	// HashTree, or for debootstrap a hash of suite, variant and mirror.
	SHA256 string `json:"sha256"`
}

// Path returns the absolute path of a file in the image directory.
func (m *Manifest) Path(name string) string { return filepath.Join(m.Dir, name) }

// KernelPath is the bzImage, for QEMU's -kernel.
func (m *Manifest) KernelPath() string { return m.Path(FileVmlinuz) }

// VmlinuxPath is the uncompressed ELF kernel, for Firecracker.
func (m *Manifest) VmlinuxPath() string { return m.Path(FileVmlinux) }

// InitrdPath is the gzipped newc initramfs.
func (m *Manifest) InitrdPath() string { return m.Path(FileInitramfs) }

// RootfsPath is the ext4 root file system. It is shared by every VM of this
// image: copy it before writing to it.
func (m *Manifest) RootfsPath() string { return m.Path(FileRootfs) }

// RootfsTarPath is the root tree as an uncompressed tar, for docker import.
func (m *Manifest) RootfsTarPath() string { return m.Path(FileRootfsTar) }

// Load reads the manifest of the image in dir.
func Load(dir string) (*Manifest, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("image directory %s: %w", dir, err)
	}
	b, err := os.ReadFile(filepath.Join(abs, FileManifest))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: no image in %s (no %s); run `aether-cli image build` or `make guest-image`", types.ErrNotFound, abs, FileManifest)
	}
	if err != nil {
		return nil, fmt.Errorf("reading the image manifest: %w", err)
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%w: image manifest %s: %v; delete the directory and rebuild", types.ErrInvalid, filepath.Join(abs, FileManifest), err)
	}
	m.Dir = abs
	return &m, nil
}

// List returns the images in cacheDir, newest first. Unreadable image
// directories are skipped.
func List(cacheDir string) ([]*Manifest, error) {
	dir := filepath.Join(cmp.Or(cacheDir, DefaultCacheDir()), "images")
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("listing images: %w", err)
	}
	var out []*Manifest
	for _, e := range ents {
		if !e.IsDir() || !idRe.MatchString(e.Name()) {
			continue
		}
		if m, err := Load(filepath.Join(dir, e.Name())); err == nil {
			out = append(out, m)
		}
	}
	slices.SortFunc(out, func(a, b *Manifest) int { return b.Created.Compare(a.Created) })
	return out, nil
}

// Latest returns the most recently built image in cacheDir ("" for the
// default). It wraps types.ErrNotFound when there is none.
func Latest(cacheDir string) (*Manifest, error) {
	ms, err := List(cacheDir)
	if err != nil {
		return nil, err
	}
	if len(ms) == 0 {
		return nil, fmt.Errorf("%w: no guest image in %s; run `aether-cli image build` or `make guest-image`", types.ErrNotFound, cmp.Or(cacheDir, DefaultCacheDir()))
	}
	return ms[0], nil
}

// Find returns the image whose id starts with prefix in cacheDir.
func Find(cacheDir, prefix string) (*Manifest, error) {
	ms, err := List(cacheDir)
	if err != nil {
		return nil, err
	}
	var found []*Manifest
	for _, m := range ms {
		if len(prefix) > 0 && len(prefix) <= len(m.ID) && m.ID[:len(prefix)] == prefix {
			found = append(found, m)
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("%w: no guest image %q in %s; see `aether-cli image list`", types.ErrNotFound, prefix, cmp.Or(cacheDir, DefaultCacheDir()))
	case 1:
		return found[0], nil
	}
	return nil, fmt.Errorf("%w: %q names %d images; give more of the id", types.ErrInvalid, prefix, len(found))
}

// cheapHashLimit is the size up to which Verify hashes a file; larger ones
// are only checked for size unless the check is full.
const cheapHashLimit = 64 << 20

// Verify checks that every file of the image exists with the size the
// manifest records, and hashes the files small enough to be cheap (the
// kernels and the initramfs). VerifyFull hashes everything.
func Verify(m *Manifest) error { return verify(m, false) }

// VerifyFull is Verify that also hashes the rootfs files.
func VerifyFull(m *Manifest) error { return verify(m, true) }

func verify(m *Manifest, full bool) error {
	if m.Format != FormatVersion {
		return fmt.Errorf("%w: image %s has format %d, this builder writes %d; rebuild it", types.ErrInvalid, m.ID, m.Format, FormatVersion)
	}
	for _, name := range outputFiles {
		want, ok := m.Files[name]
		if !ok {
			return fmt.Errorf("%w: image %s lists no %s; rebuild it", types.ErrInvalid, m.ID, name)
		}
		p := m.Path(name)
		fi, err := os.Stat(p)
		if err != nil {
			return fmt.Errorf("%w: image %s: %v; rebuild it", types.ErrInvalid, m.ID, err)
		}
		if fi.Size() != m.Sizes[name] {
			return fmt.Errorf("%w: image file %s is %d bytes, the manifest says %d; rebuild it", types.ErrInvalid, p, fi.Size(), m.Sizes[name])
		}
		if !full && fi.Size() > cheapHashLimit {
			continue
		}
		got, _, err := hashFile(p)
		if err != nil {
			return err
		}
		if got != want {
			return fmt.Errorf("%w: image file %s has sha256 %s, the manifest says %s; it was modified: rebuild it", types.ErrInvalid, p, got, want)
		}
	}
	return nil
}
