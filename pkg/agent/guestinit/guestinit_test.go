//go:build linux

package guestinit

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/types"
)

func defaults() Config {
	return Config{RootFSType: DefaultRootFSType, Hostname: DefaultHostname, Listen: DefaultListen}
}

func TestParseCmdline(t *testing.T) {
	with := func(f func(*Config)) Config {
		c := defaults()
		f(&c)
		return c
	}
	tests := []struct {
		name    string
		cmdline string
		want    Config
		wantErr string // substring; empty: no error
	}{
		{name: "empty", cmdline: "", want: defaults()},
		{name: "whitespace and newline", cmdline: " \t\n", want: defaults()},
		{
			name:    "boot contract",
			cmdline: "console=ttyS0 reboot=t panic=-1 root=/dev/vda rootfstype=ext4 rootflags=noatime,discard ro aetherium.hostname=vm-1 aetherium.listen=vsock://:1234 aetherium.log=debug aetherium.net=ip=10.0.0.2/24,gw=10.0.0.1\n",
			want: Config{
				Root: "/dev/vda", RootFSType: "ext4", RootFlags: "noatime,discard", ReadOnly: true,
				Hostname: "vm-1", Listen: "vsock://:1234", LogLevel: slog.LevelDebug, Net: "ip=10.0.0.2/24,gw=10.0.0.1",
			},
		},
		{name: "rw after ro", cmdline: "ro rw", want: defaults()},
		{name: "ro after rw", cmdline: "rw ro", want: with(func(c *Config) { c.ReadOnly = true })},
		{name: "ro with a value is not ro", cmdline: "ro=1", want: defaults()},
		{name: "last wins", cmdline: "root=/dev/vda root=/dev/vdb", want: with(func(c *Config) { c.Root = "/dev/vdb" })},
		{name: "raw", cmdline: "aetherium.init=raw", want: with(func(c *Config) { c.Raw = true })},
		{name: "empty rootfstype", cmdline: "rootfstype=", want: defaults()},
		{name: "virtiofs root", cmdline: "root=myfs rootfstype=virtiofs", want: with(func(c *Config) { c.Root, c.RootFSType = "myfs", "virtiofs" })},
		{name: "quoted value", cmdline: `aetherium.net="a b  c" x`, want: with(func(c *Config) { c.Net = "a b  c" })},
		{name: "quoted parameter", cmdline: `"aetherium.net=a b" x`, want: with(func(c *Config) { c.Net = "a b" })},
		{name: "value with =", cmdline: "aetherium.net=k=v", want: with(func(c *Config) { c.Net = "k=v" })},
		{name: "after -- belongs to init", cmdline: "root=/dev/vda -- root=/dev/vdb aetherium.init=raw", want: with(func(c *Config) { c.Root = "/dev/vda" })},
		{name: "unknown ignored", cmdline: "aetherium.other=1 quiet", want: defaults()},
		{
			name: "bad hostname", cmdline: "aetherium.hostname=-x", want: defaults(),
			wantErr: `aetherium.hostname="-x"`,
		},
		{
			name: "bad hostname after good", cmdline: "aetherium.hostname=ok aetherium.hostname=a_b", want: defaults(),
			wantErr: "only letters",
		},
		{name: "bad listen", cmdline: "aetherium.listen=9999", want: defaults(), wantErr: "aetherium.listen"},
		{name: "bad log level", cmdline: "aetherium.log=loud", want: defaults(), wantErr: "aetherium.log"},
		{name: "bad init", cmdline: "aetherium.init=fast", want: defaults(), wantErr: "aetherium.init"},
		{name: "tools root", cmdline: "aetherium.tools_root=/var/lib/aetherium/tools", want: with(func(c *Config) { c.ToolsRoot = "/var/lib/aetherium/tools" })},
		{name: "relative tools root", cmdline: "aetherium.tools_root=tools", want: defaults(), wantErr: "aetherium.tools_root"},
		{name: "unclean tools root", cmdline: "aetherium.tools_root=/a/../b", want: defaults(), wantErr: "clean absolute path"},
		{name: "tools root /", cmdline: "aetherium.tools_root=/x aetherium.tools_root=/", want: defaults(), wantErr: "other than /"},
		{
			name: "errors join, good values kept", cmdline: "root=/dev/vda aetherium.log=loud aetherium.init=fast",
			want: with(func(c *Config) { c.Root = "/dev/vda" }), wantErr: "aetherium.init",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseCmdline(tt.cmdline)
			require.Equal(t, tt.want, got)
			if tt.wantErr == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, types.ErrInvalid)
			require.ErrorContains(t, err, tt.wantErr)
		})
	}
}

