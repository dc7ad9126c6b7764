// Package config loads Aetherium Core's configuration: one YAML file whose
// values environment variables named AETHERIUM_<SECTION>_<KEY> override.
// Zero values mean "use the default"; Load fills them in.
package config

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/agnivade/levenshtein"
	"gopkg.in/yaml.v3"

	"github.com/aetherium/aetherium-core/pkg/tools"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm/docker"
	"github.com/aetherium/aetherium-core/pkg/vmm/firecracker"
	"github.com/aetherium/aetherium-core/pkg/vmm/qemu"
)

// Config is the whole configuration file.
type Config struct {
	VMM     VMM     `yaml:"vmm"`
	Queue   Queue   `yaml:"queue"`
	Storage Storage `yaml:"storage"`
	Worker  Worker  `yaml:"worker"`
	Log     Log     `yaml:"log"`
	Network Network `yaml:"network"`
	API     API     `yaml:"api"`
	Cluster Cluster `yaml:"cluster"`
	Tools   Tools   `yaml:"tools"`
	// APIURL, when set, makes aether-cli's vm, exec, executions, cp and
	// task commands go over HTTP to this aether-api (e.g.
	// http://127.0.0.1:8080) instead of PostgreSQL and Redis
	// (AETHERIUM_API_URL).
	APIURL string `yaml:"api_url"`
	// APIKey authenticates aether-cli to APIURL (AETHERIUM_API_KEY).
	APIKey string `yaml:"api_key"`
}

// API configures aether-api, the HTTP front door.
type API struct {
	// Listen is the address the API serves on. Default 127.0.0.1:8080.
	Listen string `yaml:"listen"`
	// TLSCertFile and TLSKeyFile, both set, make the API serve HTTPS.
	TLSCertFile string `yaml:"tls_cert_file"`
	TLSKeyFile  string `yaml:"tls_key_file"`
	// MetricsDisabled turns GET /metrics off. Default false: served.
	MetricsDisabled bool `yaml:"metrics_disabled"`
	// MaxBodyBytes bounds a JSON request body. Default 8 MiB (room for
	// the 4 MiB of stdin a command may carry, base64-encoded).
	MaxBodyBytes int64 `yaml:"max_body_bytes"`
	// MaxFileBytes bounds one file upload. Default 1 GiB.
	MaxFileBytes int64 `yaml:"max_file_bytes"`
	// ReadHeaderTimeout bounds reading a request's headers. Default 10s.
	ReadHeaderTimeout time.Duration `yaml:"read_header_timeout"`
	// IdleTimeout closes idle keep-alive connections. Default 2m.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
	// ShutdownTimeout is how long SIGTERM lets requests in flight finish
	// before the API closes them. Default 30s.
	ShutdownTimeout time.Duration `yaml:"shutdown_timeout"`
	// Limits apply to every tenant unless its key overrides them; zero
	// fields mean no limit.
	Limits types.Limits `yaml:"limits"`
	// MaxTTL bounds ttl_seconds. Default: no bound.
	MaxTTL time.Duration `yaml:"max_ttl"`
	// ReadyFile, when set, is written once the API serves (used by
	// `make up`).
	ReadyFile string `yaml:"ready_file"`
	// E2BDomain is the domain of the E2B-compatible API (docs/e2b.md):
	// answered as each sandbox's domain, and requests for the host
	// 49983-<sandbox id>.<E2BDomain> are served as that sandbox's envd,
	// for clients with wildcard DNS that leave E2B_SANDBOX_URL unset.
	// Empty: no host routing (clients set E2B_SANDBOX_URL).
	E2BDomain string `yaml:"e2b_domain"`
}

// Cluster holds what the API and the workers share.
type Cluster struct {
	// Token authenticates the API to the workers' data planes (file
	// transfer). Every API and worker of one deployment needs the same
	// value; `make up` generates one. Empty: no data plane, so files
	// cannot be moved.
	Token string `yaml:"token"`
}

