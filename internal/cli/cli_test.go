package cli_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/cli"
	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/apikey"
	"github.com/aetherium/aetherium-core/pkg/network"
)

func TestMain(m *testing.M) { testenv.Main(m) }

type result struct {
	code           int
	stdout, stderr string
}

func run(t *testing.T, cfg string, stdin string, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	var in *strings.Reader
	if stdin != "" {
		in = strings.NewReader(stdin)
	}
	argv := append([]string{"--config", cfg}, args...)
	var code int
	if in != nil {
		code = cli.Main(argv, in, &out, &errb)
	} else {
		code = cli.Main(argv, nil, &out, &errb)
	}
	return result{code, out.String(), errb.String()}
}

// TestSession is the CLI-only session of the foundation issue, run against
// containers (docker) and real microVMs (qemu), in local mode (PostgreSQL
// and Redis directly) and in remote mode (through a real aether-api, with
// AETHERIUM_API_URL and AETHERIUM_API_KEY set). Both modes must print the
// same and exit with the same codes.
func TestSession(t *testing.T) {
	for _, provider := range []string{"docker", "qemu"} {
		for _, mode := range []string{"local", "remote"} {
			t.Run(provider+"/"+mode, func(t *testing.T) { testSession(t, provider, mode == "remote") })
		}
	}
}

// remote points the CLI at an aether-api over s, with a key of tenant
// "team-a", and returns the API.
func remote(t *testing.T, s *stack.Stack) *stack.API {
	api := s.StartAPI(t, stack.APIOptions{})
	t.Setenv("AETHERIUM_API_URL", api.URL)
	t.Setenv("AETHERIUM_API_KEY", api.Key(t, apikey.Options{Tenant: "team-a"}))
	return api
}

