package image

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/pierrec/lz4/v4"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// KernelMetaPackage is Debian's package that always depends on the current
// cloud kernel; the versioned package it names is resolved at build time.
const KernelMetaPackage = "linux-image-cloud-amd64"

var debName = regexp.MustCompile(`^[a-z0-9][a-z0-9+.-]+$`)

// resolveKernelPackage asks apt which versioned kernel package, at which
// version, the meta package currently depends on. The meta package pins
// it with "(= VERSION)", so one apt-cache call answers both.
func resolveKernelPackage(ctx context.Context) (pkg, ver, arch string, err error) {
	out, err := run(ctx, "", "apt-cache", "show", "--no-all-versions", KernelMetaPackage)
	if err != nil {
		return "", "", "", fmt.Errorf("%w: asking apt about %s: %v; run `apt-get update`", types.ErrUnavailable, KernelMetaPackage, err)
	}
	fields := debFields(out)
	arch = fields["Architecture"]
	for _, dep := range strings.Split(fields["Depends"], ",") {
		name, rest, _ := strings.Cut(strings.TrimSpace(dep), " ")
		if !strings.HasPrefix(name, "linux-image-") || !debName.MatchString(name) {
			continue
		}
		if v, ok := strings.CutPrefix(strings.Trim(strings.TrimSpace(rest), "()"), "= "); ok && arch != "" {
			return name, strings.TrimSpace(v), arch, nil
		}
		// Not pinned: ask for the package's own candidate version.
		out, err := run(ctx, "", "apt-cache", "show", "--no-all-versions", name)
		if err != nil {
			return "", "", "", fmt.Errorf("%w: asking apt about %s: %v; run `apt-get update`", types.ErrUnavailable, name, err)
		}
		f := debFields(out)
		if f["Version"] == "" || f["Architecture"] == "" {
			break
		}
		return name, f["Version"], f["Architecture"], nil
	}
	return "", "", "", fmt.Errorf("%w: apt knows no kernel package that %s depends on; run `apt-get update`", types.ErrUnavailable, KernelMetaPackage)
}

// fetchKernelDeb returns the path of the current cloud kernel's .deb in
// debDir, downloading it with apt-get unless it is there already.
func fetchKernelDeb(ctx context.Context, debDir string) (string, error) {
	pkg, ver, arch, err := resolveKernelPackage(ctx)
	if err != nil {
		return "", err
	}
	// apt-get download names files <pkg>_<version with ':' as %3a>_<arch>.deb.
	file := filepath.Join(debDir, fmt.Sprintf("%s_%s_%s.deb", pkg, strings.ReplaceAll(ver, ":", "%3a"), arch))
	if _, err := os.Stat(file); err == nil {
		return file, nil
	}
	if err := os.MkdirAll(debDir, 0o755); err != nil {
		return "", fmt.Errorf("making the package cache %s: %w", debDir, err)
	}
	unlock, err := lockFile(ctx, filepath.Join(debDir, ".lock"))
	if err != nil {
		return "", err
	}
	defer unlock()
	if _, err := os.Stat(file); err == nil {
		return file, nil // another build fetched it while we waited
	}
	// Download into a private directory and rename, so a half-written .deb
	// is never mistaken for a complete one.
	tmp, err := os.MkdirTemp(debDir, ".download-")
	if err != nil {
		return "", fmt.Errorf("making a download directory in %s: %w", debDir, err)
	}
	defer os.RemoveAll(tmp)
	if _, err := run(ctx, tmp, "apt-get", "download", "-q", pkg+"="+ver); err != nil {
		return "", fmt.Errorf("%w: downloading %s=%s: %v; check the apt sources and run `apt-get update`", types.ErrUnavailable, pkg, ver, err)
	}
	got, _ := filepath.Glob(filepath.Join(tmp, pkg+"_*.deb"))
	if len(got) != 1 {
		return "", fmt.Errorf("apt-get download %s left %d .deb files, want 1", pkg, len(got))
	}
	if err := os.Rename(got[0], file); err != nil {
		return "", fmt.Errorf("storing %s: %w", file, err)
	}
	return file, nil
}

