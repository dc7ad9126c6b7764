// Package bootparams is the boot contract between the host backends and the
// guest's init (guestinit) and agent: the kernel command-line parameters the
// host writes and the guest parses, the agent's vsock port, the console line
// that says the agent listens, the PATH commands get, and the exit codes of
// commands that never ran or ran out of time. Both sides import it, so a
// change to the contract is one edit that both see.
package bootparams

import (
	"fmt"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Kernel command-line parameter names.
const (
	// Hostname is the guest's hostname, an RFC 1123 label (see
	// SanitizeHostname).
	Hostname = "aetherium.hostname"
	// Listen is where the agent listens, in agent.Listen's syntax.
	Listen = "aetherium.listen"
	// Net is the guest's network (package guestnet parses its value).
	Net = "aetherium.net"
	// Log is the console log's level.
	Log = "aetherium.log"
	// Init selects what init does: "agent" (default) or "raw" (print the
	// start marker and power off, for the boot benchmark).
	Init = "aetherium.init"
)

// AgentPort is the AF_VSOCK port the agent listens on in a guest.
const AgentPort = 9999

// DefaultListen is where the agent listens without Listen= on the command
// line: vsock port AgentPort (a test holds the two together).
const DefaultListen = "vsock://:9999"

// AgentSerialPort is the name of the virtio-serial port the agent serves
// on in QEMU guests (their listen address is SerialListen).
const AgentSerialPort = "aetherium.agent"

// SerialListen is the listen address of an agent on the virtio-serial
// port AgentSerialPort.
const SerialListen = "serial://" + AgentSerialPort

// DefaultHostname is the guest's hostname when none (or no valid one) is
// given.
const DefaultHostname = "aetherium"

// ReadyLine starts the console line the init prints once the agent listens
// (followed by the address). The host waits for it before its first vsock
// CONNECT.
const ReadyLine = "aetherium-init: agent ready on"

// DefaultPath is every command's PATH unless the VM or the command sets
// one; the agent puts the bin directories of the guest's tool volumes in
// front of it, so a host that sends PATH itself hides the tools.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Exit codes of commands, as a shell and coreutils timeout(1) report them.
const (
	// ExitTimedOut is the exit code of a command killed by its timeout.
	ExitTimedOut = 124
	// ExitCannotExecute is the exit code of a command found but not
	// executable.
	ExitCannotExecute = 126
	// ExitNotFound is the exit code of a command that was not found.
	ExitNotFound = 127
)

// Arg writes one parameter as name=value.
func Arg(name, value string) string { return name + "=" + value }

// HostnameArg writes the Hostname parameter for a VM named name, sanitised
// so that the guest accepts it.
func HostnameArg(name string) string { return Arg(Hostname, SanitizeHostname(name)) }

// SanitizeHostname turns any VM name into a valid host name label: lower
// case letters and digits, other runs of characters become one '-', at most
// 63 characters, DefaultHostname when nothing is left.
func SanitizeHostname(name string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(name) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		case b.Len() > 0:
			b.WriteByte('-')
		}
		if b.Len() == 63 {
			break
		}
	}
	s := strings.Trim(b.String(), "-")
	if s == "" {
		return DefaultHostname
	}
	return s
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

// Param is one parameter of a kernel command line.
type Param struct {
	Key, Value string
	// HasValue is set for key=value rather than a bare key.
	HasValue bool
}

// Parse splits a kernel command line the way the kernel's next_arg() does:
// at unquoted whitespace; double quotes group spaces into one parameter and
// are removed around a whole parameter or its value. Written by hand
// because no library parses this exact grammar.
func Parse(s string) []Param {
	var params []Param
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
func parseParam(arg string) Param {
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
		return Param{Key: key}
	}
	if strings.HasPrefix(value, `"`) {
		value = value[1:]
		quoted = true
	}
	if quoted {
		value = strings.TrimSuffix(value, `"`)
	}
	return Param{Key: key, Value: value, HasValue: true}
}

// ToolsRoot is the kernel parameter naming the tool cache's root in the
// guest (types.ToolSet.Root): the init mounts tool disks under it, and the
// agent reads tool markers there. Absent: no tools.
const ToolsRoot = "aetherium.tools_root"

// RootBySerial is the root= value that names the root disk by its virtio
// serial instead of its probe order: root=SERIAL=<serial>.
func RootBySerial(serial string) string { return rootSerialPrefix + serial }

// rootSerialPrefix starts a root= value that names a disk by its serial.
const rootSerialPrefix = "SERIAL="

// RootSerial returns the serial a root= value written by RootBySerial
// names; ok is false for any other root= (a device path, a tag).
func RootSerial(root string) (serial string, ok bool) {
	serial, ok = strings.CutPrefix(root, rootSerialPrefix)
	return serial, ok && serial != ""
}
