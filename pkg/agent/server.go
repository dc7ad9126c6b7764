package agent

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// ServerConfig configures the agent.
type ServerConfig struct {
	// MaxOutputBytes is the per-stream output cap for requests that do not
	// set their own; 0: types.DefaultMaxOutputBytes.
	MaxOutputBytes int
	// Logger receives the agent's logs; nil: discard.
	Logger *slog.Logger
	// OnShutdown is called after a Shutdown request has stopped the server,
	// unless the agent is PID 1 and powered the guest off (or rebooted it).
	// The process should exit. nil: nothing is called; Serve returns.
	OnShutdown func(reboot bool)
	// PowerOff is called instead of Halt when the agent is PID 1, so an
	// init can end processes and unmount before the power goes. It only
	// returns on failure. nil: Halt.
	PowerOff func(reboot bool) error
	// ToolsRoot is the root of the tool volumes (types.ToolSet.Root): the
	// bin directories of the volumes under it go in front of every
	// command's PATH, and AddTools adds volumes there. fc-agent takes it
	// from types.ToolsRootEnv. Empty: none until AddTools names one. A
	// root that is not a clean absolute path other than / is ignored with
	// a logged error.
	ToolsRoot string
	// MaxToolBytes bounds the file content of one volume AddTools
	// extracts; 0: DefaultMaxToolBytes.
	MaxToolBytes int64
	// MaxEndedExecs bounds how many ended executions the journal of
	// execution ids keeps (see ExecRetention); past it the oldest are
	// forgotten. 0: DefaultMaxEndedExecs.
	MaxEndedExecs int
	// MaxEndedExecBytes bounds the output those ended executions hold
	// together; past it the oldest are forgotten. 0:
	// DefaultMaxEndedExecBytes.
	MaxEndedExecBytes int64
	// ExecCgroupRoot, if set, is a directory on a cgroup v2 file system
	// (made if missing) under which each command gets a cgroup of its
	// own, so that killing it reaches every process it started (see
	// execCgroups). Where it cannot serve (no cgroup v2, read-only, no
	// cgroup.kill) the agent logs why and kills trees by token alone.
	// fc-agent sets DefaultExecCgroupRoot.
	ExecCgroupRoot string
}

// stopGrace is how long Stop waits for RPCs to end after killing commands
// before it closes connections under them (a client that stopped reading
// can keep an Exec stream from finishing).
const stopGrace = 5 * time.Second

// Server is the guest agent: the gRPC service that runs commands and moves
// files for the host.
type Server struct {
	agentpb.UnimplementedAgentServer

	cfg     ServerConfig
	log     *slog.Logger
	grpc    *grpc.Server
	waiter  waiter
	self    identity // the agent's own user
	procs   *procTable
	tools   *toolRegistry
	journal *execJournal
	cgroups *execCgroups // nil: none (see ServerConfig.ExecCgroupRoot)
	// idsys is what SetIdentity acts on; identityMu keeps two calls from
	// interleaving their effects.
	idsys      identitySys
	identityMu sync.Mutex

	// stopping is cancelled by Stop; it kills every running command.
	stopping context.Context
	stop     context.CancelFunc
	stopOnce sync.Once

	shutdownOnce sync.Once
}

// NewServer creates an agent. When the process is PID 1 or a child
// subreaper, the server reaps every child, including orphans.
func NewServer(cfg ServerConfig) *Server {
	cfg.MaxOutputBytes = cmp.Or(cfg.MaxOutputBytes, types.DefaultMaxOutputBytes)
	cfg.MaxToolBytes = cmp.Or(cfg.MaxToolBytes, DefaultMaxToolBytes)
	cfg.MaxEndedExecs = cmp.Or(cfg.MaxEndedExecs, DefaultMaxEndedExecs)
	cfg.MaxEndedExecBytes = cmp.Or(cfg.MaxEndedExecBytes, DefaultMaxEndedExecBytes)
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		cfg:     cfg,
		log:     cfg.Logger,
		grpc:    grpc.NewServer(),
		waiter:  directWaiter{},
		self:    selfIdentity(),
		procs:   newProcTable(),
		journal: newExecJournal(cfg.MaxEndedExecs, cfg.MaxEndedExecBytes),
		idsys:   realIdentitySys(),
	}
	root := cfg.ToolsRoot
	if root != "" {
		if err := validToolsRoot(root); err != nil {
			s.log.Error("ignoring the tools root; tools are not on PATH", "root", root, "err", err)
			root = ""
		} else if removed := removeToolLeftovers(root); len(removed) > 0 {
			s.log.Info("removed partial tool volumes left by a crash", "dirs", removed)
		}
	}
	s.tools = newToolRegistry(root, s.log)
	if r := cfg.ExecCgroupRoot; r != "" {
		c, err := openExecCgroups(r)
		if err != nil {
			s.log.Info("commands get no cgroups; killing a command finds its processes by token", "root", r, "reason", err)
		} else {
			s.cgroups = c
		}
	}
	if needsReaper() {
		s.waiter = sharedReaper()
	}
	s.stopping, s.stop = context.WithCancel(context.Background())
	agentpb.RegisterAgentServer(s.grpc, s)
	return s
}