// VMM selects and configures the VM backend.
type VMM struct {
	// Provider is the backend: docker (the test fallback), qemu or firecracker.
	Provider string `yaml:"provider"`
	// MaxOutputBytes caps what is kept of each command's stdout and stderr.
	// Default 1 MiB.
	MaxOutputBytes int `yaml:"max_output_bytes"`
	// MaxVCPUs is the most vCPUs a VM may ask for. Default: the host's CPUs.
	MaxVCPUs int `yaml:"max_vcpus"`
	// ImageDir is the guest image cache that `aether-cli image build`
	// fills; the qemu and firecracker backends boot its newest image unless
	// their own paths are set. Default /var/cache/aetherium.
	ImageDir string `yaml:"image_dir"`
	// Docker configures the docker backend.
	Docker Docker `yaml:"docker"`
	// QEMU configures the qemu backend.
	QEMU QEMU `yaml:"qemu"`
	// Firecracker configures the firecracker backend.
	Firecracker Firecracker `yaml:"firecracker"`
}

// The backend sections are the backends' own config structs: each backend
// owns its fields, their comments and its defaults (one exported constant
// per default), and its yaml tags are the section's keys, so there is no
// copy here to keep in step. Fields tagged yaml:"-" (the owner, logger,
// network manager, vCPU limit) are set by internal/wiring.
type (
	// Firecracker configures the firecracker backend (docs/firecracker.md).
	Firecracker = firecracker.Config
	// FirecrackerJailer configures Firecracker's jailer (its docs/jailer.md).
	FirecrackerJailer = firecracker.JailerConfig
	// QEMU configures the qemu backend (QEMU's microvm machine).
	QEMU = qemu.Config
	// Docker configures the docker backend.
	Docker = docker.Config
)

// Network configures VM networking for the qemu and firecracker backends:
// a TAP per VM on a bridge, addresses from a pool kept in PostgreSQL, NAT
// out of the uplink, and isolation rules in an nftables table of our own.
type Network struct {
	// Enabled gives new VMs a network by default (--network nat). Default
	// false: VMs have no network unless created with --network nat.
	Enabled bool `yaml:"enabled"`
	// Bridge is the bridge the TAPs join. Default aeth0.
	Bridge string `yaml:"bridge"`
	// Subnet is the VMs' IPv4 subnet; the bridge takes its first address
	// as the gateway. Default 10.88.0.0/16.
	Subnet string `yaml:"subnet"`
	// Uplink is the interface VM traffic is masqueraded out of. Empty: no
	// NAT (VMs reach only the bridge's side).
	Uplink string `yaml:"uplink"`
	// DNS servers written to the guests' /etc/resolv.conf. Default none.
	DNS []string `yaml:"dns"`
	// EgressDeny and EgressAllow are CIDRs VMs may not / may reach; when
	// EgressAllow is set, everything else is denied.
	EgressDeny  []string `yaml:"egress_deny"`
	EgressAllow []string `yaml:"egress_allow"`
	// AllowPrivate lets VMs reach private ranges (10/8, 172.16/12,
	// 192.168/16, 100.64/10). Default false: they are denied, like
	// 169.254/16 and the host's own addresses, so a guest cannot probe the
	// operator's internal network; EgressAllow can still open one range.
	AllowPrivate bool `yaml:"allow_private"`
	// Netns is the network namespace holding the bridge, TAPs and NAT, and
	// where VMM processes run, e.g. /var/run/netns/aeth. Default: the host's.
	Netns string `yaml:"netns"`
	// Table is the name of our nftables tables. Default aetherium.
	Table string `yaml:"table"`
	// Pool names this bridge's address pool in PostgreSQL. Default
	// <hostname>/<bridge>.
	Pool string `yaml:"pool"`
}

// Queue configures the task queue.
type Queue struct {
	// Provider is the queue implementation; only redis (Asynq) exists.
	Provider string `yaml:"provider"`
	// RedisAddr is host:port of Redis. Default 127.0.0.1:6379.
	RedisAddr string `yaml:"redis_addr"`
	// RedisPassword authenticates to Redis when set.
	RedisPassword string `yaml:"redis_password"`
	// RedisDB is the Redis database number. Default 0.
	RedisDB int `yaml:"redis_db"`
	// TaskCheckInterval is how often an idle worker polls Redis for tasks; it
	// bounds the queueing delay of every task (see docs/architecture.md).
	// Default 5ms.
	TaskCheckInterval time.Duration `yaml:"task_check_interval"`
}

