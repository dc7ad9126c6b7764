// Package docker is the VMOrchestrator backend that runs each VM as a Docker
// container. It talks to the Engine API (1.41 or later) through Docker's Go
// client, never the docker CLI. Every container runs fc-agent as PID 1 from an
// image this package imports itself, and commands go through that agent over
// a unix socket in a host directory bind-mounted into the container, exactly
// as they would reach a real microVM's agent. Every container is confined
// (confine.go: few capabilities, no-new-privileges, default seccomp, a pids
// limit, a read-only root), and a VM's tool set is bound into it read-only
// (tools.go).
package docker

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/mount"
	"github.com/docker/docker/client"
	"github.com/docker/docker/pkg/stdcopy"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
	"github.com/aetherium/aetherium-core/pkg/vmm/internal/vmutil"
)

// Provider is the backend's name in configuration.
const Provider = "docker"

// Defaults for Config's zero values.
const (
	DefaultBusyboxPath  = "/bin/busybox"
	DefaultSocketDir    = "/var/lib/aetherium/docker"
	DefaultReadyTimeout = 30 * time.Second
	DefaultStopTimeout  = 10 * time.Second
)

// Labels put on every container, so that ListVMs finds only ours and a
// person running `docker ps` can tell what a container is.
const (
	LabelManaged     = "io.aetherium.managed"
	LabelVMID        = "io.aetherium.vm-id"
	LabelVMName      = "io.aetherium.vm-name"
	LabelOwner       = "io.aetherium.owner"
	LabelSpecPrefix  = "io.aetherium.label."
	containerPrefix  = "aetherium-"
	agentSocketName  = "agent.sock"
	maxSocketPathLen = 107 // sun_path holds 108 bytes with the final NUL
)

// Config configures the docker backend. The zero value of every field
// selects its default.
type Config struct {
	// Host is the Docker engine's address, e.g. unix:///run/aetherium/docker.sock.
	// Empty: DOCKER_HOST from the environment, or the engine's default socket.
	Host string `yaml:"host"`
	// AgentPath is the fc-agent binary on the host that is put into the
	// image. Required unless Image is set.
	AgentPath string `yaml:"agent_path"`
	// BusyboxPath is a statically linked busybox on the host (Debian's
	// busybox-static) that gives the image its shell and tools. Default
	// /bin/busybox.
	BusyboxPath string `yaml:"busybox_path"`
	// RootfsTar is an optional root file system tarball (.tar or .tar.gz,
	// e.g. a Debian one made with debootstrap) to build the image from
	// instead of busybox; the agent is added to it.
	RootfsTar string `yaml:"rootfs_tar"`
	// Image is a ready image to create VMs from instead of building one. It
	// must hold the agent at GuestAgentPath.
	Image string `yaml:"image"`
	// SocketDir is the host directory that holds one directory per VM with
	// the agent's socket. Keep it short: unix socket paths are limited to
	// 107 bytes. Default /var/lib/aetherium/docker.
	SocketDir string `yaml:"socket_dir"`
	// MaxVCPUs is the most vCPUs one VM may ask for. Default: the host's
	// CPU count.
	MaxVCPUs int `yaml:"-"`
	// MaxMemoryMB is the most memory one VM may ask for, in MiB; a
	// larger spec is refused before anything is made. Default: the host's
	// RAM minus vmm.HostMemoryReserveMB (vmm.DefaultMaxMemoryMB).
	MaxMemoryMB int `yaml:"max_memory_mb"`
	// ReadyTimeout bounds how long StartVM waits for the agent to answer.
	// Default 30s.
	ReadyTimeout time.Duration `yaml:"ready_timeout"`
	// StopTimeout is how long a graceful StopVM waits before killing the
	// container. Default 10s.
	StopTimeout time.Duration `yaml:"stop_timeout"`
	// PidsLimit is the most processes and threads one VM may have, the
	// agent's included. Default 1024 (DefaultPidsLimit).
	PidsLimit int64 `yaml:"pids_limit"`
	// WritableRootfs leaves the root file system writable, e.g. for images
	// whose users install packages. Default false: the root is read-only
	// and only /tmp, /var/tmp, /run and the home directories are writable
	// (see confine.go).
	WritableRootfs bool `yaml:"writable_rootfs"`
	// ToolsRoot is the tool cache's root (tools.cache_dir), where the
	// agent puts tools streamed into a running VM. Every container gets a
	// tmpfs there, so a VM created without tools can get some later
	// despite its read-only root. Empty: only VMs created with a tool set
	// get one, at the set's root.
	ToolsRoot string `yaml:"-"`
	// Owner is the id of the worker that owns the VMs; it is stored as a
	// label, and ListVMs returns only that owner's VMs when it is set.
	Owner string `yaml:"-"`
	// Logger receives the backend's logs. Default slog.Default().
	Logger *slog.Logger `yaml:"-"`
}