func testSession(t *testing.T, provider string, remoteMode bool) {
	s := stack.Start(t, stack.Options{Provider: provider})
	cfg := s.ConfigFile(t)
	tenant := ""
	if remoteMode {
		remote(t, s)
		tenant = "team-a"
	}

	r := run(t, cfg, "", "vm", "create", "--name", "cli-demo", "--wait")
	require.Equal(t, 0, r.code, r.stderr)
	vmID := strings.TrimSpace(r.stdout)
	require.Len(t, vmID, 36)

	r = run(t, cfg, "", "exec", vmID, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
	require.Equal(t, 3, r.code, r.stderr)
	require.Equal(t, "out\n", r.stdout)
	require.Equal(t, "err\n", r.stderr)

	r = run(t, cfg, "hello stdin\n", "exec", vmID, "--", "cat")
	require.Equal(t, 0, r.code, r.stderr)
	require.Equal(t, "hello stdin\n", r.stdout)

	r = run(t, cfg, "", "exec", "--env", "GREETING=hi", "--cwd", "/tmp", vmID, "--", "sh", "-c", `echo "$GREETING from $(pwd)"`)
	require.Equal(t, 0, r.code, r.stderr)
	require.Equal(t, "hi from /tmp\n", r.stdout)

	start := time.Now()
	r = run(t, cfg, "", "exec", "--timeout", "2s", vmID, "--", "sleep", "60")
	require.Equal(t, 124, r.code)
	require.Contains(t, r.stderr, "timed out")
	require.Less(t, time.Since(start), 5*time.Second)

	r = run(t, cfg, "", "--json", "executions", vmID)
	require.Equal(t, 0, r.code, r.stderr)
	var execs []map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &execs))
	require.Len(t, execs, 4)
	require.EqualValues(t, 3, execs[0]["exit_code"])
	require.EqualValues(t, 0, execs[1]["exit_code"])
	for _, k := range []string{"id", "vm_id", "command", "args", "exit_code", "stdout", "stderr", "stdout_truncated", "stderr_truncated", "started_at", "finished_at"} {
		require.Contains(t, execs[0], k)
	}
	r = run(t, cfg, "", "executions", vmID)
	require.Equal(t, 0, r.code)
	require.Contains(t, r.stdout, "timeout")

	r = run(t, cfg, "", "--json", "exec", vmID, "--", "sh", "-c", "echo json-out; exit 5")
	require.Equal(t, 5, r.code, r.stderr)
	var ex map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &ex))
	require.Equal(t, "json-out\n", ex["stdout"])
	require.EqualValues(t, 5, ex["exit_code"])

	// A missing program exits 127 and one that cannot be executed 126, as
	// in a shell, with the reason on stderr.
	r = run(t, cfg, "", "exec", vmID, "--", "nosuch")
	require.Equal(t, 127, r.code, r.stderr)
	require.Equal(t, "aetherium: nosuch: command not found\n", r.stderr)
	r = run(t, cfg, "", "exec", vmID, "--", "/etc/passwd")
	require.Equal(t, 126, r.code, r.stderr)
	require.Equal(t, "aetherium: /etc/passwd: permission denied\n", r.stderr)

	r = run(t, cfg, "", "--json", "vm", "get", vmID)
	require.Equal(t, 0, r.code)
	var vm map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &vm))
	for _, k := range []string{"id", "name", "state", "vcpus", "memory_mb", "provider", "error", "tenant", "expires_at"} {
		require.Contains(t, vm, k)
	}
	require.Equal(t, "running", vm["state"])
	require.Equal(t, provider, vm["provider"])
	require.Equal(t, tenant, vm["tenant"])
	require.Nil(t, vm["expires_at"])

	r = run(t, cfg, "", "vm", "ttl", vmID, "30m")
	require.Equal(t, 0, r.code, r.stderr)
	exp, err := time.Parse(time.RFC3339, strings.TrimSpace(r.stdout))
	require.NoError(t, err, r.stdout)
	require.WithinDuration(t, time.Now().Add(30*time.Minute), exp, time.Minute)
	r = run(t, cfg, "", "--json", "vm", "ttl", vmID, "1h")
	require.Equal(t, 0, r.code, r.stderr)
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &vm))
	require.NotNil(t, vm["expires_at"])
	r = run(t, cfg, "", "vm", "ttl", vmID, "soon")
	require.Equal(t, 2, r.code, r.stderr)

	testCopy(t, cfg, vmID)

	r = run(t, cfg, "", "job", "run", vmID, "--cmd", "echo one", "--cmd", "exit 4", "--cmd", "echo never", "--wait")
	require.Equal(t, 1, r.code, r.stderr)
	require.Contains(t, r.stdout, "exit 4")
	require.NotContains(t, r.stdout, "never")

	// --wait: deleting a VM while a worker still creates it races (the
	// delete can fail with "vm cannot go from failed to deleted").
	r = run(t, cfg, "", "--json", "vm", "create", "--name", "cli-ttl", "--ttl", "10m", "--wait")
	require.Equal(t, 0, r.code, r.stderr)
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &vm))
	exp, err = time.Parse(time.RFC3339Nano, vm["expires_at"].(string))
	require.NoError(t, err)
	require.WithinDuration(t, time.Now().Add(10*time.Minute), exp, time.Minute)
	r = run(t, cfg, "", "vm", "delete", vm["id"].(string), "--wait")
	require.Equal(t, 0, r.code, r.stderr)

	r = run(t, cfg, "", "vm", "list")
	require.Equal(t, 0, r.code)
	require.Contains(t, r.stdout, "cli-demo")

	r = run(t, cfg, "", "--json", "vm", "delete", vmID, "--wait")
	require.Equal(t, 0, r.code, r.stderr)
	var task map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &task))
	require.Equal(t, "succeeded", task["state"])
	r = run(t, cfg, "", "task", "wait", task["id"].(string))
	require.Equal(t, 0, r.code)

	left, err := s.VMMs["w1"].ListVMs(t.Context())
	require.NoError(t, err)
	require.Empty(t, left)
	entries, _ := os.ReadDir(s.SocketDirs["w1"])
	entries = slices.DeleteFunc(entries, func(e os.DirEntry) bool { return e.Name() == ".lock" }) // the qemu backend's run-dir lock
	require.Empty(t, entries, "the vm's host directory and agent socket must be gone")
	if docker, err := exec.LookPath("docker"); err == nil && provider == "docker" {
		out, err := exec.Command(docker, "-H", s.DockerHost, "ps", "-a", "--filter", "label=io.aetherium.vm-id="+vmID, "-q").CombinedOutput()
		require.NoError(t, err, string(out))
		require.Empty(t, strings.TrimSpace(string(out)), "a container of the vm remains")
	}

	if remoteMode {
		t.Setenv("AETHERIUM_API_KEY", "aek_0123456789abcdef_"+strings.Repeat("x", 43))
		r = run(t, cfg, "", "vm", "list")
		require.Equal(t, 1, r.code, r.stderr)
		require.Contains(t, r.stderr, "API key was refused")
		require.Contains(t, r.stderr, "AETHERIUM_API_KEY")
	}
}