// Storage configures the state store.
type Storage struct {
	// Provider is the store; only postgres exists.
	Provider string `yaml:"provider"`
	// Host of PostgreSQL. Default localhost.
	Host string `yaml:"host"`
	// Port of PostgreSQL. Default 5432.
	Port int `yaml:"port"`
	// Database name. Default aetherium.
	Database string `yaml:"database"`
	// User name. Default aetherium.
	User string `yaml:"user"`
	// Password of User.
	Password string `yaml:"password"`
	// SSLMode is libpq's sslmode. Default disable.
	SSLMode string `yaml:"sslmode"`
}

// Worker configures the worker daemon.
type Worker struct {
	// ID names this worker; the VMs it creates belong to it and their later
	// tasks go to its own queue. Default: the hostname.
	ID string `yaml:"id"`
	// Concurrency is how many tasks run at once. Default 10.
	Concurrency int `yaml:"concurrency"`
	// AutoMigrate applies database migrations at start. Default false.
	AutoMigrate bool `yaml:"auto_migrate"`
	// ShutdownTimeout is how long SIGTERM waits for tasks in flight before
	// they are requeued. Default 30s.
	ShutdownTimeout time.Duration `yaml:"shutdown_timeout"`
	// HeartbeatInterval is how often the worker records itself. Default 5s.
	HeartbeatInterval time.Duration `yaml:"heartbeat_interval"`
	// DeadAfter is how long a worker may go without a heartbeat before it
	// counts as dead: its VMs become lost, their queued tasks fail, calls
	// on them answer at once saying so, and `aether-cli workers` shows it
	// unhealthy. The API and CLI use it too (it is checked when a call
	// arrives). Must be longer than heartbeat_interval. Default 60s.
	DeadAfter time.Duration `yaml:"dead_after"`
	// SnapshotDir is where the worker keeps the files of its snapshots
	// and templates. Default /var/lib/aetherium/snapshots.
	SnapshotDir string `yaml:"snapshot_dir"`
	// ReadyFile, when set, is written once the worker serves tasks (used by
	// `make up` to know the worker is ready).
	ReadyFile string `yaml:"ready_file"`
	// DataListen is where the worker's data plane (file transfer straight
	// to its VMs, authenticated with cluster.token) listens. Default
	// 127.0.0.1:9465; "off" disables it. Port 0 picks a free port.
	DataListen string `yaml:"data_listen"`
	// DataAdvertise is the host:port the API reaches the data plane at,
	// recorded with the worker's heartbeat. Default: the bound address of
	// DataListen (set it when that is a wildcard such as 0.0.0.0).
	DataAdvertise string `yaml:"data_advertise"`
	// MetricsListen is where the worker serves Prometheus metrics on
	// /metrics. Default 127.0.0.1:9464; "off" disables it.
	MetricsListen string `yaml:"metrics_listen"`
	// ExpiryInterval is how often the worker looks for expired VMs it
	// owns. Default 1s.
	ExpiryInterval time.Duration `yaml:"expiry_interval"`
}

// Tools configures tool provisioning with mise (pkg/tools, docs/tools.md):
// workers install the tools VMs ask for into a host cache and deliver them
// read-only.
type Tools struct {
	// Defaults are tool specs every VM gets, after its own, e.g.
	// [node@22, "npm:prettier@3"] (AETHERIUM_TOOLS_DEFAULTS, comma
	// separated). Default none: VMs get tools only when they ask.
	Defaults []string `yaml:"defaults"`
	// CacheDir is the tool cache. Tools are mounted in guests at the very
	// path they were installed to (mise installs hold absolute paths), so
	// it must be a path guests can use too. Default /opt/aetherium/tools.
	CacheDir string `yaml:"cache_dir"`
	// MiseBinary is the mise binary, a path or a name in PATH. Default
	// mise (scripts/setup.sh installs /usr/local/bin/mise).
	MiseBinary string `yaml:"mise_binary"`
	// Env holds mise's own settings passed to every mise run, e.g.
	// MISE_NPM_PACKAGE_MANAGER: npm or a mirror URL
	// (AETHERIUM_TOOLS_ENV=K=V,K2=V2). It may not set the variables the
	// cache pins (MISE_DATA_DIR, MISE_CACHE_DIR, MISE_CONFIG_DIR,
	// MISE_STATE_DIR, MISE_YES). Default none.
	Env map[string]string `yaml:"env"`
	// AllowPrivateURLs lets tool specs fetch from loopback, link-local and
	// private addresses (e.g. http:NAME[url=http://10.0.0.5/...]), for a
	// trusted mirror on the worker's network. Default false: mise runs on
	// the worker's host, and a caller's spec must not make it fetch the
	// host's own services or a cloud metadata endpoint.
	AllowPrivateURLs bool `yaml:"allow_private_urls"`
}

