package bootparams_test

import (
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
)

func TestSanitizeHostname(t *testing.T) {
	for in, want := range map[string]string{
		"web-1":                   "web-1",
		"My VM":                   "my-vm",
		"":                        "aetherium",
		"--":                      "aetherium",
		"a;rm -rf /":              "a-rm--rf",
		"x\nroot=/dev/sdb init=/": "x-root--dev-sdb-init",
		strings.Repeat("a", 80):   strings.Repeat("a", 63),
	} {
		got := bootparams.SanitizeHostname(in)
		require.Equal(t, want, got, "SanitizeHostname(%q)", in)
		require.NoError(t, bootparams.ValidHostname(got))
	}
}

func TestWriteThenParse(t *testing.T) {
	line := strings.Join([]string{"console=ttyS0", bootparams.HostnameArg("Evil name ro"), bootparams.Arg(bootparams.Net, "ip=10.0.0.2/24,gw=10.0.0.1"), "rw"}, " ")
	got := map[string]string{}
	for _, p := range bootparams.Parse(line) {
		got[p.Key] = p.Value
	}
	require.Equal(t, "evil-name-ro", got[bootparams.Hostname])
	require.Equal(t, "ip=10.0.0.2/24,gw=10.0.0.1", got[bootparams.Net])
	require.Contains(t, got, "rw")
	require.NotContains(t, got, "ro")
}

func TestParseQuotes(t *testing.T) {
	require.Equal(t, []bootparams.Param{{Key: "a", Value: "b c", HasValue: true}, {Key: "d"}}, bootparams.Parse(` a="b c"  "d" `))
}

func TestDefaultListenIsAgentPort(t *testing.T) {
	require.Equal(t, "vsock://:"+strconv.Itoa(bootparams.AgentPort), bootparams.DefaultListen)
}

// Moved from pkg/vmm/qemu (qemu.Hostname became SanitizeHostname).
func TestSanitizeHostnameQEMUCases(t *testing.T) {
	for in, want := range map[string]string{"web": "web", "Web_Server 1": "web-server-1", "--": "aetherium", "": "aetherium", "ünïcode": "n-code", strings.Repeat("a", 80): strings.Repeat("a", 63)} {
		require.Equal(t, want, bootparams.SanitizeHostname(in), "SanitizeHostname(%q)", in)
	}
}
