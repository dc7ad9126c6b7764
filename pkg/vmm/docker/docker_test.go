package docker_test

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/pkg/stdcopy"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/docker"
	"github.com/aetherium/aetherium-core/pkg/vmm/vmmtest"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// config returns a Config for the test binary's private dockerd, with a
// fresh socket dir that is removed at the end of t.
func config(t testing.TB) docker.Config {
	t.Helper()
	if f, err := elf.Open(docker.DefaultBusyboxPath); err != nil {
		testenv.Skip(t, "no busybox at %s (%v); install busybox-static with `make setup`", docker.DefaultBusyboxPath, err)
	} else {
		f.Close()
	}
	host := testenv.Dockerd(t)
	// Not t.TempDir: its path holds the test's name and unix socket paths
	// must stay under 108 bytes.
	dir, err := os.MkdirTemp("", "aev-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return docker.Config{
		Host:      host,
		AgentPath: testenv.BuildBinary(t, "fc-agent"),
		SocketDir: dir,
		Owner:     "test-worker",
		Logger:    slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
}

func newOrchestrator(t testing.TB, cfg docker.Config) *docker.Orchestrator {
	t.Helper()
	o, err := docker.New(t.Context(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { o.Close() })
	return o
}

func TestConformance(t *testing.T) {
	vmmtest.Run(t, vmmtest.Harness{
		New: func(t *testing.T) vmm.VMOrchestrator { return newOrchestrator(t, config(t)) },
		Crash: func(t *testing.T, o vmm.VMOrchestrator, id string) {
			// Kill the container's init from the host, as a crash would.
			ins, err := o.(*docker.Orchestrator).Client().ContainerInspect(t.Context(), "aetherium-"+id)
			require.NoError(t, err)
			require.NoError(t, syscall.Kill(ins.State.Pid, syscall.SIGKILL))
		},
		LockVM: func(o vmm.VMOrchestrator, id string) func() { return o.(*docker.Orchestrator).LockVM(id) },
	})
}

// TestContainer checks what the container of a VM looks like in the engine.
func TestContainer(t *testing.T) {
	t.Parallel()
	cfg := config(t)
	o := newOrchestrator(t, cfg)
	sp := vmmtest.NewSpec(t)
	sp.VCPUs, sp.MemoryMB = 1, 96
	sp.Labels = map[string]string{"team": "core"}
	sp.Env = map[string]string{"GREETING": "hi"}
	id := vmmtest.StartVM(t, o, sp)

	ins, err := o.Client().ContainerInspect(t.Context(), "aetherium-"+id)
	require.NoError(t, err)
	require.Equal(t, map[string]string{
		docker.LabelManaged:             "true",
		docker.LabelVMID:                id,
		docker.LabelVMName:              sp.Name,
		docker.LabelOwner:               "test-worker",
		docker.LabelSpecPrefix + "team": "core",
	}, ins.Config.Labels)
	require.Equal(t, o.Image(), ins.Config.Image)
	require.Contains(t, ins.Config.Env, "GREETING=hi")
	require.Equal(t, sp.Name, ins.Config.Hostname)
	require.Equal(t, container.NetworkMode("none"), ins.HostConfig.NetworkMode)
	require.Equal(t, int64(1e9), ins.HostConfig.NanoCPUs)
	require.Equal(t, int64(96<<20), ins.HostConfig.Memory)
	require.Equal(t, int64(96<<20), ins.HostConfig.MemorySwap)
	// The agent's socket directory is bound; the home directories are
	// volumes (see TestHomeSurvivesRestart).
	mounts := map[string]string{}
	for _, m := range ins.Mounts {
		mounts[m.Destination] = string(m.Type)
		if m.Destination == docker.GuestRunDir {
			require.Equal(t, filepath.Join(cfg.SocketDir, id), m.Source)
		}
	}
	require.Equal(t, map[string]string{docker.GuestRunDir: "bind", "/root": "volume", "/home": "volume"}, mounts)
	require.Equal(t, "1\n", vmmtest.Sh(t, o, id, `[ $$ -ne 1 ] && ps -o pid,args | grep -c '^ *1 .*fc-agent'`),
		"the agent should run as PID 1")
}

// TestDeleteLeavesNothing: no container and no host directory survive.
func TestDeleteLeavesNothing(t *testing.T) {
	t.Parallel()
	cfg := config(t)
	o := newOrchestrator(t, cfg)
	id := vmmtest.StartVM(t, o, vmmtest.NewSpec(t))
	dir := filepath.Join(cfg.SocketDir, id)
	require.FileExists(t, filepath.Join(dir, "agent.sock"))

	require.NoError(t, o.DeleteVM(t.Context(), id))
	_, err := o.Client().ContainerInspect(t.Context(), "aetherium-"+id)
	require.True(t, cerrdefs.IsNotFound(err), "container still there: %v", err)
	list, err := o.Client().ContainerList(t.Context(), container.ListOptions{All: true, Filters: filters.NewArgs(filters.Arg("label", docker.LabelVMID+"="+id))})
	require.NoError(t, err)
	require.Empty(t, list)
	require.NoDirExists(t, dir)
}

// TestImageReuse: the same inputs give the same image tag and import
// nothing the second time.
func TestImageReuse(t *testing.T) {
	t.Parallel()
	cfg := config(t)
	o1 := newOrchestrator(t, cfg)
	before, err := o1.Client().ImageInspect(t.Context(), o1.Image())
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(o1.Image(), docker.BaseImageRepo+":"), o1.Image())

	o2 := newOrchestrator(t, cfg)
	require.Equal(t, o1.Image(), o2.Image())
	ref, imported, err := docker.EnsureImage(t.Context(), o2.Client(), docker.BaseImage{AgentPath: cfg.AgentPath})
	require.NoError(t, err)
	require.False(t, imported, "the second build imported again")
	require.Equal(t, o1.Image(), ref)
	after, err := o2.Client().ImageInspect(t.Context(), ref)
	require.NoError(t, err)
	require.Equal(t, before.ID, after.ID)
}

// TestOwner: ListVMs shows only the VMs of the configured owner.
func TestOwner(t *testing.T) {
	t.Parallel()
	cfg := config(t)
	cfg.Owner = "worker-a"
	a := newOrchestrator(t, cfg)
	cfg.Owner = "worker-b"
	b := newOrchestrator(t, cfg)
	sp := vmmtest.NewSpec(t)
	t.Cleanup(func() { a.DeleteVM(context.WithoutCancel(t.Context()), sp.ID) })
	_, err := a.CreateVM(t.Context(), sp)
	require.NoError(t, err)

	ids := func(o *docker.Orchestrator) []string {
		list, err := o.ListVMs(t.Context())
		require.NoError(t, err)
		var ids []string
		for _, v := range list {
			ids = append(ids, v.ID)
		}
		return ids
	}
	require.Contains(t, ids(a), sp.ID)
	require.NotContains(t, ids(b), sp.ID)
}

// TestStartReportsExit: when the agent dies at boot, StartVM says so at
// once, with the exit code and the container's last words.
func TestStartReportsExit(t *testing.T) {
	t.Parallel()
	cfg := config(t)
	o := newOrchestrator(t, cfg)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	addFile(t, tw, "bin/busybox", 0o755, must(os.ReadFile(docker.DefaultBusyboxPath)))
	require.NoError(t, tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/sh", Linkname: "/bin/busybox", Mode: 0o777}))
	addFile(t, tw, "usr/local/bin/fc-agent", 0o755, []byte("#!/bin/sh\necho the agent broke >&2\nexit 7\n"))
	require.NoError(t, tw.Close())
	require.NoError(t, docker.ImportImage(t.Context(), o.Client(), &buf, "aetherium/test-broken", "v1"))

	cfg.Image = "aetherium/test-broken:v1"
	cfg.ReadyTimeout = time.Minute
	broken := newOrchestrator(t, cfg)
	sp := vmmtest.NewSpec(t)
	t.Cleanup(func() { broken.DeleteVM(context.WithoutCancel(t.Context()), sp.ID) })
	_, err := broken.CreateVM(t.Context(), sp)
	require.NoError(t, err)
	start := time.Now()
	err = broken.StartVM(t.Context(), sp.ID)
	require.Error(t, err)
	require.Less(t, time.Since(start), 30*time.Second, "StartVM waited for the timeout instead of noticing the exit")
	require.Contains(t, err.Error(), "code 7")
	require.Contains(t, err.Error(), "the agent broke")
}

// TestRootfsTar: an image can be built from a root file system tarball, as
// a Debian one will be.
func TestRootfsTar(t *testing.T) {
	t.Parallel()
	cfg := config(t)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	addFile(t, tw, "bin/busybox", 0o755, must(os.ReadFile(docker.DefaultBusyboxPath)))
	for _, a := range []string{"sh", "cat", "true"} {
		require.NoError(t, tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/" + a, Linkname: "busybox", Mode: 0o777}))
	}
	addFile(t, tw, "etc/marker", 0o644, []byte("from the tarball\n"))
	require.NoError(t, tw.Close())
	cfg.RootfsTar = filepath.Join(cfg.SocketDir, "rootfs.tar")
	require.NoError(t, os.WriteFile(cfg.RootfsTar, buf.Bytes(), 0o644))

	o := newOrchestrator(t, cfg)
	id := vmmtest.StartVM(t, o, vmmtest.NewSpec(t))
	require.Equal(t, "from the tarball\n", vmmtest.Sh(t, o, id, "cat /etc/marker"))
}

// TestUnreachable: a missing engine is reported with what to do about it.
func TestUnreachable(t *testing.T) {
	t.Parallel()
	cfg := config(t)
	cfg.Host = "unix:///nonexistent/docker.sock"
	_, err := docker.New(t.Context(), cfg)
	require.ErrorIs(t, err, types.ErrUnavailable)
	require.Contains(t, err.Error(), "cannot reach the Docker engine at unix:///nonexistent/docker.sock")
	require.Contains(t, err.Error(), "make up")
}

// BenchmarkExecTrue compares running `true` in the same container through
// the agent, through the Engine API's exec (what `docker exec` does), and
// through the docker CLI, the product's stated baseline.
func BenchmarkExecTrue(b *testing.B) {
	cfg := config(b)
	o := newOrchestrator(b, cfg)
	id := vmmtest.StartVM(b, o, vmmtest.NewSpec(b))
	name := "aetherium-" + id
	ctx := b.Context()

	b.Run("agent", func(b *testing.B) {
		testenv.Measure(b, func() {
			res, err := o.ExecuteCommand(ctx, id, types.Command{Cmd: "true"}, vmm.ExecIO{})
			if err != nil || res.ExitCode != 0 {
				b.Fatalf("exec: %v %+v", err, res)
			}
		})
	})
	b.Run("docker-exec", func(b *testing.B) {
		api := o.Client()
		testenv.Measure(b, func() {
			ex, err := api.ContainerExecCreate(ctx, name, container.ExecOptions{Cmd: []string{"true"}, AttachStdout: true, AttachStderr: true})
			if err != nil {
				b.Fatal(err)
			}
			hj, err := api.ContainerExecAttach(ctx, ex.ID, container.ExecAttachOptions{})
			if err != nil {
				b.Fatal(err)
			}
			_, err = stdcopy.StdCopy(io.Discard, io.Discard, hj.Reader)
			hj.Close()
			if err != nil {
				b.Fatal(err)
			}
			ins, err := api.ContainerExecInspect(ctx, ex.ID)
			if err != nil || ins.ExitCode != 0 || ins.Running {
				b.Fatalf("exec inspect: %v %+v", err, ins)
			}
		})
	})
	b.Run("docker-cli", func(b *testing.B) {
		cli, err := exec.LookPath("docker")
		if err != nil {
			testenv.Skip(b, "no docker CLI in PATH; install docker.io (scripts/setup.sh does)")
		}
		testenv.Measure(b, func() {
			if out, err := exec.Command(cli, "-H", cfg.Host, "exec", name, "true").CombinedOutput(); err != nil {
				b.Fatalf("docker exec: %v\n%s", err, out)
			}
		})
	})
}

func addFile(t testing.TB, tw *tar.Writer, name string, mode int64, body []byte) {
	t.Helper()
	require.NoError(t, tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(body))}))
	_, err := tw.Write(body)
	require.NoError(t, err)
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// TestMissingImage: a configured image that the engine lacks is a
// configuration error.
func TestMissingImage(t *testing.T) {
	t.Parallel()
	cfg := config(t)
	cfg.Image = "aetherium/no-such-image:v0"
	_, err := docker.New(t.Context(), cfg)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.Contains(t, err.Error(), "aetherium/no-such-image:v0")
}

// TestGuestImageRootfs: the docker backend imports the same root file system
// the microVM backends boot (the guest image's rootfs.tar), so every backend
// runs the same userland.
func TestGuestImageRootfs(t *testing.T) {
	t.Parallel()
	img := testenv.GuestImage(t)
	cfg := config(t)
	cfg.RootfsTar = img.RootfsTarPath()
	o := newOrchestrator(t, cfg)
	require.Contains(t, o.Image(), "aetherium/base:")
	sp := vmmtest.NewSpec(t)
	id := vmmtest.StartVM(t, o, sp)
	t.Cleanup(func() { o.DeleteVM(context.WithoutCancel(t.Context()), id) })
	require.Contains(t, vmmtest.Sh(t, o, id, "cat /etc/os-release"), "Debian GNU/Linux")
	require.Contains(t, vmmtest.Sh(t, o, id, "bash --version"), "GNU bash")
	require.Equal(t, "ok\n", vmmtest.Sh(t, o, id, "echo ok"))
}