// Log configures logging.
type Log struct {
	// Level is debug, info, warn or error. Default info.
	Level string `yaml:"level"`
	// Format is text or json. Default text.
	Format string `yaml:"format"`
}

// EnvPrefix starts every overriding environment variable.
const EnvPrefix = "AETHERIUM_"

// DeadAfterDefault is worker.dead_after's default.
const DeadAfterDefault = 60 * time.Second

// Path finds the configuration file: explicit (from --config), then
// $AETHERIUM_CONFIG, then ./aetherium.yaml, then
// ~/.config/aetherium/config.yaml. It returns "" when none exists and none
// was named explicitly.
func Path(explicit string) string {
	if explicit != "" {
		return explicit
	}
	if p := os.Getenv("AETHERIUM_CONFIG"); p != "" {
		return p
	}
	candidates := []string{"aetherium.yaml"}
	if home, err := os.UserHomeDir(); err == nil {
		candidates = append(candidates, filepath.Join(home, ".config", "aetherium", "config.yaml"))
	}
	for _, c := range candidates {
		if _, err := os.Stat(c); err == nil {
			return c
		}
	}
	return ""
}

// Load reads the file found by Path(explicit) (none is fine: defaults and
// environment apply), applies environment overrides, fills defaults and
// validates. An AETHERIUM_* variable that is neither a key nor in
// OtherEnv fails, as an unknown key in the file does. Errors wrap
// types.ErrInvalid.
func Load(explicit string) (*Config, error) {
	var c Config
	if p := Path(explicit); p != "" {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("%w: reading config %s: %v", types.ErrInvalid, p, err)
		}
		dec := yaml.NewDecoder(strings.NewReader(string(b)))
		dec.KnownFields(true)
		// An empty file decodes to io.EOF: that is fine, defaults apply.
		if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%w: parsing config %s: %v", types.ErrInvalid, p, err)
		}
	}
	keys := map[string]bool{}
	if err := applyEnv(reflect.ValueOf(&c).Elem(), strings.TrimSuffix(EnvPrefix, "_"), os.LookupEnv, keys); err != nil {
		return nil, err
	}
	if err := checkEnv(os.Environ(), keys); err != nil {
		return nil, err
	}
	c.setDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