// debFields parses "Key: value" lines of apt-cache show or dpkg-deb -f.
func debFields(out []byte) map[string]string {
	m := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ": "); ok && !strings.HasPrefix(k, " ") {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}

// kernelTree is an unpacked kernel package.
type kernelTree struct {
	Package, Version, Release string
	Vmlinuz                   string // the bzImage
	Config                    string // its build configuration
	Modules                   string // lib/modules/<release>
}

// unpackKernel unpacks deb into dir with dpkg -x and finds its parts.
func unpackKernel(ctx context.Context, deb, dir string) (*kernelTree, error) {
	out, err := run(ctx, "", "dpkg-deb", "-f", deb, "Package", "Version")
	if err != nil {
		return nil, fmt.Errorf("%w: reading %s: %v; is it a Debian package?", types.ErrInvalid, deb, err)
	}
	f := debFields(out)
	if _, err := run(ctx, "", "dpkg-deb", "-x", deb, dir); err != nil {
		return nil, fmt.Errorf("unpacking %s: %w", deb, err)
	}
	k := &kernelTree{Package: f["Package"], Version: f["Version"]}
	images, _ := filepath.Glob(filepath.Join(dir, "boot", "vmlinuz-*"))
	if len(images) != 1 {
		return nil, fmt.Errorf("%w: %s holds %d kernels under /boot, want 1", types.ErrInvalid, deb, len(images))
	}
	k.Vmlinuz = images[0]
	k.Release = strings.TrimPrefix(filepath.Base(images[0]), "vmlinuz-")
	k.Config = filepath.Join(dir, "boot", "config-"+k.Release)
	k.Modules = filepath.Join(dir, "lib", "modules", k.Release)
	if _, err := os.Stat(k.Modules); err != nil {
		return nil, fmt.Errorf("%w: %s has no modules for %s: %v", types.ErrInvalid, deb, k.Release, err)
	}
	return k, nil
}

// Compression names for Manifest.Kernel.Compression.
const (
	CompressionGzip = "gzip"
	CompressionLZ4  = "lz4"
)

// ExtractVmlinux returns the uncompressed ELF kernel inside a bzImage and
// the compression its payload used. It reads the payload's place from the
// x86 boot protocol header (payload_offset/payload_length, protocol 2.08+)
// rather than scanning for magic numbers, and supports the compressions
// Debian's kernels use: LZ4 (cloud) and gzip.
func ExtractVmlinux(bz []byte) ([]byte, string, error) {
	if len(bz) < 0x250 || string(bz[0x202:0x206]) != "HdrS" {
		return nil, "", fmt.Errorf("%w: not an x86 bzImage (no HdrS boot header)", types.ErrInvalid)
	}
	if v := binary.LittleEndian.Uint16(bz[0x206:]); v < 0x208 {
		return nil, "", fmt.Errorf("%w: bzImage boot protocol %#x is older than 2.08 and has no payload fields", types.ErrInvalid, v)
	}
	setupSects := int(bz[0x1f1])
	if setupSects == 0 {
		setupSects = 4
	}
	start := (setupSects + 1) * 512
	off := start + int(binary.LittleEndian.Uint32(bz[0x248:]))
	n := int(binary.LittleEndian.Uint32(bz[0x24c:]))
	// The payload ends with its uncompressed size, which the build
	// appends after compressing (mkpiggy counts it in z_input_len).
	if off < start || n <= 4 || off+n > len(bz) {
		return nil, "", fmt.Errorf("%w: bzImage payload [%d,+%d) lies outside the %d-byte file", types.ErrInvalid, off, n, len(bz))
	}
	payload := bz[off : off+n-4]
	size := int(binary.LittleEndian.Uint32(bz[off+n-4:]))
	var (
		out  []byte
		comp string
		err  error
	)
	switch {
	case bytes.HasPrefix(payload, []byte{0x1f, 0x8b}):
		comp = CompressionGzip
		var zr *gzip.Reader
		if zr, err = gzip.NewReader(bytes.NewReader(payload)); err == nil {
			out, err = io.ReadAll(zr)
		}
	case bytes.HasPrefix(payload, []byte{0x02, 0x21, 0x4c, 0x18}):
		comp = CompressionLZ4
		out, err = unlz4Legacy(payload, size)
	default:
		return nil, "", fmt.Errorf("%w: bzImage payload compression with magic % x is not supported (gzip and lz4 are)", types.ErrNotSupported, payload[:min(4, len(payload))])
	}
	if err != nil {
		return nil, comp, fmt.Errorf("decompressing the %s kernel payload: %w", comp, err)
	}
	if len(out) != size {
		return nil, comp, fmt.Errorf("%w: kernel payload decompressed to %d bytes, its header says %d", types.ErrInvalid, len(out), size)
	}
	if _, err := elf.NewFile(bytes.NewReader(out)); err != nil {
		return nil, comp, fmt.Errorf("%w: the decompressed kernel is not an ELF file: %v", types.ErrInvalid, err)
	}
	return out, comp, nil
}

