//go:build linux

package guestinit

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Defaults for what the kernel command line leaves out.
const (
	// DefaultRootFSType is the root file system's type without rootfstype=.
	DefaultRootFSType = "ext4"
	// DefaultHostname is the guest's hostname without a valid
	// aetherium.hostname=.
	DefaultHostname = "aetherium"
	// DefaultListen is where the agent listens without aetherium.listen=;
	// port 9999 is agent.DefaultVsockPort.
	DefaultListen = "vsock://:9999"
)

// Config is what the init reads from the kernel command line. The zero
// value means every default: stay in the initramfs, hostname "aetherium",
// listen on vsock port 9999, log at info.
type Config struct {
	// Root is the root device or source (root=), e.g. /dev/vda. A path
	// under /dev is waited for; anything else (a virtiofs tag, "none" for
	// tmpfs) is passed to mount as is. Empty: stay in the initramfs.
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
	for _, p := range splitCmdline(cmdline) {
		if p.key == "--" && !p.hasValue {
			break
		}
		switch p.key {
		case "root":
			cfg.Root = p.value
		case "rootfstype":
			cfg.RootFSType = p.value
			if p.value == "" {
				cfg.RootFSType = DefaultRootFSType
			}
		case "rootflags":
			cfg.RootFlags = p.value
		case "ro":
			if !p.hasValue {
				cfg.ReadOnly = true
			}
		case "rw":
			if !p.hasValue {
				cfg.ReadOnly = false
			}
		case "aetherium.hostname":
			if err := ValidHostname(p.value); err != nil {
				errs = append(errs, fmt.Errorf("aetherium.hostname=%q: %w; using %q", p.value, err, DefaultHostname))
				cfg.Hostname = DefaultHostname
				continue
			}
			cfg.Hostname = p.value
		case "aetherium.listen":
			if !strings.Contains(p.value, "://") {
				errs = append(errs, fmt.Errorf("aetherium.listen=%q: %w: want vsock://:PORT, unix:///path or tcp://host:port; using %s",
					p.value, types.ErrInvalid, DefaultListen))
				cfg.Listen = DefaultListen
				continue
			}
			cfg.Listen = p.value
		case "aetherium.log":
			var level slog.Level
			if err := level.UnmarshalText([]byte(p.value)); err != nil {
				errs = append(errs, fmt.Errorf("aetherium.log=%q: %w: want debug, info, warn or error; using info", p.value, types.ErrInvalid))
				cfg.LogLevel = slog.LevelInfo
				continue
			}
			cfg.LogLevel = level
		case "aetherium.net":
			cfg.Net = p.value
		case "aetherium.init":
			switch p.value {
			case "raw":
				cfg.Raw = true
			case "", "agent":
				cfg.Raw = false
			default:
				errs = append(errs, fmt.Errorf("aetherium.init=%q: %w: want raw or agent; booting the agent", p.value, types.ErrInvalid))
			}
		}
	}
	return cfg, errors.Join(errs...)
}

// ValidHostname checks that name is an RFC 1123 host label: 1 to 63
// letters, digits and hyphens, not starting or ending with a hyphen.
func ValidHostname(name string) error {
	if name == "" || len(name) > 63 {
		return fmt.Errorf("%w: a hostname has 1 to 63 characters, not %d", types.ErrInvalid, len(name))
	}
	if name[0] == '-' || name[len(name)-1] == '-' {
		return fmt.Errorf("%w: a hostname cannot start or end with '-'", types.ErrInvalid)
	}
	for _, c := range []byte(name) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("%w: a hostname has only letters, digits and '-', not %q", types.ErrInvalid, c)
		}
	}
	return nil
}

// param is one parameter of a kernel command line.
type param struct {
	key, value string
	hasValue   bool // key=value rather than a bare key
}

// splitCmdline splits a kernel command line the way the kernel's
// next_arg() does: at unquoted whitespace; double quotes group spaces into
// one parameter and are removed around a whole parameter or its value.
// Written by hand because no library parses this exact grammar.
func splitCmdline(s string) []param {
	var params []param
	for {
		s = strings.TrimLeft(s, " \t\n\r\v\f")
		if s == "" {
			return params
		}
		inQuote := false
		end := len(s)
		for i := 0; i < len(s); i++ {
			c := s[i]
			if c == '"' {
				inQuote = !inQuote
			} else if !inQuote && isSpace(c) {
				end = i
				break
			}
		}
		params = append(params, parseParam(s[:end]))
		s = s[end:]
	}
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'
}

// parseParam splits one parameter at its first unquoted '=' and removes
// the quotes the kernel removes: a leading quote of the parameter, and a
// quote opening the value together with the final quote.
func parseParam(arg string) param {
	quoted := false
	if strings.HasPrefix(arg, `"`) {
		arg = arg[1:]
		quoted = true
	}
	key, value, hasValue := strings.Cut(arg, "=")
	if !hasValue {
		if quoted {
			key = strings.TrimSuffix(key, `"`)
		}
		return param{key: key}
	}
	if strings.HasPrefix(value, `"`) {
		value = value[1:]
		quoted = true
	}
	if quoted {
		value = strings.TrimSuffix(value, `"`)
	}
	return param{key: key, value: value, hasValue: true}
}