func (c *Config) setDefaults() {
	c.VMM.Provider = cmp.Or(c.VMM.Provider, "docker")
	c.VMM.MaxOutputBytes = cmp.Or(c.VMM.MaxOutputBytes, types.DefaultMaxOutputBytes)
	c.VMM.Docker.BusyboxPath = cmp.Or(c.VMM.Docker.BusyboxPath, docker.DefaultBusyboxPath)
	c.VMM.Docker.SocketDir = cmp.Or(c.VMM.Docker.SocketDir, docker.DefaultSocketDir)
	c.VMM.ImageDir = cmp.Or(c.VMM.ImageDir, "/var/cache/aetherium")
	c.VMM.QEMU.Binary = cmp.Or(c.VMM.QEMU.Binary, qemu.DefaultBinary)
	c.VMM.QEMU.VsockBinary = cmp.Or(c.VMM.QEMU.VsockBinary, qemu.DefaultVsockBinary)
	c.VMM.QEMU.Accel = cmp.Or(c.VMM.QEMU.Accel, qemu.AccelAuto)
	c.VMM.QEMU.RunDir = cmp.Or(c.VMM.QEMU.RunDir, qemu.DefaultRunDir)
	c.VMM.Firecracker.Binary = cmp.Or(c.VMM.Firecracker.Binary, firecracker.DefaultBinary)
	c.VMM.Firecracker.SocketDir = cmp.Or(c.VMM.Firecracker.SocketDir, firecracker.DefaultSocketDir)
	c.VMM.Firecracker.Jailer.Binary = cmp.Or(c.VMM.Firecracker.Jailer.Binary, firecracker.DefaultJailerBinary)
	c.VMM.Firecracker.Jailer.ChrootBaseDir = cmp.Or(c.VMM.Firecracker.Jailer.ChrootBaseDir, firecracker.DefaultChrootBaseDir)
	c.VMM.Firecracker.Jailer.CgroupVersion = cmp.Or(c.VMM.Firecracker.Jailer.CgroupVersion, firecracker.HostCgroupVersion())
	c.Network.Bridge = cmp.Or(c.Network.Bridge, "aeth0")
	c.Network.Subnet = cmp.Or(c.Network.Subnet, "10.88.0.0/16")
	c.Network.Table = cmp.Or(c.Network.Table, "aetherium")
	c.Queue.Provider = cmp.Or(c.Queue.Provider, "redis")
	c.Queue.RedisAddr = cmp.Or(c.Queue.RedisAddr, "127.0.0.1:6379")
	c.Queue.TaskCheckInterval = cmp.Or(c.Queue.TaskCheckInterval, 5*time.Millisecond)
	c.Storage.Provider = cmp.Or(c.Storage.Provider, "postgres")
	c.Storage.Host = cmp.Or(c.Storage.Host, "localhost")
	c.Storage.Port = cmp.Or(c.Storage.Port, 5432)
	c.Storage.Database = cmp.Or(c.Storage.Database, "aetherium")
	c.Storage.User = cmp.Or(c.Storage.User, "aetherium")
	c.Storage.SSLMode = cmp.Or(c.Storage.SSLMode, "disable")
	if c.Worker.ID == "" {
		h, _ := os.Hostname()
		c.Worker.ID = SanitizeWorkerID(h)
	}
	c.Worker.Concurrency = cmp.Or(c.Worker.Concurrency, 10)
	c.Worker.ShutdownTimeout = cmp.Or(c.Worker.ShutdownTimeout, 30*time.Second)
	c.Worker.HeartbeatInterval = cmp.Or(c.Worker.HeartbeatInterval, 5*time.Second)
	c.Worker.DeadAfter = cmp.Or(c.Worker.DeadAfter, DeadAfterDefault)
	c.Worker.SnapshotDir = cmp.Or(c.Worker.SnapshotDir, "/var/lib/aetherium/snapshots")
	c.Worker.DataListen = cmp.Or(c.Worker.DataListen, "127.0.0.1:9465")
	c.Worker.MetricsListen = cmp.Or(c.Worker.MetricsListen, "127.0.0.1:9464")
	c.Worker.ExpiryInterval = cmp.Or(c.Worker.ExpiryInterval, time.Second)
	c.API.Listen = cmp.Or(c.API.Listen, "127.0.0.1:8080")
	c.API.MaxBodyBytes = cmp.Or(c.API.MaxBodyBytes, 8<<20)
	c.API.MaxFileBytes = cmp.Or(c.API.MaxFileBytes, 1<<30)
	c.API.ReadHeaderTimeout = cmp.Or(c.API.ReadHeaderTimeout, 10*time.Second)
	c.API.IdleTimeout = cmp.Or(c.API.IdleTimeout, 2*time.Minute)
	c.API.ShutdownTimeout = cmp.Or(c.API.ShutdownTimeout, 30*time.Second)
	c.Tools.CacheDir = cmp.Or(c.Tools.CacheDir, tools.DefaultRoot)
	c.Tools.MiseBinary = cmp.Or(c.Tools.MiseBinary, tools.MiseBinaryDefault)
	c.Log.Level = cmp.Or(c.Log.Level, "info")
	c.Log.Format = cmp.Or(c.Log.Format, "text")
}

var workerIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// SanitizeWorkerID turns a hostname into a valid worker id.
func SanitizeWorkerID(s string) string {
	s = regexp.MustCompile(`[^A-Za-z0-9._-]`).ReplaceAllString(s, "-")
	s = strings.TrimLeft(s, "._-")
	if len(s) > 63 {
		s = s[:63]
	}
	return cmp.Or(s, "worker")
}

// ValidateWorkerID checks a worker id (it becomes part of a queue name).
func ValidateWorkerID(id string) error {
	if !workerIDRE.MatchString(id) {
		return fmt.Errorf("%w: worker.id %q must be 1-63 characters of [A-Za-z0-9._-]", types.ErrInvalid, id)
	}
	return nil
}