// testCopy copies binary content into the VM and back, through files and
// through stdin and stdout.
func testCopy(t *testing.T, cfg, vmID string) {
	content := make([]byte, 3<<20+17)
	for i := range content {
		content[i] = byte(i*7 + i>>11)
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "blob.bin")
	require.NoError(t, os.WriteFile(src, content, 0o600))

	r := run(t, cfg, "", "cp", "--mkdir", "--mode", "0640", src, vmID+":/tmp/cp/in/blob.bin")
	require.Equal(t, 0, r.code, r.stderr)
	r = run(t, cfg, "", "exec", vmID, "--", "sh", "-c", "stat -c '%a %s' /tmp/cp/in/blob.bin")
	require.Equal(t, 0, r.code, r.stderr)
	require.Equal(t, fmt.Sprintf("640 %d\n", len(content)), r.stdout)

	out := filepath.Join(dir, "back.bin")
	r = run(t, cfg, "", "cp", vmID+":/tmp/cp/in/blob.bin", out)
	require.Equal(t, 0, r.code, r.stderr)
	got, err := os.ReadFile(out)
	require.NoError(t, err)
	require.True(t, bytes.Equal(content, got), "the file came back changed")

	r = run(t, cfg, "piped\x00bytes", "cp", "-", vmID+":/tmp/cp/stdin.bin")
	require.Equal(t, 0, r.code, r.stderr)
	r = run(t, cfg, "", "cp", vmID+":/tmp/cp/stdin.bin", "-")
	require.Equal(t, 0, r.code, r.stderr)
	require.Equal(t, "piped\x00bytes", r.stdout)

	// A missing file: an error, and no local file appears.
	r = run(t, cfg, "", "cp", vmID+":/tmp/cp/missing", filepath.Join(dir, "missing"))
	require.Equal(t, 1, r.code, r.stderr)
	require.NoFileExists(t, filepath.Join(dir, "missing"))
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Len(t, entries, 2, "no temporary file is left behind")
	r = run(t, cfg, "", "cp", src, "relative/path")
	require.Equal(t, 2, r.code, r.stderr)
}

func TestUsageAndErrors(t *testing.T) {
	for _, mode := range []string{"local", "remote"} {
		t.Run(mode, func(t *testing.T) { testUsageAndErrors(t, mode == "remote") })
	}
}

