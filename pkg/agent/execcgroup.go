package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultExecCgroupRoot is where fc-agent makes the commands' cgroups:
// guestinit mounts cgroup v2 at /sys/fs/cgroup in every microVM.
const DefaultExecCgroupRoot = "/sys/fs/cgroup/aetherium-exec"

// execCgroups gives each command a cgroup v2 of its own, which it starts
// in (clone3's CLONE_INTO_CGROUP, so not even its first instruction runs
// outside) and which everything it starts inherits. Killing the command
// writes cgroup.kill (Linux 5.14): the kernel kills every member at once,
// also a process that cleared its environment (env -i, so the token of
// ExecTokenEnv is gone) and whose parent exited, which the scan of
// killTree cannot find. The scan still runs after it, for a process that
// moved itself out (only root can) and where there are no cgroups.
//
// It is used only where the agent can make cgroups (openExecCgroups): a
// microVM's agent is the guest's init; a container's cgroup file system
// is read-only, and there the token scan alone kills trees.
type execCgroups struct {
	root string

	mu sync.Mutex
	// live are the cgroups of commands not yet ended; a sweep leaves them
	// alone, even empty (a cgroup is made before its command starts in it).
	live map[string]bool
	// kept counts the cgroups of ended commands release could not remove
	// (background processes live on in them); a sweep runs only then.
	kept int
}

// openExecCgroups makes root, a directory on a cgroup v2 file system
// whose cgroups have cgroup.kill, and returns it; the error says why
// root cannot serve.
func openExecCgroups(root string) (*execCgroups, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Dir(root), &st); err != nil {
		return nil, err
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return nil, fmt.Errorf("%s is not a cgroup v2 file system", filepath.Dir(root))
	}
	if st.Flags&unix.ST_RDONLY != 0 {
		return nil, fmt.Errorf("%s is mounted read-only", filepath.Dir(root))
	}
	// A command starts in its cgroup through clone3 (CLONE_INTO_CGROUP).
	// A NULL argument of size 0 is EINVAL where clone3 exists; ENOSYS or
	// EPERM where the kernel lacks it or a seccomp filter refuses it.
	if _, _, errno := unix.Syscall(unix.SYS_CLONE3, 0, 0, 0); errno != unix.EINVAL {
		return nil, fmt.Errorf("clone3 is not available: %v", errno)
	}
	if err := os.Mkdir(root, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(root, "cgroup.kill")); err != nil {
		return nil, fmt.Errorf("the kernel has no cgroup.kill (Linux 5.14 or later): %w", err)
	}
	// kept: whatever an agent that ran before left is swept first.
	c := &execCgroups{root: root, live: map[string]bool{}, kept: 1}
	c.sweep()
	return c, nil
}

// dir is the cgroup of the command with token.
func (c *execCgroups) dir(token string) string { return filepath.Join(c.root, token) }

// enter makes the cgroup of the command with token and sets cmd to start
// in it. The returned function closes the cgroup's descriptor; call it
// once cmd started or failed to.
func (c *execCgroups) enter(cmd *exec.Cmd, token string) (func(), error) {
	c.sweep()
	// Live before it exists: a concurrent sweep must not take it between
	// its mkdir and the command's start (clone3 into a removed cgroup
	// fails, and the command with it).
	c.mu.Lock()
	c.live[token] = true
	c.mu.Unlock()
	d := c.dir(token)
	err := os.Mkdir(d, 0o755)
	fd := -1
	if err == nil {
		if fd, err = unix.Open(d, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err != nil {
			_ = unix.Rmdir(d)
		}
	}
	if err != nil {
		c.mu.Lock()
		delete(c.live, token)
		c.mu.Unlock()
		return nil, err
	}
	cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, fd
	return func() { _ = unix.Close(fd) }, nil
}

// kill kills every process in the command's cgroup.
func (c *execCgroups) kill(token string) error {
	return os.WriteFile(filepath.Join(c.dir(token), "cgroup.kill"), []byte("1"), 0)
}

// releaseWait bounds how long release waits for a killed command's
// processes to leave its cgroup: cgroup.kill is asynchronous, and a
// process closes its files (ending the output the agent waited for)
// before it leaves its cgroup.
const releaseWait = time.Second

// release ends the command's claim on its cgroup and removes it if it is
// empty; processes the command left running (a background server) keep
// it, and a later sweep removes it once they are gone. After a kill it
// waits, up to releaseWait, for the killed processes to leave.
func (c *execCgroups) release(token string, killed bool) {
	c.mu.Lock()
	delete(c.live, token)
	c.mu.Unlock()
	d := c.dir(token)
	deadline := time.Now().Add(releaseWait)
	for {
		err := unix.Rmdir(d)
		if err == unix.EBUSY && (!killed || time.Now().After(deadline)) {
			c.mu.Lock()
			c.kept++
			c.mu.Unlock()
			return
		}
		if err != unix.EBUSY {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// sweep removes the empty cgroups of ended commands (rmdir fails on a
// populated one). It holds mu throughout, so that no cgroup becomes live
// between the listing and its removal.
func (c *execCgroups) sweep() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.kept == 0 {
		return
	}
	entries, err := os.ReadDir(c.root)
	if err != nil {
		return
	}
	c.kept = 0
	for _, e := range entries {
		if e.IsDir() && !c.live[e.Name()] {
			if err := unix.Rmdir(filepath.Join(c.root, e.Name())); err != nil && err != unix.ENOENT {
				c.kept++
			}
		}
	}
}

// markTree makes cmd one command's tree: the token in its environment
// (ExecTokenEnv) and, where the agent has exec cgroups, a cgroup of its
// own. started must be called once cmd started or failed to start.
func (s *Server) markTree(cmd *exec.Cmd) (token string, started func()) {
	token = newExecToken()
	cmd.Env = withExecToken(cmd.Env, token)
	started = func() {}
	if s.cgroups != nil {
		done, err := s.cgroups.enter(cmd, token)
		if err != nil {
			// The token scan still kills the tree.
			s.log.Warn("cannot give the command a cgroup; its tree is found by its token alone", "err", err)
		} else {
			started = done
		}
	}
	return token, started
}

// killTree kills the command led by leader with token and everything it
// started: its cgroup at once, where it has one, then the scan of the
// package's killTree.
func (s *Server) killTree(leader int, token string) {
	if s.cgroups != nil {
		if err := s.cgroups.kill(token); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.log.Warn("killing the command's cgroup", "err", err)
		}
	}
	killTree(leader, token)
}

// endTree is called when the command with token has ended (killed: by
// killTree) and its output is read: its cgroup goes once empty.
func (s *Server) endTree(token string, killed bool) {
	if s.cgroups != nil {
		s.cgroups.release(token, killed)
	}
}

// startTree starts cmd, marked by markTree, with s.waiter. Should the
// start into its cgroup fail, it is tried once without: clone3 can be
// refused where the probe passed (a cgroup made invalid meanwhile), and
// the token still finds the tree. A start that failed ran nothing (the
// program was never executed), so trying again cannot run it twice; a
// command that cannot run fails the same way the second time.
func (s *Server) startTree(cmd *exec.Cmd) (<-chan waitResult, error) {
	waitc, err := s.waiter.start(cmd)
	if err == nil || !cmd.SysProcAttr.UseCgroupFD {
		return waitc, err
	}
	cmd.SysProcAttr.UseCgroupFD = false
	waitc, err2 := s.waiter.start(cmd)
	if err2 == nil {
		s.log.Warn("the command could not start in its cgroup; started it without (its tree is found by its token)", "err", err)
	}
	return waitc, err2
}
