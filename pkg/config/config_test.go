package config

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm/docker"
	"github.com/aetherium/aetherium-core/pkg/vmm/firecracker"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
)

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "aetherium.yaml")
	require.NoError(t, os.WriteFile(p, []byte(body), 0o600))
	return p
}

func TestLoadDefaultsFileAndEnv(t *testing.T) {
	p := writeFile(t, `
vmm:
  provider: docker
  docker:
    socket_dir: /tmp/x
queue:
  redis_addr: 127.0.0.1:16379
storage:
  port: 15432
worker:
  id: w1
`)
	t.Setenv("AETHERIUM_CONFIG", "")
	t.Setenv("AETHERIUM_STORAGE_HOST", "db.local")
	t.Setenv("AETHERIUM_VMM_DOCKER_HOST", "unix:///tmp/d.sock")
	t.Setenv("AETHERIUM_QUEUE_TASK_CHECK_INTERVAL", "20ms")
	t.Setenv("AETHERIUM_WORKER_DEAD_AFTER", "10s")
	c, err := Load(p)
	require.NoError(t, err)
	require.Equal(t, 10*time.Second, c.Worker.DeadAfter)
	require.Equal(t, "docker", c.VMM.Provider)
	require.Equal(t, "/tmp/x", c.VMM.Docker.SocketDir)
	require.Equal(t, "unix:///tmp/d.sock", c.VMM.Docker.Host)
	require.Equal(t, 15432, c.Storage.Port)
	require.Equal(t, "db.local", c.Storage.Host)
	require.Equal(t, 20*time.Millisecond, c.Queue.TaskCheckInterval)
	require.Equal(t, types.DefaultMaxOutputBytes, c.VMM.MaxOutputBytes)
	require.Equal(t, "postgres://aetherium@db.local:15432/aetherium?sslmode=disable", c.Storage.DSN())
}