func testUsageAndErrors(t *testing.T, remoteMode bool) {
	s := stack.Start(t, stack.Options{})
	cfg := s.ConfigFile(t)
	if remoteMode {
		remote(t, s)
	}
	cases := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"unknown flag", []string{"vm", "list", "--bogus"}, 2, "unknown flag"},
		{"missing id", []string{"vm", "get"}, 2, "accepts 1 arg"},
		{"bad id", []string{"vm", "get", "nope"}, 2, "not a UUID"},
		{"unknown vm", []string{"vm", "get", "6f1c1b7e-9a3e-4b55-9a43-1c7f8b9f0e11"}, 1, "does not exist"},
		{"zero vcpus", []string{"vm", "create", "--name", "x", "--vcpus", "0"}, 2, "at least 1"},
		{"small memory", []string{"vm", "create", "--name", "x", "--memory", "16"}, 2, "at least 64 MiB"},
		{"bad name", []string{"vm", "create", "--name", "No_Good"}, 2, "lowercase"},
		{"no name", []string{"vm", "create"}, 2, "empty"},
		{"no command", []string{"exec", "6f1c1b7e-9a3e-4b55-9a43-1c7f8b9f0e11", "--"}, 2, "no command"},
		{"bad env", []string{"exec", "--env", "NOEQUALS", "6f1c1b7e-9a3e-4b55-9a43-1c7f8b9f0e11", "--", "true"}, 2, "KEY=VALUE"},
		{"cancel without id", []string{"task", "cancel"}, 2, "accepts 1 arg"},
		{"cancel bad id", []string{"task", "cancel", "nope"}, 2, `task id "nope" is not a UUID`},
		{"cancel unknown task", []string{"task", "cancel", "6f1c1b7e-9a3e-4b55-9a43-1c7f8b9f0e11"}, 1, "task 6f1c1b7e-9a3e-4b55-9a43-1c7f8b9f0e11 does not exist"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := run(t, cfg, "", tc.args...)
			require.Equal(t, tc.code, r.code, r.stderr)
			require.Contains(t, r.stderr, tc.want)
		})
	}
	r := run(t, cfg, "", "vm", "list")
	require.Equal(t, 0, r.code)
	require.NotContains(t, r.stdout, "x ", "invalid creates leave nothing behind")

	// task cancel: with no worker to take it, a create stays queued until
	// cancelled; cancelling it again says it had ended.
	s.Workers["w1"].Stop()
	r = run(t, cfg, "", "vm", "create", "--name", "to-cancel")
	require.Equal(t, 0, r.code, r.stderr)
	id := strings.TrimSpace(r.stdout)
	r = run(t, cfg, "", "task", "cancel", id)
	require.Equal(t, 0, r.code, r.stderr)
	require.Equal(t, "task "+id+" cancelled: failed (cancelled)\n", r.stdout)
	r = run(t, cfg, "", "task", "cancel", id)
	require.Equal(t, 0, r.code, r.stderr)
	require.Equal(t, "task "+id+" had already ended: failed (cancelled)\n", r.stdout)
}

func TestDoctor(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	cfg := s.ConfigFile(t)
	t.Setenv("AETHERIUM_VMM_DOCKER_HOST", s.DockerHost)
	t.Setenv("AETHERIUM_API_LISTEN", "127.0.0.1:"+strconv.Itoa(testenv.FreePort(t)))
	r := run(t, cfg, "", "doctor")
	require.Equal(t, 0, r.code, r.stdout+r.stderr)
	require.Contains(t, r.stdout, "postgresql")
	require.Contains(t, r.stdout, "worker w1")
	require.Regexp(t, `warn\s+aether-api`, r.stdout, "an API that is not running only warns")
	require.Contains(t, r.stdout, "make up")

	// In remote mode the API must answer.
	api := s.StartAPI(t, stack.APIOptions{})
	t.Setenv("AETHERIUM_API_URL", api.URL)
	t.Setenv("AETHERIUM_API_KEY", api.Key(t, apikey.Options{}))
	r = run(t, cfg, "", "doctor")
	require.Equal(t, 0, r.code, r.stdout+r.stderr)
	require.Regexp(t, `ok\s+aether-api\s`, r.stdout)
	require.Regexp(t, `ok\s+aether-api key`, r.stdout)
	t.Setenv("AETHERIUM_API_KEY", "wrong")
	r = run(t, cfg, "", "doctor")
	require.Equal(t, 1, r.code, r.stdout+r.stderr)
	require.Regexp(t, `FAIL\s+aether-api key\s+the API key was refused`, r.stdout)
	t.Setenv("AETHERIUM_API_URL", "http://127.0.0.1:"+strconv.Itoa(testenv.FreePort(t)))
	r = run(t, cfg, "", "doctor")
	require.Equal(t, 1, r.code, r.stdout+r.stderr)
	require.Regexp(t, `FAIL\s+aether-api`, r.stdout)
	r = run(t, cfg, "", "vm", "list")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stderr, "cannot reach aether-api")
	t.Setenv("AETHERIUM_API_URL", "")

	// PostgreSQL and Redis down: each failure comes with its fix.
	t.Setenv("AETHERIUM_STORAGE_PORT", strconv.Itoa(testenv.FreePort(t)))
	t.Setenv("AETHERIUM_QUEUE_REDIS_ADDR", "127.0.0.1:"+strconv.Itoa(testenv.FreePort(t)))
	r = run(t, cfg, "", "doctor")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stdout, "FAIL  postgresql")
	require.Contains(t, r.stdout, "FAIL  redis")
	require.Contains(t, r.stdout, "make services-up")

	r = run(t, cfg, "", "vm", "list")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stderr, "cannot reach PostgreSQL")
}

