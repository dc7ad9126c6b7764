package docker

import (
	"archive/tar"
	"bufio"
	"bytes"
	"cmp"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"strings"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/docker/docker/api/types/image"
	"github.com/docker/docker/client"

	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Paths inside the guest's file system.
const (
	// GuestAgentPath is where the image holds the guest agent.
	GuestAgentPath = "/usr/local/bin/fc-agent"
	// GuestRunDir is the directory bind-mounted from the host that holds the
	// agent's socket.
	GuestRunDir  = "/run/aetherium"
	guestBusybox = "/bin/busybox"
	guestPath    = bootparams.DefaultPath
)

// BaseImageRepo is the repository of the images this package builds; the
// tag is a hash of their content, so equal inputs give the same image.
const BaseImageRepo = "aetherium/base"

// imageFormat is part of the content hash; bump it when the layout of the
// generated file system changes without its inputs changing.
const imageFormat = "aetherium-base-v1"

// BaseImage says what the image VMs boot from is made of.
type BaseImage struct {
	// AgentPath is the fc-agent binary on the host; it is put at
	// GuestAgentPath. Required.
	AgentPath string
	// BusyboxPath is a statically linked busybox on the host (Debian's
	// busybox-static), installed with a symlink per applet. Used only when
	// RootfsTar is empty.
	BusyboxPath string
	// RootfsTar is an optional root file system tarball (.tar or .tar.gz,
	// e.g. from debootstrap) to use instead of busybox. The agent and the
	// run directory are added to it.
	RootfsTar string
}

// EnsureImage imports the image b describes unless an image with the same
// content tag exists already, and returns its reference. imported reports
// whether it had to be imported. Calling it again with the same inputs is a
// cheap no-op.
func EnsureImage(ctx context.Context, api client.ImageAPIClient, b BaseImage) (ref string, imported bool, err error) {
	files, err := b.files()
	if err != nil {
		return "", false, err
	}
	h := sha256.New()
	io.WriteString(h, imageFormat+"\n")
	if b.RootfsTar != "" {
		if err := hashFile(h, b.RootfsTar); err != nil {
			return "", false, fmt.Errorf("reading rootfs tarball: %w", err)
		}
	}
	h.Write(files)
	tag := hex.EncodeToString(h.Sum(nil))[:16]
	ref = BaseImageRepo + ":" + tag

	if _, err := api.ImageInspect(ctx, ref); err == nil {
		return ref, false, nil
	} else if !cerrdefs.IsNotFound(err) {
		return "", false, fmt.Errorf("inspecting image %s: %w", ref, mapErr(err))
	}

	src, err := b.rootfs(files)
	if err != nil {
		return "", false, err
	}
	defer src.Close()
	if err := ImportImage(ctx, api, src, BaseImageRepo, tag); err != nil {
		return "", false, err
	}
	return ref, true, nil
}

// ImportImage imports a root file system tarball as the image repo:tag
// through the Engine API (what `docker import` does), with PATH set.
func ImportImage(ctx context.Context, api client.ImageAPIClient, rootfs io.Reader, repo, tag string) error {
	rc, err := api.ImageImport(ctx, image.ImportSource{Source: rootfs, SourceName: "-"}, repo, image.ImportOptions{
		Tag:     tag,
		Message: "built by aetherium",
		Changes: []string{"ENV PATH=" + guestPath, "WORKDIR /"},
	})
	if err != nil {
		return fmt.Errorf("importing image %s:%s: %w", repo, tag, mapErr(err))
	}
	defer rc.Close()
	// The engine reports failures inside the progress stream.
	dec := json.NewDecoder(rc)
	for {
		var msg struct {
			Error string `json:"error"`
		}
		if err := dec.Decode(&msg); errors.Is(err, io.EOF) {
			return nil
		} else if err != nil {
			return fmt.Errorf("importing image %s:%s: reading the engine's answer: %w", repo, tag, err)
		}
		if msg.Error != "" {
			return fmt.Errorf("importing image %s:%s: %s", repo, tag, msg.Error)
		}
	}
}

// tarFile is one entry of the generated part of the file system.
type tarFile struct {
	hdr  tar.Header
	body []byte
}

// files returns the generated part of the file system as a tar stream
// without its end marker, so it can follow another archive's entries.
func (b BaseImage) files() ([]byte, error) {
	if b.AgentPath == "" {
		return nil, fmt.Errorf("%w: no guest agent binary given; build it with `make build` and set its path", types.ErrInvalid)
	}
	agentBin, err := os.ReadFile(b.AgentPath)
	if err != nil {
		return nil, fmt.Errorf("%w: reading the guest agent: %v", types.ErrInvalid, err)
	}
	var entries []tarFile
	dir := func(p string, mode int64) {
		entries = append(entries, tarFile{hdr: tar.Header{Typeflag: tar.TypeDir, Name: p + "/", Mode: mode}})
	}
	file := func(p string, mode int64, body []byte) {
		entries = append(entries, tarFile{hdr: tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: mode, Size: int64(len(body))}, body: body})
	}

	if b.RootfsTar == "" {
		busybox := cmp.Or(b.BusyboxPath, DefaultBusyboxPath)
		if err := checkStatic(busybox, "busybox", "install Debian's busybox-static"); err != nil {
			return nil, err
		}
		if err := checkStatic(b.AgentPath, "the guest agent", "build it with CGO_ENABLED=0"); err != nil {
			return nil, err
		}
		bb, err := os.ReadFile(busybox)
		if err != nil {
			return nil, fmt.Errorf("%w: reading busybox: %v", types.ErrInvalid, err)
		}
		applets, err := busyboxApplets(busybox)
		if err != nil {
			return nil, err
		}
		for _, d := range []string{"bin", "sbin", "usr", "usr/bin", "usr/sbin", "usr/local", "usr/local/bin", "etc", "dev", "proc", "sys", "var", "home"} {
			dir(d, 0o755)
		}
		dir("root", 0o700)
		dir("tmp", 0o1777)
		dir("var/tmp", 0o1777)
		file("bin/busybox", 0o755, bb)
		for _, a := range applets {
			entries = append(entries, tarFile{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: a, Linkname: guestBusybox, Mode: 0o777}})
		}
		file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"))
		file("etc/group", 0o644, []byte("root:x:0:\nnogroup:x:65534:\n"))
	} else {
		dir("usr/local/bin", 0o755)
	}
	dir("run", 0o755)
	dir(strings.TrimPrefix(GuestRunDir, "/"), 0o700)
	file(strings.TrimPrefix(GuestAgentPath, "/"), 0o755, agentBin)

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	epoch := time.Unix(0, 0)
	for _, e := range entries {
		e.hdr.ModTime = epoch
		e.hdr.Format = tar.FormatPAX
		if err := tw.WriteHeader(&e.hdr); err != nil {
			return nil, fmt.Errorf("writing image tar: %w", err)
		}
		if _, err := tw.Write(e.body); err != nil {
			return nil, fmt.Errorf("writing image tar: %w", err)
		}
	}
	if err := tw.Flush(); err != nil {
		return nil, fmt.Errorf("writing image tar: %w", err)
	}
	return buf.Bytes(), nil
}