// Orchestrator runs VMs as Docker containers. It implements vmm.VMOrchestrator.
type Orchestrator struct {
	// AgentIO gives WriteFile, ReadFile and DialAgent.
	vmutil.AgentIO
	cfg   Config
	api   *client.Client
	log   *slog.Logger
	locks vmutil.KeyedMutex // one per VM id, held by the life-cycle steps

	mu      sync.Mutex
	image   string         // the reference VMs are created from
	clients vmutil.Clients // agent clients by VM id
}

var (
	_ vmm.VMOrchestrator = (*Orchestrator)(nil)
	_ vmm.Diagnoser      = (*Orchestrator)(nil)
)

// New connects to the engine and makes sure the image exists, importing it
// when needed.
func New(ctx context.Context, cfg Config) (*Orchestrator, error) {
	cfg.BusyboxPath = cmp.Or(cfg.BusyboxPath, DefaultBusyboxPath)
	cfg.SocketDir = cmp.Or(cfg.SocketDir, DefaultSocketDir)
	cfg.MaxVCPUs = cmp.Or(cfg.MaxVCPUs, runtime.NumCPU())
	if cfg.MaxMemoryMB < 0 {
		return nil, fmt.Errorf("%w: vmm.docker.max_memory_mb is %d; give a positive size in MiB, or 0 for the default (host RAM minus %d MiB)", types.ErrInvalid, cfg.MaxMemoryMB, vmm.HostMemoryReserveMB)
	}
	cfg.MaxMemoryMB = cmp.Or(cfg.MaxMemoryMB, vmm.DefaultMaxMemoryMB())
	cfg.ReadyTimeout = cmp.Or(cfg.ReadyTimeout, DefaultReadyTimeout)
	cfg.StopTimeout = cmp.Or(cfg.StopTimeout, DefaultStopTimeout)
	cfg.PidsLimit = cmp.Or(cfg.PidsLimit, DefaultPidsLimit)
	cfg.Logger = cmp.Or(cfg.Logger, slog.Default())
	if cfg.MaxVCPUs < 0 || cfg.ReadyTimeout < 0 || cfg.StopTimeout < 0 {
		return nil, fmt.Errorf("%w: docker backend: max vcpus, ready timeout and stop timeout must not be negative", types.ErrInvalid)
	}
	if cfg.PidsLimit < minPidsLimit {
		return nil, fmt.Errorf("%w: docker backend: pids limit %d is too low; the agent alone needs about 20 threads, so give at least %d (default %d)",
			types.ErrInvalid, cfg.PidsLimit, minPidsLimit, DefaultPidsLimit)
	}
	if cfg.ToolsRoot != "" {
		if err := checkToolsRoot(cfg.ToolsRoot); err != nil {
			return nil, err
		}
	}
	if cfg.Image == "" && cfg.AgentPath == "" {
		return nil, fmt.Errorf("%w: docker backend: no guest agent binary; build fc-agent (`make build`) and set its path, or set an image that holds it", types.ErrInvalid)
	}
	dir, err := filepath.Abs(cfg.SocketDir)
	if err != nil {
		return nil, fmt.Errorf("%w: socket dir %q: %v", types.ErrInvalid, cfg.SocketDir, err)
	}
	cfg.SocketDir = dir
	if err := os.MkdirAll(cfg.SocketDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating socket dir: %w", err)
	}

	opts := []client.Opt{client.FromEnv, client.WithAPIVersionNegotiation()}
	if cfg.Host != "" {
		opts = append(opts, client.WithHost(cfg.Host))
	}
	api, err := client.NewClientWithOpts(opts...)
	if err != nil {
		return nil, fmt.Errorf("%w: docker host %q: %v", types.ErrInvalid, cfg.Host, err)
	}
	o := &Orchestrator{cfg: cfg, api: api, log: cfg.Logger.With("provider", Provider)}
	o.AgentIO = vmutil.AgentIO{Agent: o.agentOf, Dialer: o.dialerOf}
	if err := o.ping(ctx); err != nil {
		api.Close()
		return nil, err
	}
	if err := o.ensureImage(ctx); err != nil {
		api.Close()
		return nil, err
	}
	return o, nil
}