// TestDoctorBackends: doctor reports each microVM backend's prerequisites
// on this host, and for a missing one says what to do in the terms of the
// troubleshooting guide.
func TestDoctorBackends(t *testing.T) {
	testenv.GuestImage(t) // so the image checks have something to find
	cfg := stack.Start(t, stack.Options{}).ConfigFile(t)

	t.Setenv("AETHERIUM_VMM_PROVIDER", "qemu")
	r := run(t, cfg, "", "doctor")
	for _, want := range []string{"qemu accelerator", "qemu qemu", "QEMU emulator version", "qemu guest image"} {
		require.Contains(t, r.stdout, want)
	}
	require.NotContains(t, r.stdout, "FAIL  qemu", "this host has everything the qemu backend needs")

	// The agent rides a virtio-serial port: doctor no longer asks for
	// vhost-device-vsock. A missing QEMU fails with its fix.
	t.Setenv("AETHERIUM_VMM_QEMU_BINARY", "/nonexistent/qemu-system-x86_64")
	r = run(t, cfg, "", "doctor")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stdout, "FAIL  qemu qemu")
	require.Contains(t, r.stdout, "Worker can't create VMs")
	t.Setenv("AETHERIUM_VMM_QEMU_BINARY", "")

	t.Setenv("AETHERIUM_VMM_PROVIDER", "firecracker")
	t.Setenv("AETHERIUM_VMM_FIRECRACKER_BINARY", "/nonexistent/firecracker")
	r = run(t, cfg, "", "doctor")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stdout, "FAIL  firecracker firecracker binary")
	require.Contains(t, r.stdout, "Worker can't create VMs")
	require.Contains(t, r.stdout, "firecracker /dev/kvm")
	require.Contains(t, r.stdout, "hardware virtualization")
}

// TestSessionNetwork: `vm create --network nat` through the CLI, the
// service and a worker gives a real microVM an address on the bridge; the
// VM's delete returns its TAP, rules and lease. The bridge and rules live
// in a network namespace this test makes; nothing is routed out of it.
func TestSessionNetwork(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Skip(t, "VM networking needs root (CAP_NET_ADMIN); run the tests as root")
	}
	ns := testenv.NewNetns(t)
	s := stack.Start(t, stack.Options{Provider: "qemu", Network: &network.Config{
		Netns: testenv.NetnsPath(ns), Bridge: "aetcli0", Subnet: "10.99.0.0/24", Table: "aetcli",
	}})
	cfg := s.ConfigFile(t)

	r := run(t, cfg, "", "vm", "create", "--name", "net-demo", "--network", "nat", "--wait")
	require.Equal(t, 0, r.code, r.stderr)
	vmID := strings.TrimSpace(r.stdout)
	r = run(t, cfg, "", "--json", "vm", "get", vmID)
	require.Equal(t, 0, r.code, r.stderr)
	require.Contains(t, r.stdout, `"network": "nat"`)

	r = run(t, cfg, "", "exec", vmID, "--", "cat", "/proc/net/fib_trie", "/proc/net/route")
	require.Equal(t, 0, r.code, r.stderr)
	require.Contains(t, r.stdout, "10.99.0.2", "the guest holds the first address of the pool")
	require.Regexp(t, `eth0\s+00000000\s+0100630A`, r.stdout, "the default route goes through the bridge's 10.99.0.1")

	m := s.Networks["w1"]
	st, err := m.List(t.Context())
	require.NoError(t, err)
	require.Len(t, st.Ports, 1)
	require.Len(t, st.Leases, 1)

	r = run(t, cfg, "", "vm", "delete", vmID, "--wait")
	require.Equal(t, 0, r.code, r.stderr)
	st, err = m.List(t.Context())
	require.NoError(t, err)
	require.Empty(t, st.Ports, "the VM's TAP outlived its delete")
	require.Empty(t, st.VMRules, "the VM's rules outlived its delete")
	require.Empty(t, st.Leases, "the VM's address lease outlived its delete")
	require.NoError(t, m.Teardown(t.Context()))
}