// rootfs returns the whole file system as one tar stream: the entries of
// RootfsTar, if any, followed by the generated files (later entries win).
func (b BaseImage) rootfs(files []byte) (io.ReadCloser, error) {
	var end bytes.Buffer
	tar.NewWriter(&end).Close() // the two zero blocks that end an archive
	if b.RootfsTar == "" {
		return io.NopCloser(io.MultiReader(bytes.NewReader(files), &end)), nil
	}
	f, err := os.Open(b.RootfsTar)
	if err != nil {
		return nil, fmt.Errorf("%w: opening rootfs tarball: %v", types.ErrInvalid, err)
	}
	pr, pw := io.Pipe()
	go func() {
		defer f.Close()
		pw.CloseWithError(copyTar(pw, f, files))
	}()
	return pr, nil
}

// copyTar re-encodes the archive in r (gzip or plain) into w, drops its
// end marker and appends extra, a tar stream without end marker.
func copyTar(w io.Writer, r io.Reader, extra []byte) error {
	br := bufio.NewReader(r)
	if magic, _ := br.Peek(2); len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b {
		zr, err := gzip.NewReader(br)
		if err != nil {
			return fmt.Errorf("reading rootfs tarball: %w", err)
		}
		defer zr.Close()
		r = zr
	} else {
		r = br
	}
	// The engine refuses an archive that names a path twice, so the
	// tarball's own entries for what extra provides are left out.
	replaced := map[string]bool{}
	er := tar.NewReader(bytes.NewReader(extra))
	for {
		hdr, err := er.Next()
		if err != nil {
			break
		}
		replaced[tarName(hdr.Name)] = true
	}
	tr := tar.NewReader(r)
	tw := tar.NewWriter(w)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("reading rootfs tarball: %w", err)
		}
		if replaced[tarName(hdr.Name)] {
			continue
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("copying rootfs tarball: %w", err)
		}
		if _, err := io.Copy(tw, tr); err != nil {
			return fmt.Errorf("copying rootfs tarball: %w", err)
		}
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("copying rootfs tarball: %w", err)
	}
	if _, err := w.Write(extra); err != nil {
		return err
	}
	return tar.NewWriter(w).Close()
}

// tarName normalises an archive path: "./usr/bin/" and "usr/bin" are one.
func tarName(name string) string {
	return strings.Trim(strings.TrimPrefix(name, "./"), "/")
}

// busyboxApplets asks busybox for its applets' install paths, relative to
// the root (e.g. "bin/sh").
func busyboxApplets(busybox string) ([]string, error) {
	out, err := exec.Command(busybox, "--list-full").Output()
	if err != nil {
		return nil, fmt.Errorf("%w: listing busybox applets with %s --list-full: %v", types.ErrInvalid, busybox, err)
	}
	var applets []string
	for _, l := range strings.Split(string(out), "\n") {
		l = path.Clean(strings.TrimSpace(l))
		if l == "." || l == "bin/busybox" || strings.HasPrefix(l, "..") || strings.HasPrefix(l, "/") {
			continue
		}
		applets = append(applets, l)
	}
	if len(applets) == 0 {
		return nil, fmt.Errorf("%w: %s --list-full listed no applets", types.ErrInvalid, busybox)
	}
	return applets, nil
}

// checkStatic makes sure a binary runs in a file system without a dynamic
// loader or libc.
func checkStatic(p, what, fix string) error {
	f, err := elf.Open(p)
	if err != nil {
		return fmt.Errorf("%w: %s at %s is not a usable ELF binary: %v; %s", types.ErrInvalid, what, p, err, fix)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return fmt.Errorf("%w: %s at %s is dynamically linked and cannot run in the minimal image; %s", types.ErrInvalid, what, p, fix)
		}
	}
	return nil
}

func hashFile(w io.Writer, p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(w, f)
	return err
}