// Image returns the reference of the image VMs are created from.
func (o *Orchestrator) Image() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.image
}

// Client returns the Engine API client, for tests and tools.
func (o *Orchestrator) Client() *client.Client { return o.api }

func (o *Orchestrator) ensureImage(ctx context.Context) error {
	if o.cfg.Image != "" {
		if _, err := o.api.ImageInspect(ctx, o.cfg.Image); err != nil {
			if cerrdefs.IsNotFound(err) {
				return fmt.Errorf("%w: image %s does not exist in the engine; import it or leave the image unset to build one", types.ErrInvalid, o.cfg.Image)
			}
			return fmt.Errorf("inspecting image %s: %w", o.cfg.Image, mapErr(err))
		}
		o.mu.Lock()
		o.image = o.cfg.Image
		o.mu.Unlock()
		return nil
	}
	ref, imported, err := EnsureImage(ctx, o.api, BaseImage{AgentPath: o.cfg.AgentPath, BusyboxPath: o.cfg.BusyboxPath, RootfsTar: o.cfg.RootfsTar})
	if err != nil {
		return err
	}
	if imported {
		o.log.Info("imported base image", "image", ref)
	}
	o.mu.Lock()
	o.image = ref
	o.mu.Unlock()
	return nil
}

// Capabilities implements vmm.VMOrchestrator.
func (o *Orchestrator) Capabilities() vmm.Capabilities {
	return vmm.Capabilities{Provider: Provider, MaxVCPUs: o.cfg.MaxVCPUs, MaxMemoryMB: o.cfg.MaxMemoryMB, Isolation: "container", PauseResume: true}
}

// Health implements vmm.VMOrchestrator.
func (o *Orchestrator) Health(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := o.ping(ctx); err != nil {
		return err
	}
	// A built image that went missing is imported again by CreateVM; a
	// configured one cannot be.
	if o.cfg.Image != "" {
		if _, err := o.api.ImageInspect(ctx, o.cfg.Image); err != nil {
			return fmt.Errorf("%w: image %s is not in the Docker engine at %s (%v); import it again or unset vmm.docker.image",
				types.ErrUnavailable, o.cfg.Image, o.api.DaemonHost(), err)
		}
	}
	return nil
}

func (o *Orchestrator) ping(ctx context.Context) error {
	if _, err := o.api.Ping(ctx); err != nil {
		return fmt.Errorf("%w: cannot reach the Docker engine at %s: %v; start it with `make up` (which starts a private dockerd) or set vmm.docker.host",
			types.ErrUnavailable, o.api.DaemonHost(), err)
	}
	return nil
}