// Validate checks values that defaults cannot fix.
func (c *Config) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: config: %s", types.ErrInvalid, fmt.Sprintf(format, a...))
	}
	switch c.VMM.Provider {
	case "docker", "qemu", "firecracker":
	default:
		return bad("vmm.provider %q is unknown; use docker, qemu or firecracker", c.VMM.Provider)
	}
	switch c.VMM.QEMU.Accel {
	case "auto", "kvm", "tcg":
	default:
		return bad("vmm.qemu.accel %q is unknown; use auto, kvm or tcg", c.VMM.QEMU.Accel)
	}
	if j := c.VMM.Firecracker.Jailer; j.On() && j.NetNS != "" && j.NetNS != c.Network.Netns {
		return bad("vmm.firecracker.jailer.netns %q differs from network.netns %q: the VMM must run where its TAP is; set both to the same namespace or leave jailer.netns empty", j.NetNS, c.Network.Netns)
	}
	if v := c.VMM.Firecracker.Jailer.CgroupVersion; v != 1 && v != 2 {
		return bad("vmm.firecracker.jailer.cgroup_version %d: use 1 or 2", v)
	}
	if _, err := netip.ParsePrefix(c.Network.Subnet); err != nil {
		return bad("network.subnet %q is not a CIDR such as 10.88.0.0/16", c.Network.Subnet)
	}
	for _, cidr := range append(append([]string{}, c.Network.EgressDeny...), c.Network.EgressAllow...) {
		if _, err := netip.ParsePrefix(cidr); err != nil {
			return bad("network egress entry %q is not a CIDR such as 192.0.2.0/24", cidr)
		}
	}
	for _, d := range c.Network.DNS {
		if _, err := netip.ParseAddr(d); err != nil {
			return bad("network.dns entry %q is not an IP address", d)
		}
	}
	if c.VMM.QEMU.ReadyTimeout < 0 {
		return bad("vmm.qemu.ready_timeout must not be negative")
	}
	if c.Queue.Provider != "redis" {
		return bad("queue.provider %q is unknown; only redis is supported", c.Queue.Provider)
	}
	if _, _, err := net.SplitHostPort(c.Queue.RedisAddr); err != nil {
		return bad("queue.redis_addr %q must be host:port", c.Queue.RedisAddr)
	}
	if c.Storage.Provider != "postgres" {
		return bad("storage.provider %q is unknown; only postgres is supported", c.Storage.Provider)
	}
	if c.Storage.Port < 1 || c.Storage.Port > 65535 {
		return bad("storage.port %d is out of range 1-65535", c.Storage.Port)
	}
	if c.VMM.MaxOutputBytes < 0 || c.VMM.MaxVCPUs < 0 || c.Worker.Concurrency < 0 || c.Queue.RedisDB < 0 {
		return bad("vmm.max_output_bytes, vmm.max_vcpus, worker.concurrency and queue.redis_db must not be negative")
	}
	for name, addr := range map[string]string{"api.listen": c.API.Listen, "worker.data_listen": c.Worker.DataListen, "worker.metrics_listen": c.Worker.MetricsListen} {
		if addr == "off" && name != "api.listen" {
			continue
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return bad("%s %q must be host:port such as 127.0.0.1:8080", name, addr)
		}
	}
	if c.Worker.DataAdvertise != "" {
		if _, _, err := net.SplitHostPort(c.Worker.DataAdvertise); err != nil {
			return bad("worker.data_advertise %q must be host:port", c.Worker.DataAdvertise)
		}
	}
	if c.Worker.DeadAfter <= c.Worker.HeartbeatInterval {
		return bad("worker.dead_after %s must be longer than worker.heartbeat_interval %s (a live worker would be taken for dead between two heartbeats); raise it, e.g. to %s", c.Worker.DeadAfter, c.Worker.HeartbeatInterval, 12*c.Worker.HeartbeatInterval)
	}
	if (c.API.TLSCertFile == "") != (c.API.TLSKeyFile == "") {
		return bad("api.tls_cert_file and api.tls_key_file must be set together")
	}
	if c.API.MaxBodyBytes < 0 || c.API.MaxFileBytes < 0 || c.API.MaxTTL < 0 || c.Worker.ExpiryInterval < 0 {
		return bad("api.max_body_bytes, api.max_file_bytes, api.max_ttl and worker.expiry_interval must not be negative")
	}
	if !filepath.IsAbs(c.Tools.CacheDir) || filepath.Clean(c.Tools.CacheDir) == "/" {
		return bad("tools.cache_dir %q must be an absolute path other than /, e.g. %s", c.Tools.CacheDir, tools.DefaultRoot)
	}
	if _, err := tools.ParseSpecs(c.Tools.Defaults); err != nil {
		return bad("tools.defaults: %v", err)
	}
	if err := c.API.Limits.Validate(); err != nil {
		return bad("api.limits: %v", err)
	}
	if c.APIURL != "" {
		u, err := url.Parse(c.APIURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return bad("api_url %q must be an http:// or https:// URL such as http://127.0.0.1:8080", c.APIURL)
		}
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		return bad("log.level %q is unknown; use debug, info, warn or error", c.Log.Level)
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		return bad("log.format %q is unknown; use text or json", c.Log.Format)
	}
	return ValidateWorkerID(c.Worker.ID)
}