// unlz4Legacy decodes LZ4's legacy frame format, which the kernel's
// decompressor uses: a magic number, then blocks of up to 8 MiB, each
// preceded by its compressed length. lz4.Reader does not read this format,
// so the framing is done here and the blocks by the library.
func unlz4Legacy(in []byte, size int) ([]byte, error) {
	const magic, maxBlock = 0x184c2102, 8 << 20
	out := make([]byte, 0, size)
	buf := make([]byte, maxBlock)
	p := 4
	for p+4 <= len(in) {
		n := int(binary.LittleEndian.Uint32(in[p:]))
		p += 4
		if n == magic { // concatenated streams
			continue
		}
		if n <= 0 || p+n > len(in) {
			return nil, fmt.Errorf("lz4 block of %d bytes at offset %d runs past the end", n, p-4)
		}
		m, err := lz4.UncompressBlock(in[p:p+n], buf)
		if err != nil {
			return nil, fmt.Errorf("lz4 block at offset %d: %w", p-4, err)
		}
		out = append(out, buf[:m]...)
		p += n
	}
	return out, nil
}

// HasPVHNote reports whether the ELF kernel carries the Xen PVH entry point
// note (XEN_ELFNOTE_PHYS32_ENTRY), which Firecracker needs to boot it.
func HasPVHNote(vmlinux []byte) (bool, error) {
	f, err := elf.NewFile(bytes.NewReader(vmlinux))
	if err != nil {
		return false, fmt.Errorf("%w: not an ELF kernel: %v", types.ErrInvalid, err)
	}
	const xenElfnotePhys32Entry = 18
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		data, err := io.ReadAll(p.Open())
		if err != nil {
			return false, fmt.Errorf("reading ELF notes: %w", err)
		}
		for len(data) >= 12 {
			nameSz := int(f.ByteOrder.Uint32(data))
			descSz := int(f.ByteOrder.Uint32(data[4:]))
			typ := f.ByteOrder.Uint32(data[8:])
			nameEnd := 12 + align4(nameSz)
			if nameEnd > len(data) {
				break
			}
			name := strings.TrimRight(string(data[12:12+nameSz]), "\x00")
			if name == "Xen" && typ == xenElfnotePhys32Entry {
				return true, nil
			}
			next := nameEnd + align4(descSz)
			if next > len(data) {
				break
			}
			data = data[next:]
		}
	}
	return false, nil
}

func align4(n int) int { return (n + 3) &^ 3 }

// run runs a command with an argument list and returns its stdout; the
// error carries its stderr.
func run(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 2000 {
			msg = "..." + msg[len(msg)-2000:]
		}
		var ee *exec.Error
		if errors.As(err, &ee) {
			return out, fmt.Errorf("%s is not installed (%w); run ./scripts/setup.sh", name, err)
		}
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, msg)
	}
	return out, nil
}