// TestAPIKeys: keys are made, listed and revoked in local mode, and
// aether-api takes a new key at once and refuses it once revoked.
func TestAPIKeys(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	cfg := s.ConfigFile(t)
	api := s.StartAPI(t, stack.APIOptions{})

	r := run(t, cfg, "", "apikey", "create", "ci", "--tenant", "team-b", "--max-vms", "3")
	require.Equal(t, 0, r.code, r.stderr)
	key := strings.TrimSpace(r.stdout)
	require.True(t, strings.HasPrefix(key, apikey.Prefix), r.stdout)
	require.Equal(t, key+"\n", r.stdout, "the key alone, for $(...)")

	r = run(t, cfg, "", "--json", "apikey", "create", "admin-key", "--admin")
	require.Equal(t, 0, r.code, r.stderr)
	var created map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &created))
	for _, k := range []string{"id", "name", "tenant", "key", "created_at"} {
		require.Contains(t, created, k)
	}
	require.Equal(t, apikey.DefaultTenant, created["tenant"])
	require.Equal(t, created["id"], apikey.ID(created["key"].(string)))

	r = run(t, cfg, "", "apikey", "create", "bad/name")
	require.Equal(t, 2, r.code, r.stderr)

	r = run(t, cfg, "", "apikey", "list")
	require.Equal(t, 0, r.code, r.stderr)
	require.Contains(t, r.stdout, "team-b")
	require.Contains(t, r.stdout, "admin-key")
	r2 := run(t, cfg, "", "--json", "apikey", "list")
	require.Equal(t, 0, r2.code, r2.stderr)
	var keys []map[string]any
	require.NoError(t, json.Unmarshal([]byte(r2.stdout), &keys))
	require.Len(t, keys, 2)
	require.EqualValues(t, 3, keys[0]["limits"].(map[string]any)["max_vms"])
	for _, out := range []string{r.stdout, r2.stdout} {
		require.NotContains(t, out, key[len(apikey.Prefix)+17:], "list never shows a secret")
		require.NotContains(t, out, created["key"].(string)[len(apikey.Prefix)+17:])
	}

	// The new key works against the API at once.
	t.Setenv("AETHERIUM_API_URL", api.URL)
	t.Setenv("AETHERIUM_API_KEY", key)
	r = run(t, cfg, "", "vm", "list")
	require.Equal(t, 0, r.code, r.stderr)

	id := apikey.ID(key)
	r = run(t, cfg, "", "apikey", "revoke", id)
	require.Equal(t, 0, r.code, r.stderr)
	require.Equal(t, id+"\n", r.stdout)
	r = run(t, cfg, "", "apikey", "revoke", id)
	require.Equal(t, 0, r.code, "revoking twice is fine: %s", r.stderr)
	r = run(t, cfg, "", "apikey", "revoke", "0000000000000000")
	require.Equal(t, 1, r.code, r.stderr)
	require.Contains(t, r.stderr, "not found")

	r = run(t, cfg, "", "vm", "list")
	require.Equal(t, 1, r.code, r.stderr)
	require.Contains(t, r.stderr, "API key was refused")
	r = run(t, cfg, "", "--json", "apikey", "list")
	require.Equal(t, 0, r.code, r.stderr)
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &keys))
	require.NotNil(t, keys[0]["revoked_at"])
}