// Close implements vmm.VMOrchestrator. Containers keep running.
func (o *Orchestrator) Close() error {
	o.clients.CloseAll()
	return o.api.Close()
}

func containerName(id string) string { return containerPrefix + id }
func (o *Orchestrator) vmDir(id string) string {
	return filepath.Join(o.cfg.SocketDir, id)
}
func (o *Orchestrator) socketPath(id string) string {
	return filepath.Join(o.vmDir(id), agentSocketName)
}

// CreateVM implements vmm.VMOrchestrator.
func (o *Orchestrator) CreateVM(ctx context.Context, spec types.VMSpec) (*vmm.VMStatus, error) {
	if err := types.ValidateID(spec.ID); err != nil {
		return nil, err
	}
	if spec.FromSnapshot != "" {
		return nil, errNoSnapshots("starting a vm from a snapshot or template")
	}
	if err := spec.Validate(o.cfg.MaxVCPUs); err != nil {
		return nil, err
	}
	if err := vmm.CheckMaxMemory(spec, o.cfg.MaxMemoryMB, "vmm.docker.max_memory_mb"); err != nil {
		return nil, err
	}
	if spec.Network == types.NetworkNAT {
		return nil, fmt.Errorf("%w: the docker backend runs VMs without a network; create it with --network none, or use the qemu or firecracker backend for nat", types.ErrNotSupported)
	}
	if err := checkTools(spec.Tools); err != nil {
		return nil, err
	}
	if p := o.socketPath(spec.ID); len(p) > maxSocketPathLen {
		return nil, fmt.Errorf("%w: agent socket path %s is %d bytes, over the %d a unix socket allows; choose a shorter socket dir", types.ErrInvalid, p, len(p), maxSocketPathLen)
	}
	unlock, err := o.locks.LockContext(ctx, spec.ID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if st, err := o.GetVMStatus(ctx, spec.ID); err == nil {
		return st, nil
	} else if !errors.Is(err, types.ErrNotFound) {
		return nil, err
	}

	dir := o.vmDir(spec.ID)
	madeDir := true
	if err := os.Mkdir(dir, 0o700); errors.Is(err, os.ErrExist) {
		madeDir = false
	} else if err != nil {
		return nil, fmt.Errorf("creating vm %s: %w", spec.ID, err)
	}

	labels := map[string]string{
		LabelManaged: "true",
		LabelVMID:    spec.ID,
		LabelVMName:  spec.Name,
		LabelOwner:   o.cfg.Owner,
	}
	for k, v := range spec.Labels {
		labels[LabelSpecPrefix+k] = v
	}
	envs := maps.Clone(spec.Env)
	if root := o.toolsRoot(spec.Tools); root != "" {
		// The agent finds the tool volumes through it (types.ToolSet).
		if envs == nil {
			envs = map[string]string{}
		}
		envs[types.ToolsRootEnv] = root
	}
	env := make([]string, 0, len(envs))
	for _, k := range slices.Sorted(maps.Keys(envs)) {
		env = append(env, k+"="+envs[k])
	}
	noInit := false
	mem := int64(spec.MemoryMB) << 20
	cfg := &container.Config{
		Hostname:   bootparams.SanitizeHostname(spec.Name),
		Image:      o.Image(),
		Entrypoint: []string{GuestAgentPath, "--listen", "unix://" + GuestRunDir + "/" + agentSocketName},
		Env:        env,
		Labels:     labels,
	}
	hostCfg := &container.HostConfig{
		NetworkMode: "none",
		Init:        &noInit,
		Mounts:      []mount.Mount{{Type: mount.TypeBind, Source: dir, Target: GuestRunDir}},
		Resources: container.Resources{
			NanoCPUs:   int64(spec.VCPUs) * 1e9,
			Memory:     mem,
			MemorySwap: mem, // equal to Memory: no swap, as in a VM
		},
	}
	o.confine(cfg, hostCfg, spec.MemoryMB)
	deliverTools(o.toolsRoot(spec.Tools), spec.Tools, spec.MemoryMB, hostCfg)
	_, err = o.api.ContainerCreate(ctx, cfg, hostCfg, nil, nil, containerName(spec.ID))
	if err != nil && cerrdefs.IsNotFound(err) && o.cfg.Image == "" {
		// Someone removed the image since New; import it again once.
		if err = o.ensureImage(ctx); err == nil {
			cfg.Image = o.Image()
			_, err = o.api.ContainerCreate(ctx, cfg, hostCfg, nil, nil, containerName(spec.ID))
		}
	}
	if err != nil {
		if cerrdefs.IsConflict(err) {
			// Another caller created it at the same moment.
			return o.GetVMStatus(ctx, spec.ID)
		}
		if madeDir {
			os.RemoveAll(dir)
		}
		return nil, fmt.Errorf("creating container for vm %s: %w", spec.ID, mapErr(err))
	}
	o.log.Info("created vm", "vm_id", spec.ID, "container", containerName(spec.ID), "vcpus", spec.VCPUs, "memory_mb", spec.MemoryMB)
	return o.GetVMStatus(ctx, spec.ID)
}

// StartVM implements vmm.VMOrchestrator. A paused VM is resumed.
func (o *Orchestrator) StartVM(ctx context.Context, id string) error {
	ins, unlock, err := vmutil.Enter(ctx, &o.locks, id, func(id string) (container.InspectResponse, error) { return o.inspect(ctx, id) })
	if err != nil {
		return err
	}
	defer unlock()

	if !ins.State.Running {
		// The socket of a previous run would only refuse connections.
		os.Remove(o.socketPath(id))
		os.Remove(o.stoppedPath(id))
		o.dropClient(id)
		if err := o.api.ContainerStart(ctx, ins.ID, container.StartOptions{}); err != nil {
			return fmt.Errorf("starting vm %s: %w", id, mapErr(err))
		}
		o.log.Info("started vm", "vm_id", id)
	} else if ins.State.Paused {
		if err := o.api.ContainerUnpause(ctx, ins.ID); err != nil {
			return fmt.Errorf("starting vm %s: resuming its paused container: %w", id, mapErr(err))
		}
	}
	// ContainerStart returns once the container runs, so waiting for "not
	// running" from here on also catches an agent that died at once.
	waitCtx, stopWait := context.WithCancel(ctx)
	defer stopWait()
	exited, _ := o.api.ContainerWait(waitCtx, ins.ID, container.WaitConditionNotRunning)

	c, err := o.client(id)
	if err != nil {
		return err
	}
	readyCtx, cancel := context.WithTimeout(ctx, o.cfg.ReadyTimeout)
	defer cancel()
	ready := make(chan error, 1)
	go func() {
		_, err := c.WaitReady(readyCtx)
		ready <- err
	}()
	select {
	case err := <-ready:
		if err == nil {
			return nil
		}
		return vmutil.ReadyError(ctx, id, o.cfg.ReadyTimeout, err, "its log", o.logTail(id, 20))
	case w := <-exited:
		cancel()
		<-ready
		o.dropClient(id)
		return fmt.Errorf("starting vm %s: its container exited with code %d before the agent answered; its log ends with:\n%s",
			id, w.StatusCode, o.logTail(id, 20))
	}
}

// StopVM implements vmm.VMOrchestrator. A paused VM is resumed first, so
// that it can shut down.
func (o *Orchestrator) StopVM(ctx context.Context, id string, force bool) error {
	ins, unlock, err := vmutil.Enter(ctx, &o.locks, id, func(id string) (container.InspectResponse, error) { return o.inspect(ctx, id) })
	if err != nil {
		return err
	}
	defer unlock()
	defer o.dropClient(id)
	// Record that the stop was asked for, so the exit is not taken for a
	// crash.
	if err := os.WriteFile(o.stoppedPath(id), nil, 0o600); err != nil {
		return fmt.Errorf("stopping vm %s: %w", id, err)
	}
	if !ins.State.Running {
		return nil
	}
	if ins.State.Paused {
		// A frozen agent cannot shut down and a frozen process takes no
		// signal: thaw it first.
		if err := o.api.ContainerUnpause(ctx, ins.ID); err != nil && !cerrdefs.IsConflict(err) {
			return fmt.Errorf("stopping vm %s: resuming its paused container: %w", id, mapErr(err))
		}
	}
	if force {
		if err := o.api.ContainerKill(ctx, ins.ID, "KILL"); err != nil && !cerrdefs.IsConflict(err) && !cerrdefs.IsNotFound(err) {
			return fmt.Errorf("killing vm %s: %w", id, mapErr(err))
		}
	} else {
		// Ask the agent first: as PID 1 it syncs and exits cleanly. If it
		// cannot, the engine's SIGTERM and then SIGKILL follow.
		if c, err := o.client(id); err == nil {
			sctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			if err := c.Shutdown(sctx, false); err != nil {
				o.log.Debug("agent shutdown failed; stopping the container", "vm_id", id, "err", err)
			}
			cancel()
		}
		secs := int(o.cfg.StopTimeout / time.Second)
		if err := o.api.ContainerStop(ctx, ins.ID, container.StopOptions{Timeout: &secs}); err != nil && !cerrdefs.IsNotFound(err) {
			return fmt.Errorf("stopping vm %s: %w", id, mapErr(err))
		}
	}
	// Both calls return once the engine saw the exit, but make sure of it
	// so that StopVM never returns with the VM still running.
	wctx, cancel := context.WithTimeout(ctx, o.cfg.StopTimeout+10*time.Second)
	defer cancel()
	resC, errC := o.api.ContainerWait(wctx, ins.ID, container.WaitConditionNotRunning)
	select {
	case <-resC:
	case err := <-errC:
		if !cerrdefs.IsNotFound(err) {
			return fmt.Errorf("waiting for vm %s to stop: %w", id, mapErr(err))
		}
	}
	os.Remove(o.socketPath(id))
	o.log.Info("stopped vm", "vm_id", id, "force", force)
	return nil
}

// DeleteVM implements vmm.VMOrchestrator.
func (o *Orchestrator) DeleteVM(ctx context.Context, id string) error {
	unlock, ok, err := vmutil.Lock(ctx, &o.locks, id)
	if !ok {
		return err // nil for an id no VM can have
	}
	defer unlock()
	o.dropClient(id)
	removed := true
	if err := o.api.ContainerRemove(ctx, containerName(id), container.RemoveOptions{Force: true, RemoveVolumes: true}); cerrdefs.IsNotFound(err) {
		removed = false
	} else if err != nil {
		return fmt.Errorf("removing vm %s: %w", id, mapErr(err))
	}
	if err := os.RemoveAll(o.vmDir(id)); err != nil {
		return fmt.Errorf("removing vm %s's directory: %w", id, err)
	}
	if removed {
		o.log.Info("deleted vm", "vm_id", id)
	}
	return nil
}

// ExecuteCommand implements vmm.VMOrchestrator. The command's environment
// is the VM's (the image's and the spec's) overlaid with cmd.Env.
func (o *Orchestrator) ExecuteCommand(ctx context.Context, id string, cmd types.Command, stream vmm.ExecIO) (*types.ExecResult, error) {
	c, ins, err := o.runningAgent(ctx, id)
	if err != nil {
		return nil, err
	}
	// The VM's environment (the image's and the spec's, as the container
	// holds it) lies beneath the command's own.
	base := make(map[string]string, len(ins.Config.Env))
	for _, kv := range ins.Config.Env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			base[k] = v
		}
	}
	// The PATH the built images set is the agent's default, before which
	// the agent puts the tools' bin directories; passing it would hide
	// them. A PATH of the spec's or of a configured image's stays.
	if base["PATH"] == guestPath {
		delete(base, "PATH")
	}
	return vmutil.Exec(ctx, c, id, base, cmd, stream)
}

