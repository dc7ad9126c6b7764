package image

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// AgentGuestPath is where the rootfs carries fc-agent.
const AgentGuestPath = "/usr/local/bin/fc-agent"

// GuestHostname is written to the rootfs's /etc/hostname.
const GuestHostname = "aetherium"

// Sources files whose first deb URI is the default debootstrap mirror.
var sourcesFiles = []string{"/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"}

// DefaultMirror returns the first Debian archive URI of this machine's apt
// sources, so no mirror host is written into the repository.
func DefaultMirror() (string, error) {
	for _, f := range sourcesFiles {
		if m := mirrorFrom(f); m != "" {
			return m, nil
		}
	}
	return "", fmt.Errorf("%w: no Debian mirror found in %s; pass Options.Mirror", types.ErrUnavailable, strings.Join(sourcesFiles, " or "))
}

func mirrorFrom(file string) string {
	f, err := os.Open(file)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		var uri string
		if v, ok := strings.CutPrefix(line, "URIs:"); ok { // deb822
			if fs := strings.Fields(v); len(fs) > 0 {
				uri = fs[0]
			}
		} else if fs := strings.Fields(line); len(fs) >= 3 && fs[0] == "deb" { // one-line
			for _, f := range fs[1:] {
				if !strings.HasPrefix(f, "[") && !strings.HasSuffix(f, "]") {
					uri = f
					break
				}
			}
		}
		// Skip the security archive: debootstrap needs the main one.
		if uri != "" && !strings.Contains(uri, "security") {
			return uri
		}
	}
	return ""
}

var suiteRe = regexp.MustCompile(`^[a-z][a-z0-9-]*$`)

// checkMirror validates the suite and mirror before they reach debootstrap.
func checkMirror(suite, mirror string) error {
	if !suiteRe.MatchString(suite) {
		return fmt.Errorf("%w: suite %q is not a Debian suite name such as bookworm", types.ErrInvalid, suite)
	}
	u, err := url.Parse(mirror)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https" && u.Scheme != "file") {
		return fmt.Errorf("%w: mirror %q is not an http(s) or file URL", types.ErrInvalid, mirror)
	}
	return nil
}

// debootstrapVariant is the debootstrap variant of the default rootfs.
const debootstrapVariant = "minbase"

// debootstrap builds a minimal Debian tree in dir and removes what a guest
// does not need (apt's caches and lists, logs).
func debootstrap(ctx context.Context, suite, mirror, dir string, log func(string, ...any)) error {
	bin, err := exec.LookPath("debootstrap")
	if err != nil {
		if _, serr := os.Stat("/usr/sbin/debootstrap"); serr != nil {
			return fmt.Errorf("%w: debootstrap is not installed; run ./scripts/setup.sh", types.ErrUnavailable)
		}
		bin = "/usr/sbin/debootstrap"
	}
	log("running debootstrap; this takes a few minutes", "suite", suite, "mirror", mirror)
	if _, err := run(ctx, "", bin, "--variant="+debootstrapVariant, suite, dir, mirror); err != nil {
		tail := ""
		if b, rerr := os.ReadFile(filepath.Join(dir, "debootstrap", "debootstrap.log")); rerr == nil {
			tail = lastLines(string(b), 20)
		}
		return fmt.Errorf("%w: debootstrap %s from %s: %v\n%s", types.ErrUnavailable, suite, mirror, err, tail)
	}
	for _, g := range []string{
		"var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/cache/apt/archives/partial/*",
		"var/lib/apt/lists/*_*", "var/log/*.log", "var/log/apt/*", "debootstrap",
	} {
		ms, _ := filepath.Glob(filepath.Join(dir, g))
		for _, m := range ms {
			if err := os.RemoveAll(m); err != nil {
				return fmt.Errorf("cleaning the rootfs: %w", err)
			}
		}
	}
	return nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// installAgent puts fc-agent and Aetherium's few files into the tree.
func installAgent(dir, agent string) error {
	for _, d := range []string{"usr/local/bin", "etc/aetherium"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return fmt.Errorf("preparing the rootfs: %w", err)
		}
	}
	dst := filepath.Join(dir, AgentGuestPath)
	if err := copyFile(agent, dst, 0o755); err != nil {
		return fmt.Errorf("installing fc-agent into the rootfs: %w", err)
	}
	if err := os.Chown(dst, 0, 0); err != nil {
		return fmt.Errorf("installing fc-agent into the rootfs: %w", err)
	}
	host := filepath.Join(dir, "etc", "hostname")
	_ = os.Remove(host) // may be a symlink in an arbitrary tree
	if err := os.WriteFile(host, []byte(GuestHostname+"\n"), 0o644); err != nil {
		return fmt.Errorf("writing /etc/hostname: %w", err)
	}
	return nil
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	_ = os.Remove(dst)
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Chmod(dst, mode)
}

// mkfsExt4 makes a sparse ext4 image of sizeMB MiB holding the tree dir,
// without mounting anything. The file system's UUID and directory hash
// seed come from seed, so the same image id gives the same UUID.
func mkfsExt4(ctx context.Context, dir, img string, sizeMB int, seed string) error {
	f, err := os.Create(img)
	if err != nil {
		return fmt.Errorf("creating %s: %w", img, err)
	}
	err = f.Truncate(int64(sizeMB) << 20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sizing %s: %w", img, err)
	}
	sum := sha256.Sum256([]byte(seed))
	sum[6] = sum[6]&0x0f | 0x40 // a version 4 UUID shape
	sum[8] = sum[8]&0x3f | 0x80
	uuid := fmt.Sprintf("%x-%x-%x-%x-%x", sum[0:4], sum[4:6], sum[6:8], sum[8:10], sum[10:16])
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		mkfs = "/usr/sbin/mkfs.ext4"
	}
	if _, err := run(ctx, "", mkfs, "-F", "-q", "-L", "aetherium-root", "-U", uuid,
		"-E", "root_owner=0:0,hash_seed="+uuid, "-d", dir, img, fmt.Sprintf("%dM", sizeMB)); err != nil {
		return fmt.Errorf("making the ext4 rootfs (is %d MiB enough for the tree? raise the rootfs size): %w", sizeMB, err)
	}
	return nil
}