// DSN returns the PostgreSQL connection URL of the storage section.
func (s Storage) DSN() string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.UserPassword(s.User, s.Password),
		Host:     net.JoinHostPort(s.Host, strconv.Itoa(s.Port)),
		Path:     "/" + s.Database,
		RawQuery: url.Values{"sslmode": {s.SSLMode}}.Encode(),
	}
	if s.Password == "" {
		u.User = url.User(s.User)
	}
	return u.String()
}

// applyEnv walks the struct, overriding each yaml-tagged leaf from
// PREFIX_<PATH> where PATH joins the yaml keys in upper case with '_'.
// It adds every such name to keys, set or not.
func applyEnv(v reflect.Value, prefix string, lookup func(string) (string, bool), keys map[string]bool) error {
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := strings.Split(f.Tag.Get("yaml"), ",")[0]
		if tag == "" || tag == "-" {
			continue
		}
		name := prefix + "_" + strings.ToUpper(tag)
		fv := v.Field(i)
		if fv.Kind() == reflect.Struct {
			if err := applyEnv(fv, name, lookup, keys); err != nil {
				return err
			}
			continue
		}
		keys[name] = true
		raw, ok := lookup(name)
		if !ok {
			continue
		}
		if err := setValue(fv, raw); err != nil {
			return fmt.Errorf("%w: environment variable %s=%q: %v", types.ErrInvalid, name, raw, err)
		}
	}
	return nil
}

// OtherEnv lists the AETHERIUM_* variables that are not configuration
// keys but are read elsewhere, so that Load accepts them in its
// environment. Add a variable here when something new reads one.
var OtherEnv = map[string]string{
	"AETHERIUM_CONFIG":             "the configuration file (Path)",
	types.ToolsRootEnv:             "the guest's tool volume root, given to the docker guest's agent",
	"AETHERIUM_IMAGE_DIR":          "the guest image cache of `aether-cli image` (pkg/image.CacheDirEnv)",
	"AETHERIUM_STATE_DIR":          "where scripts/services.sh and up.sh keep data, logs and pids",
	"AETHERIUM_PG_PORT":            "scripts/services.sh and up.sh: PostgreSQL's port",
	"AETHERIUM_REDIS_PORT":         "scripts/services.sh and up.sh: Redis's port",
	"AETHERIUM_PG_BIN":             "scripts/services.sh: directory of initdb and pg_ctl",
	"AETHERIUM_API_PORT":           "scripts/up.sh: the port written as api.listen",
	"AETHERIUM_MISE_SOURCE":        "scripts/setup.sh: where mise is fetched from",
	"AETHERIUM_MISE_INTEGRITY":     "scripts/setup.sh: the integrity of AETHERIUM_MISE_SOURCE",
	"AETHERIUM_TEST_REQUIRE":       "tests: turn skips for missing services into failures (internal/testenv)",
	"AETHERIUM_TEST_FAULT_DIR":     "tests: where a worker's fault points meet the chaos suite (internal/faults)",
	"AETHERIUM_TEST_FAULT_POINTS":  "tests: the fault points a worker stops at (internal/faults)",
	"AETHERIUM_BENCH_PROVIDER":     "tests: the backend of pkg/worker's tool benchmark",
	"AETHERIUM_FIRECRACKER_SPEC":   "tests: the Firecracker API spec the fake checks against",
	"AETHERIUM_FIRECRACKER_BIN":    "tests: the real-Firecracker suite's binary",
	"AETHERIUM_FIRECRACKER_KERNEL": "tests: the real-Firecracker suite's kernel",
	"AETHERIUM_FIRECRACKER_INITRD": "tests: the real-Firecracker suite's initramfs",
	"AETHERIUM_FIRECRACKER_ROOTFS": "tests: the real-Firecracker suite's root file system",
	"AETHERIUM_AGENT_REAPER_CHILD": "tests: marks pkg/agent's re-executed reaper test",
	"AETHERIUM_NETWORK_TEST_CHILD": "tests: marks pkg/network's re-executed test",
	"AETHERIUM_QEMU_NET_CHILD":     "tests: marks pkg/vmm/qemu's re-executed network test",
}