// running returns the container of a running VM as inspected, or
// types.ErrNotFound or types.ErrConflict.
func (o *Orchestrator) running(ctx context.Context, id string) (container.InspectResponse, error) {
	if types.ValidateID(id) != nil {
		return container.InspectResponse{}, notFound(id)
	}
	ins, err := o.inspect(ctx, id)
	if err != nil {
		return ins, err
	}
	if !ins.State.Running {
		return ins, fmt.Errorf("%w: vm %s is %s; start it first", types.ErrConflict, id, o.mapState(ins).State)
	}
	if ins.State.Paused {
		// Its agent is frozen: refuse at once rather than wait on it.
		return ins, fmt.Errorf("%w: vm %s is paused; resume it first", types.ErrConflict, id)
	}
	return ins, nil
}

// runningAgent returns the agent client of a running VM and the container
// as inspected.
func (o *Orchestrator) runningAgent(ctx context.Context, id string) (*agent.Client, container.InspectResponse, error) {
	ins, err := o.running(ctx, id)
	if err != nil {
		return nil, ins, err
	}
	c, err := o.client(id)
	return c, ins, err
}

// dialerOf is the dialer of a running VM's agent as a vmutil.RunningDialer.
func (o *Orchestrator) dialerOf(ctx context.Context, id string) (agent.Dialer, error) {
	if _, err := o.running(ctx, id); err != nil {
		return nil, err
	}
	return o.dialer(id), nil
}