// Serve accepts connections on l until Stop is called, then returns nil
// (also when Stop came first). It closes l.
func (s *Server) Serve(l net.Listener) error {
	s.log.Info("agent serving", "addr", l.Addr().String(), "version", Version, "pid1", os.Getpid() == 1)
	if err := s.grpc.Serve(l); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serving the agent on %s: %w", l.Addr(), err)
	}
	return nil
}

// Stop kills every running command and table process (its whole process
// group), lets the
// RPCs in flight finish and stops serving. It is safe to call more than once
// and from several goroutines; every call returns once the server stopped.
func (s *Server) Stop() {
	s.stopOnce.Do(func() {
		s.stop()
		done := make(chan struct{})
		go func() {
			s.grpc.GracefulStop()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(stopGrace):
			s.log.Warn("agent RPCs did not finish in time; closing connections", "grace", stopGrace)
			s.grpc.Stop()
			<-done
		}
	})
}

// Info answers with facts about the guest; it is also the readiness probe.
func (s *Server) Info(context.Context, *agentpb.InfoRequest) (*agentpb.InfoResponse, error) {
	resp := &agentpb.InfoResponse{
		Version:       Version,
		UptimeSeconds: uptime(),
		Pid1:          os.Getpid() == 1,
		Protocol:      protocolRevision,
	}
	var uts unix.Utsname
	if err := unix.Uname(&uts); err == nil {
		resp.Kernel = unix.ByteSliceToString(uts.Release[:])
	}
	resp.Hostname, _ = os.Hostname()
	return resp, nil
}

// uptime reads /proc/uptime for sub-second precision and falls back to
// sysinfo(2), which needs no /proc (an init may not have mounted it yet).
func uptime() float64 {
	if b, err := os.ReadFile("/proc/uptime"); err == nil {
		if f, _, ok := bytes.Cut(b, []byte(" ")); ok {
			if v, err := strconv.ParseFloat(string(f), 64); err == nil {
				return v
			}
		}
	}
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 0
	}
	return float64(si.Uptime)
}

// shutdownDelay lets the reply to Shutdown leave the guest before it powers
// off; the connection is closed by then, but vsock may still carry it.
const shutdownDelay = 100 * time.Millisecond

// Shutdown replies, then stops the server (killing running commands) and
// powers off or reboots the guest when the agent is PID 1. Otherwise, or if
// the kernel refuses, it calls OnShutdown. A second request while shutting
// down is acknowledged and ignored.
func (s *Server) Shutdown(_ context.Context, req *agentpb.ShutdownRequest) (*agentpb.ShutdownResponse, error) {
	reboot := req.GetReboot()
	s.shutdownOnce.Do(func() {
		s.log.Info("shutdown requested", "reboot", reboot)
		// Before replying, so that the host knows written files are durable.
		unix.Sync()
		go func() {
			s.Stop() // waits for this reply to be sent
			if os.Getpid() == 1 {
				time.Sleep(shutdownDelay)
				halt := Halt
				if s.cfg.PowerOff != nil {
					halt = s.cfg.PowerOff
				}
				err := halt(reboot)
				// Reached only when the kernel refused, e.g. in a container
				// without CAP_SYS_BOOT.
				s.log.Info("cannot power off the guest; ending the agent instead", "err", err)
			}
			if s.cfg.OnShutdown != nil {
				s.cfg.OnShutdown(reboot)
			}
		}()
	})
	return &agentpb.ShutdownResponse{}, nil
}

// Halt syncs file systems, then powers the machine off, or reboots it. It
// only returns on failure. It is for an agent that runs as PID 1: for
// anything else it ends the whole machine.
func Halt(reboot bool) error {
	unix.Sync()
	how := unix.LINUX_REBOOT_CMD_POWER_OFF
	if reboot {
		how = unix.LINUX_REBOOT_CMD_RESTART
	}
	if err := unix.Reboot(how); err != nil {
		return fmt.Errorf("reboot(%#x): %w", how, err)
	}
	return nil
}