// TestExecInterrupt: Ctrl-C on `aether-cli exec` ends the remote command
// and exits 130, in both modes, as a real process gets the signal.
func TestExecInterrupt(t *testing.T) {
	bin := testenv.BuildBinary(t, "aether-cli")
	for _, mode := range []string{"local", "remote"} {
		t.Run(mode, func(t *testing.T) {
			s := stack.Start(t, stack.Options{})
			cfg := s.ConfigFile(t)
			if mode == "remote" {
				remote(t, s)
			}
			r := run(t, cfg, "", "vm", "create", "--name", "interrupt", "--wait")
			require.Equal(t, 0, r.code, r.stderr)
			vmID := strings.TrimSpace(r.stdout)

			cmd := exec.Command(bin, "--config", cfg, "exec", vmID, "--", "sh", "-c", "echo ready; exec sleep 60")
			stdout, err := cmd.StdoutPipe()
			require.NoError(t, err)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			require.NoError(t, cmd.Start())
			line, err := bufio.NewReader(stdout).ReadString('\n')
			require.NoError(t, err, stderr.String())
			require.Equal(t, "ready\n", line)
			start := time.Now()
			require.NoError(t, cmd.Process.Signal(os.Interrupt))
			err = cmd.Wait()
			var ee *exec.ExitError
			require.ErrorAs(t, err, &ee, stderr.String())
			require.Equal(t, 130, ee.ExitCode(), stderr.String())
			require.Less(t, time.Since(start), 10*time.Second)

			// The command was killed: the VM runs nothing more.
			r = run(t, cfg, "", "exec", vmID, "--", "sh", "-c", "ps | grep -c 'sleep 6[0]' || true")
			require.Equal(t, 0, r.code, r.stderr)
			require.Equal(t, "0\n", r.stdout)
		})
	}
}

// TestBadIDWithServicesDown: every command that takes an id checks it
// before connecting, so a mistyped id is reported as such (exit 2) even
// when PostgreSQL, Redis and aether-api are all down.
func TestBadIDWithServicesDown(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "aetherium.yaml")
	require.NoError(t, os.WriteFile(cfg, fmt.Appendf(nil, "storage:\n  host: 127.0.0.1\n  port: %d\nqueue:\n  redis_addr: 127.0.0.1:%d\n",
		testenv.FreePort(t), testenv.FreePort(t)), 0o600))
	const good = "6f1c1b7e-9a3e-4b55-9a43-1c7f8b9f0e11"
	for _, mode := range []string{"local", "remote"} {
		t.Run(mode, func(t *testing.T) {
			if mode == "remote" {
				t.Setenv("AETHERIUM_API_URL", "http://127.0.0.1:"+strconv.Itoa(testenv.FreePort(t)))
				t.Setenv("AETHERIUM_API_KEY", "aek_0123456789abcdef_"+strings.Repeat("x", 43))
			}
			// The control: with a well-formed id the command does try
			// the services, and fails because they are down.
			r := run(t, cfg, "", "vm", "get", good)
			require.Equal(t, 1, r.code, r.stderr)

			for _, args := range [][]string{
				{"vm", "get", "nope"},
				{"vm", "delete", "nope"},
				{"vm", "delete", "nope", "--wait"},
				{"vm", "stop", "nope"},
				{"vm", "start", "nope"},
				{"vm", "ttl", "nope", "10m"},
				{"exec", "nope", "--", "true"},
				{"executions", "nope"},
				{"job", "run", "nope", "--cmd", "true"},
				{"tools", "install", "nope", "node@22"},
				{"tools", "list", "nope"},
			} {
				t.Run(strings.Join(args, " "), func(t *testing.T) {
					start := time.Now()
					r := run(t, cfg, "", args...)
					require.Equal(t, 2, r.code, r.stderr)
					require.Contains(t, r.stderr, `vm id "nope" is not a UUID`)
					require.Less(t, time.Since(start), time.Second, "nothing was dialled")
				})
			}
			for _, args := range [][]string{{"task", "get", "nope"}, {"task", "wait", "nope"}, {"task", "cancel", "nope"}, {"job", "get", "nope"}} {
				t.Run(strings.Join(args, " "), func(t *testing.T) {
					r := run(t, cfg, "", args...)
					require.Equal(t, 2, r.code, r.stderr)
					require.Contains(t, r.stderr, `id "nope" is not a UUID`)
				})
			}
		})
	}
}
