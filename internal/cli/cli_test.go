package cli_test

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/cli"
	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
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
// containers (docker) and real microVMs (qemu).
func TestSession(t *testing.T) {
	for _, provider := range []string{"docker", "qemu"} {
		t.Run(provider, func(t *testing.T) { testSession(t, provider) })
	}
}

func testSession(t *testing.T, provider string) {
	s := stack.Start(t, stack.Options{Provider: provider})
	cfg := s.ConfigFile(t)

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

	r = run(t, cfg, "", "--json", "vm", "get", vmID)
	require.Equal(t, 0, r.code)
	var vm map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &vm))
	for _, k := range []string{"id", "name", "state", "vcpus", "memory_mb", "provider", "error"} {
		require.Contains(t, vm, k)
	}
	require.Equal(t, "running", vm["state"])
	require.Equal(t, provider, vm["provider"])

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
}

func TestUsageAndErrors(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	cfg := s.ConfigFile(t)
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
}

func TestDoctor(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	cfg := s.ConfigFile(t)
	t.Setenv("AETHERIUM_VMM_DOCKER_HOST", s.DockerHost)
	r := run(t, cfg, "", "doctor")
	require.Equal(t, 0, r.code, r.stdout+r.stderr)
	require.Contains(t, r.stdout, "postgresql")
	require.Contains(t, r.stdout, "worker w1")

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
	for _, want := range []string{"qemu accelerator", "qemu qemu", "QEMU emulator version", "vhost-device-vsock", "qemu guest image"} {
		require.Contains(t, r.stdout, want)
	}
	require.NotContains(t, r.stdout, "FAIL  qemu", "this host has everything the qemu backend needs")

	t.Setenv("AETHERIUM_VMM_QEMU_VSOCK_BINARY", "/nonexistent/vhost-device-vsock")
	r = run(t, cfg, "", "doctor")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stdout, "FAIL  qemu vhost-device-vsock")
	require.Contains(t, r.stdout, "VSock connection timeout")

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
