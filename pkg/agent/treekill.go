package agent

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// ExecTokenEnv is the environment variable the agent gives every command
// Exec runs, set to a random token of that execution. Processes inherit
// it, so everything the command starts carries it, also what leaves its
// process group (setsid) or is re-parented away from it (a double-forked
// daemon); killing the command finds them by it. It is visible to the
// command; a value the request sets is replaced. A process that clears
// its environment (env -i) is still found while its parent lives, through
// the parent links.
//
// Where the agent can make cgroups (a microVM's guest), each command also
// gets a cgroup of its own (execCgroups), which finds even a process
// that cleared its environment and whose parent exited; the scan of
// /proc remains for a container, whose cgroup file system is read-only.
// The agent is not made a child subreaper: in
// every backend it is PID 1 already, so orphans are re-parented to it and
// its reaper collects them; elsewhere (an agent run in-process by tests)
// the killed orphans go to the nearest subreaper or init, which reaps
// them, and the token still finds them while they live.
const ExecTokenEnv = "AETHERIUM_EXEC_TOKEN"

// Bounds of killTree: a pass freezes what it finds until a scan finds
// nothing new, for at most treeFreezeRounds scans, then kills; passes
// repeat while processes of the command remain, at most treeKillPasses
// times. A stopped process cannot fork, so one pass normally suffices;
// the bounds only keep a pathological case (a fork bomb outrunning the
// scans) from holding the agent.
const (
	treeFreezeRounds = 100
	treeKillPasses   = 5
)

// newExecToken returns a fresh value for ExecTokenEnv (128 random bits).
func newExecToken() string { return rand.Text() }

// withExecToken returns env (KEY=value entries) without any ExecTokenEnv
// entry, plus the one for token.
func withExecToken(env []string, token string) []string {
	out := make([]string, 0, len(env)+1)
	for _, kv := range env {
		if len(kv) > len(ExecTokenEnv) && kv[:len(ExecTokenEnv)+1] == ExecTokenEnv+"=" {
			continue
		}
		out = append(out, kv)
	}
	return append(out, ExecTokenEnv+"="+token)
}

// procStat is what killTree needs of /proc/PID/stat.
type procStat struct {
	pid, ppid, pgrp int
	zombie          bool
}

// readProcStat parses /proc/PID/stat; ok is false when the process is
// gone or the file is unreadable.
func readProcStat(pid int) (procStat, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procStat{}, false
	}
	// The command name, in parentheses, may hold spaces and parentheses:
	// the fields start after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, false
	}
	f := bytes.Fields(b[i+1:]) // state ppid pgrp session ...
	if len(f) < 3 {
		return procStat{}, false
	}
	ppid, err1 := strconv.Atoi(string(f[1]))
	pgrp, err2 := strconv.Atoi(string(f[2]))
	if err1 != nil || err2 != nil {
		return procStat{}, false
	}
	return procStat{pid: pid, ppid: ppid, pgrp: pgrp, zombie: f[0][0] == 'Z' || f[0][0] == 'X'}, true
}

// hasToken reports whether pid's initial environment holds
// ExecTokenEnv=token.
func hasToken(pid int, token string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil || len(b) == 0 {
		return false
	}
	needle := []byte("\x00" + ExecTokenEnv + "=" + token + "\x00")
	env := make([]byte, 0, len(b)+2)
	env = append(append(append(env, 0), b...), 0)
	return bytes.Contains(env, needle)
}

// listPids lists the pids under /proc.
func listPids() ([]int, error) {
	d, err := os.Open("/proc")
	if err != nil {
		return nil, err
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil, err
	}
	pids := make([]int, 0, len(names))
	for _, n := range names {
		if pid, err := strconv.Atoi(n); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// heldProc is a process killTree has frozen: fd is its pidfd, so that the
// signals reach that process even if it dies and its pid is reused; -1
// where the kernel has no pidfds (before 5.3), then the pid is signalled.
type heldProc struct {
	pid, fd int
}

func (h heldProc) signal(sig syscall.Signal) {
	if h.fd >= 0 {
		_ = unix.PidfdSendSignal(h.fd, sig, nil, 0)
		return
	}
	_ = syscall.Kill(h.pid, sig)
}

// killTree kills the command led by leader and every process it started:
// the members of its process group, the processes carrying its token (see
// ExecTokenEnv) and the descendants of all of them. They are stopped
// (SIGSTOP) as they are found, so that none forks or exits (re-parenting
// its children) while the tree is being walked, then all are killed. It
// returns how many processes it killed. Zombies are skipped: they are dead
// already, and their parent (the agent's reaper, init or a subreaper)
// collects them. Without a readable /proc only the group is killed, as
// before protocol 5. The agent itself and PID 1 are never signalled.
func killTree(leader int, token string) int {
	if leader <= 1 {
		return 0
	}
	_ = syscall.Kill(-leader, syscall.SIGKILL)
	killed := 0
	for range treeKillPasses {
		n := killPass(leader, token)
		killed += n
		if n == 0 {
			break
		}
	}
	return killed
}

// killPass is one freeze-then-kill pass of killTree.
func killPass(leader int, token string) int {
	self := os.Getpid()
	held := make(map[int]heldProc)
	defer func() {
		for _, h := range held {
			if h.fd >= 0 {
				unix.Close(h.fd)
			}
		}
	}()
	belongs := func(st procStat) bool {
		if st.pid == self || st.pid == 1 || st.zombie {
			return false
		}
		_, parentHeld := held[st.ppid]
		return st.pgrp == leader || parentHeld || (token != "" && hasToken(st.pid, token))
	}
	for range treeFreezeRounds {
		pids, err := listPids()
		if err != nil {
			break
		}
		found := false
		// Parents are usually listed before their children (lower pids),
		// so most of a tree is taken in one scan; the rounds catch the
		// rest.
		for _, pid := range pids {
			if _, ok := held[pid]; ok {
				continue
			}
			st, ok := readProcStat(pid)
			if !ok || !belongs(st) {
				continue
			}
			fd, err := unix.PidfdOpen(pid, 0)
			switch {
			case errors.Is(err, unix.ESRCH):
				continue // gone
			case err != nil:
				// No pidfds: an old kernel (ENOSYS) or a seccomp profile
				// (EPERM). The pid is signalled instead.
				fd = -1
			}
			// Checked again through the pidfd's process: the pid may have
			// been reused between the scan and the open.
			if st, ok = readProcStat(pid); !ok || !belongs(st) {
				if fd >= 0 {
					unix.Close(fd)
				}
				continue
			}
			h := heldProc{pid: pid, fd: fd}
			h.signal(syscall.SIGSTOP)
			held[pid] = h
			found = true
		}
		if !found {
			break
		}
	}
	for _, h := range held {
		h.signal(syscall.SIGKILL)
	}
	return len(held)
}
