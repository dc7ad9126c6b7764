//go:build linux

package guestinit

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Defaults for what the kernel command line leaves out.
const (
	// DefaultRootFSType is the root file system's type without rootfstype=.
	DefaultRootFSType = "ext4"
	// DefaultHostname is the guest's hostname without a valid
	// aetherium.hostname=.
	DefaultHostname = bootparams.DefaultHostname
	// DefaultListen is where the agent listens without aetherium.listen=.
	DefaultListen = bootparams.DefaultListen
)

// Config is what the init reads from the kernel command line. The zero
// value means every default: stay in the initramfs, hostname "aetherium",
// listen on vsock port 9999, log at info.
type Config struct {
	// Root is the root device or source (root=), e.g. /dev/vda, or
	// SERIAL=<serial> (bootparams.RootBySerial) for the virtio-blk disk
	// with that serial. A path under /dev or a serial is waited for;
	// anything else (a virtiofs tag, "none" for tmpfs) is passed to mount
	// as is. Empty: stay in the initramfs.
	Root string
	// RootFSType is the root file system's type (rootfstype=); empty: ext4.
	RootFSType string
	// RootFlags are the root's mount options (rootflags=), comma-separated;
	// generic ones (noatime, nosuid, ...) become mount flags, the rest is
	// passed to the file system. Empty: none.
	RootFlags string
	// ReadOnly mounts the root read-only (ro; rw, the default, clears it).
	ReadOnly bool
	// Hostname is the guest's hostname (aetherium.hostname=), a valid RFC
	// 1123 label; empty: DefaultHostname.
	Hostname string
	// Listen is where the agent listens (aetherium.listen=), in
	// agent.Listen's syntax; empty: DefaultListen.
	Listen string
	// LogLevel is the console log's level (aetherium.log=); the zero value
	// is info.
	LogLevel slog.Level
	// Net is aetherium.net= verbatim, for the guest network setup to parse;
	// empty: no network beyond loopback.
	Net string
	// Raw is aetherium.init=raw, the boot benchmark: print the start marker
	// and power off at once.
	Raw bool
	// ToolsRoot is aetherium.tools_root=, the tool volumes' root
	// (types.ToolSet.Root), a clean absolute path other than /: the init
	// mounts the tool disks under it and the agent reads their markers
	// there. Empty: no tool disks are mounted.
	ToolsRoot string
}

// ParseCmdline parses a kernel command line (the contents of /proc/cmdline).
// Parameters it does not know are ignored; of repeated ones the last wins,
// as with the kernel; everything after "--" belongs to init's arguments and
// is ignored.
//
// The returned Config is always usable, with defaults filled in. Values
// that are invalid are replaced by their default, and the error, wrapping
// types.ErrInvalid, names each of them: an init should log it and boot
// anyway rather than power off over a typo.
func ParseCmdline(cmdline string) (Config, error) {
	cfg := Config{RootFSType: DefaultRootFSType, Hostname: DefaultHostname, Listen: DefaultListen}
	var errs []error
	for _, p := range bootparams.Parse(cmdline) {
		if p.Key == "--" && !p.HasValue {
			break
		}
		switch p.Key {
		case "root":
			cfg.Root = p.Value
		case "rootfstype":
			cfg.RootFSType = p.Value
			if p.Value == "" {
				cfg.RootFSType = DefaultRootFSType
			}
		case "rootflags":
			cfg.RootFlags = p.Value
		case "ro":
			if !p.HasValue {
				cfg.ReadOnly = true
			}
		case "rw":
			if !p.HasValue {
				cfg.ReadOnly = false
			}
		case bootparams.Hostname:
			if err := ValidHostname(p.Value); err != nil {
				errs = append(errs, fmt.Errorf("aetherium.hostname=%q: %w; using %q", p.Value, err, DefaultHostname))
				cfg.Hostname = DefaultHostname
				continue
			}
			cfg.Hostname = p.Value
		case bootparams.Listen:
			if !strings.Contains(p.Value, "://") {
				errs = append(errs, fmt.Errorf("aetherium.listen=%q: %w: want vsock://:PORT, serial://NAME, unix:///path or tcp://host:port; using %s",
					p.Value, types.ErrInvalid, DefaultListen))
				cfg.Listen = DefaultListen
				continue
			}
			cfg.Listen = p.Value
		case bootparams.Log:
			var level slog.Level
			if err := level.UnmarshalText([]byte(p.Value)); err != nil {
				errs = append(errs, fmt.Errorf("aetherium.log=%q: %w: want debug, info, warn or error; using info", p.Value, types.ErrInvalid))
				cfg.LogLevel = slog.LevelInfo
				continue
			}
			cfg.LogLevel = level
		case bootparams.Net:
			cfg.Net = p.Value
		case bootparams.ToolsRoot:
			if v := p.Value; v != "" && (!filepath.IsAbs(v) || filepath.Clean(v) != v || v == "/") {
				errs = append(errs, fmt.Errorf("%s=%q: %w: want a clean absolute path other than /; mounting no tool disks", bootparams.ToolsRoot, v, types.ErrInvalid))
				cfg.ToolsRoot = ""
				continue
			}
			cfg.ToolsRoot = p.Value
		case bootparams.Init:
			switch p.Value {
			case "raw":
				cfg.Raw = true
			case "", "agent":
				cfg.Raw = false
			default:
				errs = append(errs, fmt.Errorf("aetherium.init=%q: %w: want raw or agent; booting the agent", p.Value, types.ErrInvalid))
			}
		}
	}
	return cfg, errors.Join(errs...)
}

// ValidHostname checks that name is an RFC 1123 host label
// (bootparams.ValidHostname).
func ValidHostname(name string) error { return bootparams.ValidHostname(name) }