func TestValidHostname(t *testing.T) {
	for _, ok := range []string{"a", "vm-1", "A9", strings.Repeat("x", 63)} {
		require.NoError(t, ValidHostname(ok), ok)
	}
	for _, bad := range []string{"", "-a", "a-", "a.b", "a b", "é", strings.Repeat("x", 64)} {
		require.ErrorIs(t, ValidHostname(bad), types.ErrInvalid, bad)
	}
}

func FuzzParseCmdline(f *testing.F) {
	for _, s := range []string{
		"", "console=ttyS0 root=/dev/vda ro aetherium.hostname=t1",
		`aetherium.net="a b" "x=y z" -- tail`, `"`, `=`, `a="`, "aetherium.log=debug aetherium.init=raw",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, cmdline string) {
		cfg, err := ParseCmdline(cmdline)
		// Whatever the input, the Config is usable as is.
		require.NoError(t, ValidHostname(cfg.Hostname))
		require.Contains(t, cfg.Listen, "://")
		require.NotEmpty(t, cfg.RootFSType)
		if err != nil {
			require.ErrorIs(t, err, types.ErrInvalid)
		}
		// Parsing is stable: values without spaces or quotes survive a
		// round trip through a command line.
		if !strings.ContainsAny(cfg.Root+cfg.Net, " \t\n\r\v\f\"") && cfg.Root != "" {
			again, _ := ParseCmdline("root=" + cfg.Root + " aetherium.net=" + cfg.Net)
			require.Equal(t, cfg.Root, again.Root)
			require.Equal(t, cfg.Net, again.Net)
		}
	})
}

func TestSplitMountOptions(t *testing.T) {
	tests := []struct {
		opts  string
		flags uintptr
		data  string
	}{
		{"", 0, ""},
		{"rw", 0, ""},
		{"noatime,discard,nosuid", unix.MS_NOATIME | unix.MS_NOSUID, "discard"},
		{"data=ordered,,errors=remount-ro", 0, "data=ordered,errors=remount-ro"},
		{"ro,lazytime", unix.MS_RDONLY | unix.MS_LAZYTIME, ""},
	}
	for _, tt := range tests {
		flags, data := splitMountOptions(tt.opts)
		require.Equal(t, tt.flags, flags, tt.opts)
		require.Equal(t, tt.data, data, tt.opts)
	}
}

func TestReadModulesOrder(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := filepath.Join(dir, "modules.order")
		require.NoError(t, os.WriteFile(p, []byte(s), 0o644))
		return p
	}

	names, err := readModulesOrder(write("# virtio first\nvirtio_ring\n\n  virtio.ko \nvsock\n"))
	require.NoError(t, err)
	require.Equal(t, []string{"virtio_ring", "virtio", "vsock"}, names)

	_, err = readModulesOrder(write("virtio\n../../etc/passwd\n"))
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorContains(t, err, "line 2")

	_, err = readModulesOrder(filepath.Join(dir, "missing"))
	require.ErrorIs(t, err, os.ErrNotExist)
}

func TestLoadModulesNamesMissingModule(t *testing.T) {
	dir := t.TempDir()
	order := filepath.Join(dir, "modules.order")
	require.NoError(t, os.WriteFile(order, []byte("virtio_blk\n"), 0o644))
	// The file is missing, so nothing reaches finit_module.
	_, err := loadModules(order, dir, slog.New(slog.DiscardHandler), nil)
	require.ErrorIs(t, err, os.ErrNotExist)
	require.ErrorContains(t, err, filepath.Join(dir, "virtio_blk.ko"))

	// No list at all: nothing to load.
	_, err = loadModules(filepath.Join(dir, "none"), dir, slog.New(slog.DiscardHandler), nil)
	require.NoError(t, err)
}

