package tools

import (
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
)

func TestParseSpec(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Spec
	}{
		{"node@22", Spec{Name: "node", Version: "22"}},
		{"python@3.12", Spec{Name: "python", Version: "3.12"}},
		{"node", Spec{Name: "node", Version: "latest"}},
		{"npm:prettier@3", Spec{Backend: "npm", Name: "prettier", Version: "3"}},
		{"npm:@scope/pkg@1.2.3", Spec{Backend: "npm", Name: "@scope/pkg", Version: "1.2.3"}},
		{"npm:@scope/pkg", Spec{Backend: "npm", Name: "@scope/pkg", Version: "latest"}},
		{"go:golang.org/x/tools/cmd/stringer@v0.30.0", Spec{Backend: "go", Name: "golang.org/x/tools/cmd/stringer", Version: "v0.30.0"}},
		{"http:hello[url=http://127.0.0.1:8080/hello-{{version}}.tar.gz]@1.0.0",
			Spec{Backend: "http", Name: "hello", Options: "url=http://127.0.0.1:8080/hello-{{version}}.tar.gz", Version: "1.0.0"}},
		{"aqua:cli/cli@2.40.0", Spec{Backend: "aqua", Name: "cli/cli", Version: "2.40.0"}},
		{"ubi:BurntSushi/ripgrep[exe=rg]@14.1.0", Spec{Backend: "ubi", Name: "BurntSushi/ripgrep", Options: "exe=rg", Version: "14.1.0"}},
		{"node@lts", Spec{Name: "node", Version: "lts"}},
		{"node@prefix:22", Spec{Name: "node", Version: "prefix:22"}},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseSpec(tc.in)
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
			again, err := ParseSpec(got.String())
			require.NoError(t, err, "the canonical form must parse")
			require.Equal(t, got, again)
		})
	}
}

func TestParseSpecRejects(t *testing.T) {
	for _, tc := range []struct {
		in, why string
	}{
		{"", "empty"},
		{"node@22; rm -rf /", "metacharacter ';'"}, {"node@22 x", "whitespace"},
		{"node@22;true", "metacharacter ';'"},
		{"node@$(id)", "metacharacter '$'"},
		{"node@`id`", "metacharacter '`'"},
		{"node|sh", "metacharacter '|'"},
		{"node@22&", "metacharacter '&'"},
		{"node>x", "metacharacter '>'"},
		{"node\x00@1", "NUL"},
		{"node\t@1", "whitespace"},
		{"node@1\n", "whitespace"},
		{"node\x1b@1", "control character"},
		{"nodé@1", "non-ASCII"},
		{"--version", "starts with '-'"},
		{"-y", "starts with '-'"},
		{"asdf:foo@1", `backend "asdf" is not allowed`},
		{"vfox:foo@1", `backend "vfox" is not allowed`},
		{"evil:foo@1", `backend "evil" is not allowed`},
		{"npm:", "names no tool"},
		{"@1.0", "name a backend"},
		{"node@", "version after '@' is empty"},
		{"http:hello[url=x", "no closing"},
		{"http:hello]@1", "no opening"},
		{"http:hello[]@1", "options [] are empty"},
		{"http:hello[a][b]@1", "nested or repeated"},
		{"http:hello[url=x]junk", "follows its ]"},
		{"go:../../etc@1", "must start with"},
		{"go:a/../b@1", "contains '..'"},
		{"node@.1", "version"},
		{"some/tool@1", "name a backend"},
		{strings.Repeat("a", MaxSpecLen+1), "bytes long"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			_, err := ParseSpec(tc.in)
			require.ErrorIs(t, err, types.ErrInvalid)
			require.ErrorContains(t, err, tc.why)
			if len(tc.in) < 40 {
				require.ErrorContains(t, err, fmt.Sprintf("%q", tc.in), "the error names the spec")
			}
		})
	}
}

func TestMiseError(t *testing.T) {
	for _, tc := range []struct {
		stderr, want string
		kind         error
	}{
		{"mise ✗ http:hello@2.0.0 failed\nmise ERROR Failed to install http:hello@2.0.0: HTTP status client error (404 File not found) for url (http://127.0.0.1:1/h-2.0.0.tar.gz)\nmise ERROR Version: 2026.9.15\n",
			"HTTP status client error (404 File not found) for url (http://127.0.0.1:1/h-2.0.0.tar.gz)", types.ErrInvalid},
		{"mise ERROR Failed to install nosuchtool@1: nosuchtool not found in mise tool registry\n", "nosuchtool not found in mise tool registry", types.ErrInvalid},
		{"mise ERROR Failed to install http:h@2: error sending request: client error (Connect): tcp connect error: Connection refused (os error 111)\n",
			"error sending request: client error (Connect): tcp connect error: Connection refused (os error 111)", types.ErrUnavailable},
		{"\x1b[31mmise ERROR\x1b[0m package not found: nopkg\n", "package not found: nopkg", types.ErrInvalid},
		{"", "mise failed without saying why", types.ErrUnavailable},
	} {
		err := miseError(tc.stderr)
		require.ErrorIs(t, err, tc.kind)
		require.NotContains(t, err.Error(), "\n")
		require.Contains(t, err.Error(), tc.want)
	}
}
