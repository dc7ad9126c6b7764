package tools

import (
	"fmt"
	"slices"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// MaxSpecLen bounds a spec's length.
const MaxSpecLen = 512

// Backends are the mise backends a spec may name. asdf and vfox are left
// out on purpose: they run plugin scripts cloned from git repositories.
var Backends = []string{
	"aqua", "cargo", "conda", "core", "dotnet", "gem", "github", "gitlab",
	"go", "http", "npm", "pipx", "spm", "ubi",
}

// Spec is a mise tool spec, "[BACKEND:]NAME[[OPTIONS]][@VERSION]", e.g.
// "node@22", "npm:prettier@3" or "http:hello[url=https://...]@1.0.0".
type Spec struct {
	// Backend is the mise backend ("npm", "http", ...); empty for tools of
	// mise's registry such as "node".
	Backend string
	// Name is the tool's name within its backend, e.g. "@scope/pkg" or
	// "golang.org/x/tools/cmd/stringer".
	Name string
	// Options is the text between the brackets, without them, e.g.
	// "url=https://example.com/hello-{{version}}.tar.gz".
	Options string
	// Version is the version asked for: exact ("1.6.0"), a prefix ("22") or
	// "latest".
	Version string
}

// Tool returns the spec without its version, as mise writes it.
func (s Spec) Tool() string {
	var b strings.Builder
	if s.Backend != "" {
		b.WriteString(s.Backend + ":")
	}
	b.WriteString(s.Name)
	if s.Options != "" {
		b.WriteString("[" + s.Options + "]")
	}
	return b.String()
}

// String returns the spec as mise reads it, "TOOL@VERSION".
func (s Spec) String() string { return s.Tool() + "@" + s.Version }

// ParseSpec parses and strictly validates a mise tool spec. The result is
// passed to mise as one argument, never through a shell, but it is still
// held to a narrow alphabet so that nothing a shell, a flag parser or a log
// reader would misread gets through. Errors wrap types.ErrInvalid.
func ParseSpec(raw string) (Spec, error) {
	bad := func(format string, args ...any) (Spec, error) {
		return Spec{}, fmt.Errorf("%w: tool spec %q: %s; write it as mise does, e.g. node@22, npm:prettier@3 or http:NAME[url=URL]@VERSION",
			types.ErrInvalid, raw, fmt.Sprintf(format, args...))
	}
	switch {
	case raw == "":
		return bad("it is empty")
	case len(raw) > MaxSpecLen:
		return bad("it is %d bytes long; at most %d are allowed", len(raw), MaxSpecLen)
	case raw[0] == '-':
		return bad("it starts with '-', which mise would read as a flag")
	}
	for _, r := range raw {
		switch {
		case r == 0:
			return bad("it contains a NUL byte")
		case r == ' ' || r == '\t' || r == '\n' || r == '\r' || r == '\v' || r == '\f':
			return bad("it contains whitespace")
		case r < 0x20 || r == 0x7f:
			return bad("it contains a control character")
		case r > 0x7e:
			return bad("it contains the non-ASCII character %q", r)
		case strings.ContainsRune("`$;&|<>()\\\"'!*?#~^", r):
			return bad("it contains the shell metacharacter %q", r)
		}
	}

	var s Spec
	rest := raw
	// The backend is the text before the first ':' that precedes any '['
	// and '@'; names and options may contain ':' themselves (URLs).
	if i := strings.IndexAny(rest, ":[@"); i > 0 && rest[i] == ':' {
		s.Backend, rest = rest[:i], rest[i+1:]
		if !slices.Contains(Backends, s.Backend) {
			return bad("backend %q is not allowed; use one of %s", s.Backend, strings.Join(Backends, ", "))
		}
	}
	// Options: a single bracketed group right after the name.
	if i := strings.IndexByte(rest, '['); i >= 0 {
		j := strings.IndexByte(rest, ']')
		if j < i {
			return bad("its '[' has no closing ']'")
		}
		s.Name, s.Options, rest = rest[:i], rest[i+1:j], rest[j+1:]
		if s.Options == "" {
			return bad("its options [] are empty")
		}
		if strings.ContainsAny(s.Options, "[") || strings.ContainsAny(rest, "[]") {
			return bad("it has nested or repeated [options]")
		}
		if !validChars(s.Options, "._-:/@%+,={}") {
			return bad("its options %q may hold only letters, digits and . _ - : / @ %% + , = { }", s.Options)
		}
		switch {
		case rest == "":
			s.Version = ""
		case rest[0] == '@':
			s.Version = rest[1:]
		default:
			return bad("text %q follows its ]; only @VERSION may", rest)
		}
	} else {
		if strings.ContainsRune(rest, ']') {
			return bad("its ']' has no opening '['")
		}
		// The version follows the last '@' that does not start the name
		// (npm scopes: npm:@scope/pkg@1).
		if i := strings.LastIndexByte(rest, '@'); i > 0 {
			s.Name, s.Version = rest[:i], rest[i+1:]
		} else {
			s.Name = rest
		}
	}

	switch {
	case s.Name == "":
		return bad("it names no tool")
	case s.Name[0] == '.' || s.Name[0] == '-' || s.Name[0] == '/':
		return bad("tool name %q must start with a letter, a digit or '@'", s.Name)
	case s.Backend == "" && !validChars(s.Name, "._-"):
		return bad("tool name %q must be letters, digits, '.', '_' and '-'; name a backend for other tools, e.g. npm:NAME", s.Name)
	case !validChars(s.Name, "._-/@"):
		return bad("tool name %q may hold only letters, digits and . _ - / @", s.Name)
	case strings.Contains(s.Name, ".."):
		return bad("tool name %q contains '..'", s.Name)
	}
	if s.Version == "" {
		if strings.HasSuffix(raw, "@") {
			return bad("its version after '@' is empty")
		}
		s.Version = "latest"
	}
	if !validChars(s.Version, "._+-:") || s.Version[0] == '-' || s.Version[0] == '.' {
		return bad("version %q may hold only letters, digits and . _ + - : and must start with a letter or digit", s.Version)
	}
	return s, nil
}

// ParseSpecs parses each of raw; the first bad one fails them all.
func ParseSpecs(raw []string) ([]Spec, error) {
	specs := make([]Spec, 0, len(raw))
	for _, r := range raw {
		s, err := ParseSpec(r)
		if err != nil {
			return nil, err
		}
		specs = append(specs, s)
	}
	return specs, nil
}

func validChars(s, extra string) bool {
	for _, r := range s {
		if !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9' || strings.ContainsRune(extra, r)) {
			return false
		}
	}
	return true
}
