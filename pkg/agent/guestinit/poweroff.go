//go:build linux

package guestinit

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Grace periods of PowerOff.
const (
	// termGrace is how long processes get to exit after SIGTERM.
	termGrace = time.Second
	// killGrace is how long the kernel gets to end processes after
	// SIGKILL.
	killGrace = 500 * time.Millisecond
)

// PowerOff ends the guest the way an init must: it sends every other
// process SIGTERM, then SIGKILL after a second, syncs, remounts / read-only
// so the root file system is clean, and powers the machine off (or
// reboots it). It only returns on failure, and only runs as PID 1:
// anywhere else kill(-1) would end every process of the machine.
func PowerOff(log *slog.Logger, reboot bool) error {
	if os.Getpid() != 1 {
		return fmt.Errorf("%w: powering off is for the guest's init (PID 1), not pid %d", types.ErrInvalid, os.Getpid())
	}
	what := "power off"
	how := unix.LINUX_REBOOT_CMD_POWER_OFF
	if reboot {
		what, how = "reboot", unix.LINUX_REBOOT_CMD_RESTART
	}
	haltMu.Lock()
	defer haltMu.Unlock()
	log.Info("aetherium-init: preparing to " + what)
	prepareHaltLocked(log)
	log.Info("aetherium-init: " + what)
	if err := unix.Reboot(how); err != nil {
		return fmt.Errorf("reboot(%#x) to %s: %w", how, what, err)
	}
	return nil
}

// haltMu serializes preparing to halt: the init and the agent's Shutdown
// request may both be at it.
var haltMu sync.Mutex

// prepareHalt ends every other process, syncs and remounts / read-only, so
// that the machine can be powered off with clean file systems. The guest
// keeps running; calling it again is harmless.
func prepareHalt(log *slog.Logger) {
	haltMu.Lock()
	defer haltMu.Unlock()
	prepareHaltLocked(log)
}

func prepareHaltLocked(log *slog.Logger) {
	start := time.Now()
	endProcesses(log)
	unix.Sync()
	// Remounting read-only completes the journal, so the host finds the
	// file system clean. It fails harmlessly when / is the initramfs.
	if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		log.Warn("cannot remount / read-only; it is synced but may need journal recovery", "err", err)
	}
	unix.Sync()
	log.Info("ready to halt: processes ended, / read-only", "took", time.Since(start))
}

// endProcesses asks every other process to end with SIGTERM, waits up to
// termGrace, then kills what is left.
func endProcesses(log *slog.Logger) {
	if len(userProcesses()) == 0 {
		return
	}
	_ = unix.Kill(-1, unix.SIGTERM) // ESRCH: nothing left
	if waitNoProcesses(termGrace) {
		return
	}
	left := userProcesses()
	log.Warn("processes did not end on SIGTERM; killing them", "pids", left)
	_ = unix.Kill(-1, unix.SIGKILL)
	if !waitNoProcesses(killGrace) {
		log.Warn("processes survive SIGKILL", "pids", userProcesses())
	}
}

// waitNoProcesses polls until no user process is left, up to limit.
func waitNoProcesses(limit time.Duration) bool {
	deadline := time.Now().Add(limit)
	for len(userProcesses()) > 0 {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// pfKthread is the kernel's PF_KTHREAD task flag (include/linux/sched.h).
const pfKthread = 0x00200000

// userProcesses lists the live processes other than the init, leaving out
// kernel threads (which signals do not end) and zombies (already ended).
// kill(-1, 0) cannot tell: it counts kernel threads too. Without /proc it
// returns nil.
func userProcesses() []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == 1 {
			continue
		}
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // ended meanwhile
		}
		if state, flags, ok := parseStat(stat); ok && state != 'Z' && state != 'X' && flags&pfKthread == 0 {
			pids = append(pids, pid)
		}
	}
	return pids
}

// parseStat reads the state and flags fields of /proc/PID/stat. The
// command name in parentheses may hold spaces and parentheses, so fields
// are counted from its last ')'.
func parseStat(stat []byte) (state byte, flags uint64, ok bool) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, 0, false
	}
	// state ppid pgrp session tty_nr tpgid flags ...
	fields := bytes.Fields(stat[i+1:])
	if len(fields) < 7 || len(fields[0]) != 1 {
		return 0, 0, false
	}
	flags, err := strconv.ParseUint(string(fields[6]), 10, 64)
	if err != nil {
		return 0, 0, false
	}
	return fields[0][0], flags, true
}