// dialer reaches VM id's agent; the cached client and DialAgent share it.
func (o *Orchestrator) dialer(id string) agent.Dialer {
	return agent.UnixDialer(o.socketPath(id))
}

// agentOf is runningAgent as a vmutil.RunningAgent.
func (o *Orchestrator) agentOf(ctx context.Context, id string) (*agent.Client, error) {
	c, _, err := o.runningAgent(ctx, id)
	return c, err
}

// GetVMStatus implements vmm.VMOrchestrator.
func (o *Orchestrator) GetVMStatus(ctx context.Context, id string) (*vmm.VMStatus, error) {
	if types.ValidateID(id) != nil {
		return nil, notFound(id)
	}
	ins, err := o.inspect(ctx, id)
	if err != nil {
		return nil, err
	}
	st := o.mapState(ins)
	return &st, nil
}

// ListVMs implements vmm.VMOrchestrator.
func (o *Orchestrator) ListVMs(ctx context.Context) ([]vmm.VMStatus, error) {
	f := filters.NewArgs(filters.Arg("label", LabelManaged+"=true"))
	if o.cfg.Owner != "" {
		f.Add("label", LabelOwner+"="+o.cfg.Owner)
	}
	list, err := o.api.ContainerList(ctx, container.ListOptions{All: true, Filters: f})
	if err != nil {
		return nil, fmt.Errorf("listing vms: %w", mapErr(err))
	}
	out := make([]vmm.VMStatus, 0, len(list))
	for _, c := range list {
		// Inspect rather than trust the summary: only inspect says whether
		// the kernel's OOM killer ended it.
		ins, err := o.api.ContainerInspect(ctx, c.ID)
		if cerrdefs.IsNotFound(err) {
			continue // removed meanwhile
		} else if err != nil {
			return nil, fmt.Errorf("listing vms: %w", mapErr(err))
		}
		out = append(out, o.mapState(ins))
	}
	slices.SortFunc(out, func(a, b vmm.VMStatus) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// inspect returns the container of VM id or types.ErrNotFound. A container
// that has our name but not our label is not ours and counts as missing.
func (o *Orchestrator) inspect(ctx context.Context, id string) (container.InspectResponse, error) {
	ins, err := o.api.ContainerInspect(ctx, containerName(id))
	if err != nil {
		if cerrdefs.IsNotFound(err) {
			return ins, notFound(id)
		}
		return ins, fmt.Errorf("inspecting vm %s: %w", id, mapErr(err))
	}
	if ins.Config == nil || ins.Config.Labels[LabelManaged] != "true" || ins.State == nil {
		return ins, notFound(id)
	}
	return ins, nil
}

// stoppedPath is a marker StopVM writes: an exit without it is a crash.
func (o *Orchestrator) stoppedPath(id string) string {
	return filepath.Join(o.vmDir(id), "stopped")
}

// mapState turns a container's state into the VM's.
func (o *Orchestrator) mapState(ins container.InspectResponse) vmm.VMStatus {
	st := vmm.VMStatus{ID: ins.Config.Labels[LabelVMID], Name: ins.Config.Labels[LabelVMName]}
	for k, v := range ins.Config.Labels {
		if key, ok := strings.CutPrefix(k, LabelSpecPrefix); ok {
			if st.Labels == nil {
				st.Labels = map[string]string{}
			}
			st.Labels[key] = v
		}
	}
	s := ins.State
	switch {
	case s.OOMKilled:
		st.State = types.VMFailed
		st.Detail = fmt.Sprintf("out of memory: the kernel killed it at its %d MiB limit", ins.HostConfig.Memory>>20)
	case s.Dead:
		st.State = types.VMFailed
		st.Detail = cmp.Or(s.Error, "the container is dead")
	case s.Error != "":
		st.State = types.VMFailed
		st.Detail = s.Error
	case s.Running && s.Paused:
		st.State = types.VMPaused
	case s.Running, s.Restarting:
		st.State = types.VMRunning
	case s.Status == "removing":
		st.State = types.VMDeleting
	case s.Status == "exited" && !fileExists(o.stoppedPath(st.ID)):
		st.State = types.VMFailed
		st.Detail = "its container exited with code " + strconv.Itoa(s.ExitCode) + " without being stopped (killed or crashed)"
	default: // created (never started) or stopped by StopVM
		st.State = types.VMStopped
		if s.Status == "exited" && s.ExitCode != 0 {
			st.Detail = "exited with code " + strconv.Itoa(s.ExitCode)
		}
	}
	return st
}

// client returns the cached agent client of VM id.
func (o *Orchestrator) client(id string) (*agent.Client, error) {
	return o.clients.Get(id, o.dialer(id))
}

func (o *Orchestrator) dropClient(id string) { o.clients.Drop(id) }

// logTail returns the last n lines the container wrote, for error messages.
func (o *Orchestrator) logTail(id string, n int) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rc, err := o.api.ContainerLogs(ctx, containerName(id), container.LogsOptions{ShowStdout: true, ShowStderr: true, Tail: strconv.Itoa(n)})
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	defer rc.Close()
	var buf bytes.Buffer
	if _, err := stdcopy.StdCopy(&buf, &buf, io.LimitReader(rc, 64<<10)); err != nil && buf.Len() == 0 {
		return "(no log: " + err.Error() + ")"
	}
	if buf.Len() == 0 {
		return "(empty)"
	}
	return strings.TrimRight(buf.String(), "\n")
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func notFound(id string) error {
	return fmt.Errorf("%w: vm %s", types.ErrNotFound, id)
}

// mapErr gives an engine error the matching error kind.
func mapErr(err error) error {
	switch {
	case err == nil:
		return nil
	case cerrdefs.IsNotFound(err):
		return fmt.Errorf("%w: %v", types.ErrNotFound, err)
	case cerrdefs.IsConflict(err):
		return fmt.Errorf("%w: %v", types.ErrConflict, err)
	case cerrdefs.IsInvalidArgument(err):
		return fmt.Errorf("%w: %v", types.ErrInvalid, err)
	case client.IsErrConnectionFailed(err), cerrdefs.IsUnavailable(err):
		return fmt.Errorf("%w: %v", types.ErrUnavailable, err)
	}
	return err
}
