//go:build linux

package guestinit

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// StartMarker is the line the init writes to the console before anything
// else; the host's boot benchmark times the kernel's boot up to it.
const StartMarker = "aetherium-init: start"

// consolePath is the console device. The initramfs carries the node, so it
// opens before devtmpfs is mounted.
const consolePath = "/dev/console"

// openConsole opens the kernel console for writing. The kernel normally
// hands init the console as stdout already, but not when the node is
// missing from the initramfs; stderr is then the best there is.
func openConsole() io.Writer {
	f, err := os.OpenFile(consolePath, os.O_WRONLY|unix.O_NOCTTY, 0)
	if err != nil {
		return os.Stderr
	}
	return f
}

// NewConsoleLogger returns a logger that writes to w one line per record,
// each stamped like the kernel's own messages with seconds of
// CLOCK_MONOTONIC (time since boot), so the init's steps line up with the
// kernel's in the serial log.
func NewConsoleLogger(w io.Writer, level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(&stampWriter{w: w}, &slog.HandlerOptions{
		Level: level,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{} // stampWriter puts the boot time first
			}
			return a
		},
	}))
}

// stampWriter prefixes each write, one log record, with the time since
// boot.
type stampWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *stampWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	line := append(fmt.Appendf(nil, "[%12.6f] ", sinceBoot()), p...)
	if _, err := s.w.Write(line); err != nil {
		return 0, err
	}
	return len(p), nil
}

// sinceBoot returns CLOCK_MONOTONIC in seconds, which starts near zero at
// boot.
func sinceBoot() float64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0
	}
	return float64(ts.Sec) + float64(ts.Nsec)/1e9
}