// checkEnv fails on AETHERIUM_* variables in environ that are neither in
// keys nor in OtherEnv: most likely a misspelt key, which would
// otherwise be ignored without a word. It names the closest known name.
func checkEnv(environ []string, keys map[string]bool) error {
	var errs []error
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(name, EnvPrefix) || keys[name] {
			continue
		}
		if _, ok := OtherEnv[name]; ok {
			continue
		}
		hint := "; unset it, or name a key as AETHERIUM_<SECTION>_<KEY> (vmm.provider is AETHERIUM_VMM_PROVIDER; aetherium.example.yaml lists the keys)"
		if near := closest(name, keys); near != "" {
			hint = fmt.Sprintf("; did you mean %s?", near)
		}
		errs = append(errs, fmt.Errorf("%w: environment variable %s is not a configuration key%s", types.ErrInvalid, name, hint))
	}
	return errors.Join(errs...)
}

// closest returns the key or OtherEnv name nearest to name, if it is
// near enough to be a typo: edits to at most a quarter of the characters
// after the prefix.
func closest(name string, keys map[string]bool) string {
	known := slices.Sorted(maps.Keys(keys))
	known = append(known, slices.Sorted(maps.Keys(OtherEnv))...)
	best, bestDist := "", len(strings.TrimPrefix(name, EnvPrefix))/4+1
	for _, k := range known {
		if d := levenshtein.ComputeDistance(name, k); d < bestDist {
			best, bestDist = k, d
		}
	}
	return best
}

func setValue(fv reflect.Value, raw string) error {
	switch {
	case fv.Type() == reflect.TypeOf(time.Duration(0)):
		d, err := time.ParseDuration(raw)
		if err != nil {
			return fmt.Errorf("not a duration such as 5s or 100ms")
		}
		fv.SetInt(int64(d))
	case fv.Kind() == reflect.String:
		fv.SetString(raw)
	case fv.Kind() == reflect.Int:
		n, err := strconv.Atoi(raw)
		if err != nil {
			return fmt.Errorf("not a whole number")
		}
		fv.SetInt(int64(n))
	case fv.Kind() == reflect.Bool:
		b, err := strconv.ParseBool(raw)
		if err != nil {
			return fmt.Errorf("not a boolean (true or false)")
		}
		fv.SetBool(b)
	case fv.Type() == reflect.TypeOf((*bool)(nil)):
		// An optional boolean (nil: its default); set from the
		// environment it is no longer the default.
		b, err := strconv.ParseBool(raw)
		if err != nil {
			return fmt.Errorf("not a boolean (true or false)")
		}
		fv.Set(reflect.ValueOf(&b))
	case fv.Type() == reflect.TypeOf(map[string]string(nil)):
		// Comma-separated KEY=VALUE pairs; empty means none.
		m := map[string]string{}
		for _, item := range strings.Split(raw, ",") {
			if item = strings.TrimSpace(item); item == "" {
				continue
			}
			k, v, ok := strings.Cut(item, "=")
			if !ok || k == "" {
				return fmt.Errorf("%q is not KEY=VALUE; write KEY=VALUE pairs separated by commas", item)
			}
			m[k] = v
		}
		fv.Set(reflect.ValueOf(m))
	case fv.Type() == reflect.TypeOf([]string(nil)):
		// A comma-separated list; empty means none.
		var list []string
		for _, item := range strings.Split(raw, ",") {
			if item = strings.TrimSpace(item); item != "" {
				list = append(list, item)
			}
		}
		fv.Set(reflect.ValueOf(list))
	default:
		return fmt.Errorf("unsupported field type %s", fv.Type())
	}
	return nil
}
