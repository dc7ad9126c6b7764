// Command fc-agent is the guest agent: it runs inside every VM or container
// and runs commands for the host over gRPC. See pkg/agent.
package main

import (
	"cmp"
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/agent/guestinit"
	"github.com/aetherium/aetherium-core/pkg/types"
)

func main() {
	// As a microVM's init, the kernel command line configures the agent.
	if guestinit.Detect(os.Args) {
		guestinit.Run(func(ctx context.Context, l net.Listener, log *slog.Logger) error {
			_, err := serve(ctx, l, log, 0, func(reboot bool) error { return guestinit.PowerOff(log, reboot) })
			return err
		}) // never returns
	}
	os.Exit(run())
}

func run() int {
	listen := flag.String("listen", cmp.Or(os.Getenv("FC_AGENT_LISTEN"), fmt.Sprintf("vsock://:%d", agent.DefaultVsockPort)),
		"where to listen: vsock://:PORT, serial://NAME, unix:///path or tcp://host:port (env FC_AGENT_LISTEN)")
	maxOutput := flag.Int("max-output-bytes", 0, "per-stream output cap for commands that set none (0: 1 MiB)")
	logLevel := flag.String("log-level", "info", "debug, info, warn or error")
	version := flag.Bool("version", false, "print the version and exit")
	flag.Bool("init", false, "be the microVM's init (PID 1), configured by the kernel command line; "+
		"automatic when PID 1 without /proc mounted or started as /init")
	flag.Parse()
	if *version {
		fmt.Println(agent.Version)
		return 0
	}

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "fc-agent: --log-level %q: use debug, info, warn or error\n", *logLevel)
		return 2
	}
	if *maxOutput < 0 {
		fmt.Fprintf(os.Stderr, "fc-agent: --max-output-bytes %d is negative\n", *maxOutput)
		return 2
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	pid1 := os.Getpid() == 1

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	l, err := agent.ListenChannel(*listen)
	if err != nil {
		log.Error("cannot listen", "err", err)
		return halt(log, pid1, 1)
	}
	requested, err := serve(ctx, l, log, *maxOutput, nil)
	if err != nil {
		log.Error("agent failed", "err", err)
		return halt(log, pid1, 1)
	}
	return halt(log, pid1 && !requested, 0)
}

// serve runs the agent on l until ctx is done or a Shutdown request stops
// it; requested reports whether a Shutdown request already tried to power
// off.
func serve(ctx context.Context, l net.Listener, log *slog.Logger, maxOutput int, powerOff func(bool) error) (requested bool, err error) {
	var req atomic.Bool
	srv := agent.NewServer(agent.ServerConfig{
		MaxOutputBytes: maxOutput,
		Logger:         log,
		PowerOff:       powerOff,
		// The docker backend sets it in the container; as init, the
		// kernel parameter bootparams.ToolsRoot (guestinit.Setup).
		ToolsRoot: os.Getenv(types.ToolsRootEnv),
		// As the guest's init, commands get cgroups (guestinit mounts
		// cgroup v2; a container's is read-only, and the agent then
		// says so and kills by token). An agent run as an ordinary
		// process leaves the host's cgroups alone.
		ExecCgroupRoot: execCgroupRoot(),
		OnShutdown: func(reboot bool) {
			req.Store(true)
			log.Info("shut down by request", "reboot", reboot)
		},
	})
	defer context.AfterFunc(ctx, func() {
		log.Info("stopping", "cause", context.Cause(ctx).Error())
		srv.Stop()
	})()
	err = srv.Serve(l)
	return req.Load(), err
}

// halt powers the guest off when the agent is init, since init exiting
// makes the kernel panic; otherwise, or if that fails (in a container), it
// returns code for the process to exit with.
func halt(log *slog.Logger, pid1 bool, code int) int {
	if pid1 {
		err := agent.Halt(false)
		log.Error("cannot power off", "err", err)
	}
	return code
}

// execCgroupRoot is agent.DefaultExecCgroupRoot when the agent is PID 1,
// else none.
func execCgroupRoot() string {
	if os.Getpid() == 1 {
		return agent.DefaultExecCgroupRoot
	}
	return ""
}
