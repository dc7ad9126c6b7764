//go:build linux

// Package guestinit lets fc-agent be a microVM's init (PID 1) when the
// kernel starts it from an initramfs: it mounts the kernel file systems,
// loads the virtio and vsock modules, switches to the root disk, sets the
// hostname and loopback up, serves the agent, and powers the guest off
// cleanly. Every step is logged to the serial console with the time since
// boot, so the host's console log shows the boot.
//
// The boot contract (what the initramfs holds and what the kernel command
// line says) is described by ModulesOrder, ModulesDir, NewRootDir and
// Config.
package guestinit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
)

// InitFlag on fc-agent's command line forces init mode.
const InitFlag = "--init"

// Detect reports whether the process should be the guest's init, given
// its arguments (os.Args): InitFlag is among them, or it is PID 1 and
// either /proc is not mounted yet (a container runtime mounts it before
// starting PID 1, the kernel does not) or it was started as /init.
func Detect(args []string) bool {
	if len(args) > 1 && slices.ContainsFunc(args[1:], func(a string) bool { return a == InitFlag || a == "-init" }) {
		return true
	}
	if os.Getpid() != 1 {
		return false
	}
	if len(args) > 0 && args[0] == "/init" {
		return true
	}
	_, err := os.Stat("/proc/self/stat")
	return err != nil
}

// ServeFunc serves the agent on l until ctx is cancelled (the guest is
// asked to power off) or a Shutdown request stops it.
type ServeFunc func(ctx context.Context, l net.Listener, log *slog.Logger) error

// agentHaltWait bounds how long the init waits for the agent to power the
// guest off after a Shutdown request stopped it.
const agentHaltWait = 5 * time.Second

// Run is the guest's init: it writes StartMarker to the console, reads the
// kernel command line, runs Setup, listens on cfg.Listen, serves the agent
// with serve and powers the guest off when serve returns. SIGTERM, SIGINT
// (ctrl-alt-del) and SIGPWR power the guest off cleanly. Run never
// returns, as init must not exit; on any failure it logs and powers off.
// Not PID 1, it prints why and exits with code 2.
func Run(serve ServeFunc) {
	if os.Getpid() != 1 {
		fmt.Fprintf(os.Stderr, "fc-agent: %s is for a guest's init and needs PID 1, not pid %d\n", InitFlag, os.Getpid())
		os.Exit(2)
	}
	con := openConsole()
	// First of all: the boot benchmark times the kernel up to this line.
	fmt.Fprintln(con, StartMarker)
	log := NewConsoleLogger(con, slog.LevelInfo)
	// Before anything else can take time: until a handler is installed, Go
	// would exit on SIGTERM, and init exiting panics the kernel.
	ctx := handleSignals(log)
	defer func() {
		if r := recover(); r != nil {
			fatal(log, fmt.Errorf("panic: %v\n%s", r, debug.Stack()))
		}
	}()

	// /proc/cmdline is needed even for the raw benchmark.
	if err := mountOnce(earlyMounts[0], slog.New(slog.DiscardHandler)); err != nil {
		fatal(log, err)
	}
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		fatal(log, fmt.Errorf("reading the kernel command line: %w", err))
	}
	cfg, cfgErr := ParseCmdline(string(b))
	if cfg.Raw {
		unix.Sync()
		_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
		fatal(log, fmt.Errorf("aetherium.init=raw: the kernel refused to power off"))
	}
	log = NewConsoleLogger(con, cfg.LogLevel)
	log.Info("aetherium-init: booting", "cmdline", strings.TrimSpace(string(b)), "agent", agent.Version)
	if cfgErr != nil {
		log.Warn("ignoring invalid kernel parameters", "err", cfgErr)
	}

	var l net.Listener
	deferred, err := Setup(ctx, cfg, log, func() error {
		var err error
		if l, err = agent.ListenChannel(cfg.Listen); err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		// The host starts connecting on this line, so it goes to the
		// console whatever aetherium.log says; the connection waits in the
		// listen backlog until the agent serves.
		fmt.Fprintln(con, AgentReadyLine+" "+describeAddr(l.Addr()))
		return nil
	})
	if err != nil {
		fatal(log, err)
	}
	go LoadDeferred(deferred, log)
	if err := serve(ctx, l, log); err != nil {
		fatal(log, fmt.Errorf("agent: %w", err))
	}
	if ctx.Err() == nil {
		// A Shutdown request stopped the agent, which powers the guest off
		// or reboots it itself a moment later (agent.Halt), as it was
		// asked. Leave it the file systems clean, and power off if it
		// does not.
		log.Info("aetherium-init: shutdown requested")
		prepareHalt(log)
		time.Sleep(agentHaltWait)
		log.Warn("the agent did not power the guest off; doing so", "waited", agentHaltWait)
	}
	halt(log, errors.Is(context.Cause(ctx), errCtrlAltDel))
}

// handleSignals makes ctrl-alt-del send SIGINT to init rather than reboot
// at once, and returns a context cancelled by SIGTERM, SIGINT or SIGPWR.
// Every other signal is logged and ignored: Go's default for most of them
// is to exit, and an exiting init panics the kernel.
// errCtrlAltDel is the cause of a stop by ctrl-alt-del.
var errCtrlAltDel = errors.New("ctrl-alt-del")

// AgentReadyLine starts the console line init prints once the agent
// listens; the host waits for it before connecting.
const AgentReadyLine = bootparams.ReadyLine

func handleSignals(log *slog.Logger) context.Context {
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF); err != nil {
		log.Warn("cannot route ctrl-alt-del to init; it will reboot at once", "err", err)
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	sigc := make(chan os.Signal, 8)
	signal.Notify(sigc) // all of them
	go func() {
		for sig := range sigc {
			switch sig {
			case syscall.SIGINT:
				// Ctrl-Alt-Del (Firecracker's SendCtrlAltDel): reboot, which
				// ends the VMM under reboot=k (Firecracker) and -no-reboot
				// (QEMU), where a power-off may not.
				log.Info("aetherium-init: rebooting on ctrl-alt-del", "signal", sig.String())
				cancel(errCtrlAltDel)
			case syscall.SIGTERM, syscall.SIGPWR:
				log.Info("aetherium-init: powering off on signal", "signal", sig.String())
				cancel(fmt.Errorf("signal %s", sig))
			case syscall.SIGCHLD, syscall.SIGURG, syscall.SIGWINCH:
				// SIGCHLD is the agent's reaper's; SIGURG is the Go
				// runtime's preemption.
			default:
				log.Info("ignoring signal", "signal", sig.String())
			}
		}
	}()
	return ctx
}

// describeAddr names a listening address for the console: "vsock port
// 9999" rather than vsock's "vm(4294967295):9999".
func describeAddr(a net.Addr) string {
	if v, ok := a.(*vsock.Addr); ok {
		return fmt.Sprintf("vsock port %d", v.Port)
	}
	return a.Network() + " " + a.String()
}

// fatal logs err and powers the guest off; it never returns.
func fatal(log *slog.Logger, err error) {
	log.Error("aetherium-init: fatal error; powering off", "err", err)
	halt(log, false)
}

// halt powers off or reboots; if the kernel refuses, the init can only
// idle, since exiting would panic the kernel.
func halt(log *slog.Logger, reboot bool) {
	err := PowerOff(log, reboot)
	log.Error("aetherium-init: cannot power off; idling", "err", err)
	for {
		time.Sleep(time.Hour)
	}
}
