// Command fc-agent is the guest agent: it runs inside every VM or container
// and runs commands for the host over gRPC. See pkg/agent.
package main

import (
	"cmp"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"

	"github.com/aetherium/aetherium-core/pkg/agent"
)

func main() {
	os.Exit(run())
}

func run() int {
	listen := flag.String("listen", cmp.Or(os.Getenv("FC_AGENT_LISTEN"), fmt.Sprintf("vsock://:%d", agent.DefaultVsockPort)),
		"where to listen: vsock://:PORT, unix:///path or tcp://host:port (env FC_AGENT_LISTEN)")
	maxOutput := flag.Int("max-output-bytes", 0, "per-stream output cap for commands that set none (0: 1 MiB)")
	logLevel := flag.String("log-level", "info", "debug, info, warn or error")
	version := flag.Bool("version", false, "print the version and exit")
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

	l, err := agent.Listen(*listen)
	if err != nil {
		log.Error("cannot listen", "err", err)
		return halt(log, pid1, 1)
	}
	// Set when a Shutdown request already tried to power off.
	var requested atomic.Bool
	srv := agent.NewServer(agent.ServerConfig{
		MaxOutputBytes: *maxOutput,
		Logger:         log,
		OnShutdown: func(reboot bool) {
			requested.Store(true)
			log.Info("shut down by request", "reboot", reboot)
		},
	})

	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		sig := <-sigc
		log.Info("stopping", "signal", sig.String())
		srv.Stop()
	}()

	if err := srv.Serve(l); err != nil {
		log.Error("agent failed", "err", err)
		return halt(log, pid1, 1)
	}
	return halt(log, pid1 && !requested.Load(), 0)
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