func TestParseStat(t *testing.T) {
	tests := []struct {
		stat  string
		state byte
		flags uint64
		ok    bool
	}{
		{"1 (init) S 0 1 1 0 -1 4194560 100 0", 'S', 4194560, true},
		{"2 (kthreadd) S 0 0 0 0 -1 2129984 0 0", 'S', 2129984, true},
		{"42 (a) b) c) Z 1 42 42 0 -1 4194564 0", 'Z', 4194564, true},
		{"42 (x) R 1 2", 0, 0, false},
		{"garbage", 0, 0, false},
	}
	for _, tt := range tests {
		state, flags, ok := parseStat([]byte(tt.stat))
		require.Equal(t, tt.ok, ok, tt.stat)
		require.Equal(t, tt.state, state, tt.stat)
		require.Equal(t, tt.flags, flags, tt.stat)
	}
	_, flags, _ := parseStat([]byte("2 (kthreadd) S 0 0 0 0 -1 2129984 0 0"))
	require.NotZero(t, flags&pfKthread, "kthreadd is a kernel thread")
}

func TestConsoleLogger(t *testing.T) {
	var buf bytes.Buffer
	log := NewConsoleLogger(&buf, slog.LevelInfo)
	log.Info("aetherium-init: agent ready on vsock port 9999")
	log.Debug("hidden")
	require.Regexp(t, regexp.MustCompile(`^\[ *\d+\.\d{6}\] level=INFO msg="aetherium-init: agent ready on vsock port 9999"\n$`), buf.String())
}

func TestDetect(t *testing.T) {
	if os.Getpid() == 1 {
		testenv.Skip(t, "the test runs as PID 1, so auto-detection depends on the machine; run it as an ordinary process")
	}
	require.False(t, Detect([]string{"/init"}), "only PID 1 is init without the flag")
	require.False(t, Detect([]string{"fc-agent", "--listen", "unix:///x"}))
	require.True(t, Detect([]string{"fc-agent", "--init"}))
	require.True(t, Detect([]string{"fc-agent", "-init"}))
}

func TestModuleUse(t *testing.T) {
	vsock := defaults() // firecracker: the agent on vsock
	nat := defaults()
	nat.Net = "ip=10.88.0.2/16,gw=10.88.0.1"
	serial := defaults() // qemu: the agent on a virtio-serial port
	serial.Listen = "serial://aetherium.agent"
	serialNat := serial
	serialNat.Net = nat.Net
	for _, tc := range []struct {
		cfg   Config
		what  string
		now   []string
		never []string
	}{
		{vsock, "vsock, no network", []string{"virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"},
			[]string{"virtio_console"}},
		{nat, "vsock, nat", []string{"virtio_blk", "vsock", "vmw_vsock_virtio_transport", "failover", "net_failover", "virtio_net"},
			[]string{"virtio_console"}},
		{serial, "serial, no network", []string{"virtio_mmio", "virtio_blk", "virtio_console"},
			[]string{"vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport", "failover", "net_failover", "virtio_net"}},
		{serialNat, "serial, nat", []string{"virtio_blk", "virtio_console", "failover", "net_failover", "virtio_net"},
			[]string{"vsock", "vmw_vsock_virtio_transport"}},
	} {
		for _, m := range tc.now {
			require.Equal(t, loadNow, tc.cfg.moduleUse(m), "%s: %s is needed to boot", tc.what, m)
		}
		for _, m := range tc.never {
			require.Equal(t, skipModule, tc.cfg.moduleUse(m), "%s: %s drives a device the vm cannot have", tc.what, m)
		}
	}
	require.Equal(t, loadDeferred, serial.moduleUse("some_future_module"), "an unknown module waits for the agent")
	for _, m := range []string{"failover", "net_failover", "virtio_net"} {
		require.Equal(t, loadDeferred, vsock.moduleUse(m), "a firecracker VM may have a NIC its caller configures: %s loads once the agent serves", m)
	}
}

func TestSyscallsRefuseOutsidePID1(t *testing.T) {
	if os.Getpid() == 1 {
		testenv.Skip(t, "the test runs as PID 1, where these calls would act; run it as an ordinary process")
	}
	// These would remount or end this machine's processes: they must
	// refuse before touching anything.
	_, err := Setup(t.Context(), defaults(), slog.New(slog.DiscardHandler), nil)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorIs(t, PowerOff(slog.New(slog.DiscardHandler), false), types.ErrInvalid)
}