func TestLoadRejectsBadInput(t *testing.T) {
	cases := []struct {
		name, file string
		env        map[string]string
		want       string
	}{
		{name: "unknown provider", file: "vmm: {provider: vbox}", want: `vmm.provider "vbox" is unknown`},
		{name: "unknown key", file: "vmm: {provder: docker}", want: "field provder not found"},
		{name: "bad yaml", file: "vmm: [", want: "parsing config"},
		{name: "bad env int", env: map[string]string{"AETHERIUM_STORAGE_PORT": "abc"}, want: "AETHERIUM_STORAGE_PORT"},
		{name: "bad env duration", env: map[string]string{"AETHERIUM_WORKER_SHUTDOWN_TIMEOUT": "5"}, want: "duration"},
		{name: "bad worker id", env: map[string]string{"AETHERIUM_WORKER_ID": "a b"}, want: "worker.id"},
		{name: "bad port", file: "storage: {port: 70000}", want: "storage.port"},
		{name: "bad redis addr", file: "queue: {redis_addr: localhost}", want: "host:port"},
		{name: "bad tool default", file: "tools: {defaults: ['node@22;rm']}", want: `tools.defaults: invalid input: tool spec "node@22;rm"`},
		{name: "relative tools cache", file: "tools: {cache_dir: tools}", want: "tools.cache_dir"},
		{name: "unknown tools key", file: "tools: {cachedir: /x}", want: "field cachedir not found"},
		{name: "dead_after not above heartbeat", env: map[string]string{"AETHERIUM_WORKER_DEAD_AFTER": "5s"}, want: "worker.dead_after 5s must be longer than worker.heartbeat_interval 5s"},
		{name: "dead_after below heartbeat", file: "worker: {heartbeat_interval: 10s, dead_after: 3s}", want: "worker.dead_after 3s"},
		{name: "bad tools env", env: map[string]string{"AETHERIUM_TOOLS_ENV": "novalue"}, want: "AETHERIUM_TOOLS_ENV"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			_, err := Load(writeFile(t, tc.file))
			require.Error(t, err)
			require.True(t, errors.Is(err, types.ErrInvalid), err)
			require.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestPathOrder(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	t.Setenv("HOME", dir)
	t.Setenv("AETHERIUM_CONFIG", "")
	require.Equal(t, "", Path(""))
	home := filepath.Join(dir, ".config", "aetherium", "config.yaml")
	require.NoError(t, os.MkdirAll(filepath.Dir(home), 0o755))
	require.NoError(t, os.WriteFile(home, nil, 0o600))
	require.Equal(t, home, Path(""))
	require.NoError(t, os.WriteFile("aetherium.yaml", nil, 0o600))
	require.Equal(t, "aetherium.yaml", Path(""))
	t.Setenv("AETHERIUM_CONFIG", "/env.yaml")
	require.Equal(t, "/env.yaml", Path(""))
	require.Equal(t, "/flag.yaml", Path("/flag.yaml"))
	c, err := Load(home) // empty file: defaults
	require.NoError(t, err)
	require.Equal(t, "127.0.0.1:6379", c.Queue.RedisAddr)
}

// TestExampleIsTheBackendsDefaults: aetherium.example.yaml, the
// configuration's documentation, loads with every key known, and the
// backend sections it shows are the backends' own defaults (the backends
// own their config structs and default constants; see the QEMU, Firecracker
// and Docker aliases).
func TestExampleIsTheBackendsDefaults(t *testing.T) {
	t.Setenv("AETHERIUM_CONFIG", "")
	c, err := Load(filepath.Join("..", "..", "aetherium.example.yaml"))
	require.NoError(t, err)
	q, f, d := c.VMM.QEMU, c.VMM.Firecracker, c.VMM.Docker
	require.Equal(t, qemu.DefaultBinary, q.Binary)
	require.Equal(t, qemu.DefaultVsockBinary, q.VsockBinary)
	require.Equal(t, qemu.DefaultImgBinary, q.ImgBinary)
	require.Equal(t, qemu.DefaultRunDir, q.RunDir)
	require.Equal(t, qemu.AccelAuto, q.Accel)
	require.Equal(t, qemu.DefaultReadyTimeout, q.ReadyTimeout)
	require.Equal(t, qemu.DefaultStopTimeout, q.StopTimeout)
	require.Equal(t, firecracker.DefaultBinary, f.Binary)
	require.Equal(t, firecracker.DefaultSocketDir, f.SocketDir)
	require.Equal(t, firecracker.DefaultLogLevel, f.LogLevel)
	require.Equal(t, firecracker.DefaultReadyTimeout, f.ReadyTimeout)
	require.Equal(t, firecracker.DefaultStopTimeout, f.StopTimeout)
	require.Equal(t, firecracker.DefaultJailerBinary, f.Jailer.Binary)
	require.Equal(t, firecracker.DefaultChrootBaseDir, f.Jailer.ChrootBaseDir)
	require.Equal(t, firecracker.HostCgroupVersion(), f.Jailer.CgroupVersion)
	require.Equal(t, docker.DefaultBusyboxPath, d.BusyboxPath)
	require.Equal(t, docker.DefaultSocketDir, d.SocketDir)
	require.Equal(t, docker.DefaultReadyTimeout, d.ReadyTimeout)
	require.Equal(t, docker.DefaultStopTimeout, d.StopTimeout)
}

// TestBackendSectionsFromEnv: the backends' own fields are overridden by
// the environment like every other key, and the fields wiring sets are not
// configuration keys.
func TestBackendSectionsFromEnv(t *testing.T) {
	t.Setenv("AETHERIUM_CONFIG", "")
	t.Setenv("AETHERIUM_VMM_QEMU_STOP_TIMEOUT", "3s")
	t.Setenv("AETHERIUM_VMM_FIRECRACKER_JAILER_UID", "123")
	c, err := Load(writeFile(t, "vmm: {provider: qemu}\n"))
	require.NoError(t, err)
	require.Equal(t, 3*time.Second, c.VMM.QEMU.StopTimeout)
	require.Equal(t, 123, c.VMM.Firecracker.Jailer.UID)
	require.True(t, c.VMM.QEMU.Jail.On(), "confinement is on by default")
	require.True(t, c.VMM.Firecracker.Jailer.On(), "the jailer is on by default")

	// Optional booleans (nil: the default) are set from the environment too.
	t.Setenv("AETHERIUM_VMM_QEMU_JAIL_ENABLED", "false")
	t.Setenv("AETHERIUM_VMM_FIRECRACKER_JAILER_ENABLED", "false")
	c, err = Load(writeFile(t, "vmm: {provider: qemu}\n"))
	require.NoError(t, err)
	require.False(t, c.VMM.QEMU.Jail.On())
	require.False(t, c.VMM.Firecracker.Jailer.On())
	t.Setenv("AETHERIUM_VMM_QEMU_JAIL_ENABLED", "maybe")
	_, err = Load(writeFile(t, "vmm: {provider: qemu}\n"))
	require.ErrorContains(t, err, "AETHERIUM_VMM_QEMU_JAIL_ENABLED")
	_, err = Load(writeFile(t, "vmm: {qemu: {owner: w1}}\n"))
	require.ErrorContains(t, err, "field owner not found")
}

func TestToolsSection(t *testing.T) {
	t.Setenv("AETHERIUM_CONFIG", "")
	c, err := Load(writeFile(t, ""))
	require.NoError(t, err)
	require.Equal(t, Tools{CacheDir: "/opt/aetherium/tools", MiseBinary: "mise"}, c.Tools, "defaults")

	c, err = Load(writeFile(t, `
tools:
  defaults: [node@22]
  cache_dir: /srv/tools
  mise_binary: /usr/local/lib/aetherium/mise/2026.9.15/mise
  env: {MISE_NPM_PACKAGE_MANAGER: npm}
`))
	require.NoError(t, err)
	require.Equal(t, Tools{Defaults: []string{"node@22"}, CacheDir: "/srv/tools",
		MiseBinary: "/usr/local/lib/aetherium/mise/2026.9.15/mise", Env: map[string]string{"MISE_NPM_PACKAGE_MANAGER": "npm"}}, c.Tools)

	t.Setenv("AETHERIUM_TOOLS_DEFAULTS", "node@22,npm:prettier@3")
	t.Setenv("AETHERIUM_TOOLS_ENV", "MISE_NPM_PACKAGE_MANAGER=npm, MISE_URL_REPLACEMENTS=a=b")
	t.Setenv("AETHERIUM_TOOLS_CACHE_DIR", "/var/tools")
	c, err = Load(writeFile(t, ""))
	require.NoError(t, err)
	require.Equal(t, []string{"node@22", "npm:prettier@3"}, c.Tools.Defaults)
	require.Equal(t, map[string]string{"MISE_NPM_PACKAGE_MANAGER": "npm", "MISE_URL_REPLACEMENTS": "a=b"}, c.Tools.Env)
	require.Equal(t, "/var/tools", c.Tools.CacheDir)
}

// TestLoadRejectsUnknownEnv: an AETHERIUM_* variable that is no key fails
// like an unknown key in the file, naming the closest known name, while
// the variables read elsewhere (OtherEnv) pass.
func TestLoadRejectsUnknownEnv(t *testing.T) {
	t.Setenv("AETHERIUM_CONFIG", "")
	p := writeFile(t, "")
	cases := []struct {
		name, value, want string
	}{
		{name: "AETHERIUM_VMM_PROVDER", value: "qemu", want: "environment variable AETHERIUM_VMM_PROVDER is not a configuration key; did you mean AETHERIUM_VMM_PROVIDER?"},
		{name: "AETHERIUM_STORAGE_PORTT", value: "15432", want: "did you mean AETHERIUM_STORAGE_PORT?"},
		{name: "AETHERIUM_VMM_QEMU_JAIL_ENABLE", value: "false", want: "did you mean AETHERIUM_VMM_QEMU_JAIL_ENABLED?"},
		{name: "AETHERIUM_TEST_REQUIRED", value: "1", want: "did you mean AETHERIUM_TEST_REQUIRE?"},
		{name: "AETHERIUM_WORKER_DEAD", value: "", want: "environment variable AETHERIUM_WORKER_DEAD is not a configuration key"},
		{name: "AETHERIUM_SOMETHING_ELSE_ENTIRELY", value: "x", want: "AETHERIUM_SOMETHING_ELSE_ENTIRELY is not a configuration key; unset it, or name a key as AETHERIUM_<SECTION>_<KEY>"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(tc.name, tc.value)
			_, err := Load(p)
			require.ErrorIs(t, err, types.ErrInvalid)
			require.ErrorContains(t, err, tc.want)
		})
	}

	t.Run("every one is named", func(t *testing.T) {
		t.Setenv("AETHERIUM_LOG_LEVL", "debug")
		t.Setenv("AETHERIUM_API_LISTN", "127.0.0.1:1")
		_, err := Load(p)
		require.ErrorContains(t, err, "did you mean AETHERIUM_LOG_LEVEL?")
		require.ErrorContains(t, err, "did you mean AETHERIUM_API_LISTEN?")
	})

	t.Run("variables read elsewhere pass", func(t *testing.T) {
		for name := range OtherEnv {
			if name != "AETHERIUM_CONFIG" {
				t.Setenv(name, "1")
			}
		}
		t.Setenv("AETHERIUM_VMM_PROVIDER", "qemu")
		c, err := Load(p)
		require.NoError(t, err)
		require.Equal(t, "qemu", c.VMM.Provider)
	})
}

// TestNetworkAllowPrivate: private ranges are denied unless
// network.allow_private (or its environment variable) says otherwise, and
// wiring hands the setting to the network manager.
func TestNetworkAllowPrivate(t *testing.T) {
	t.Setenv("AETHERIUM_CONFIG", "")
	c, err := Load(writeFile(t, ""))
	require.NoError(t, err)
	require.False(t, c.Network.AllowPrivate, "denied by default")
	c, err = Load(writeFile(t, "network: {allow_private: true}\n"))
	require.NoError(t, err)
	require.True(t, c.Network.AllowPrivate)
	t.Setenv("AETHERIUM_NETWORK_ALLOW_PRIVATE", "true")
	c, err = Load(writeFile(t, ""))
	require.NoError(t, err)
	require.True(t, c.Network.AllowPrivate)
}
