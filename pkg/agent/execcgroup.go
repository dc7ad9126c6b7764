package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sync"

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
	if err := os.Mkdir(root, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(root, "cgroup.kill")); err != nil {
		return nil, fmt.Errorf("the kernel has no cgroup.kill (Linux 5.14 or later): %w", err)
	}
	c := &execCgroups{root: root, live: map[string]bool{}}
	c.sweep() // left by an agent that ran before
	return c, nil
}

// dir is the cgroup of the command with token.
func (c *execCgroups) dir(token string) string { return filepath.Join(c.root, token) }

// enter makes the cgroup of the command with token and sets cmd to start
// in it. The returned function closes the cgroup's descriptor; call it
// once cmd started or failed to.
func (c *execCgroups) enter(cmd *exec.Cmd, token string) (func(), error) {
	c.sweep()
	d := c.dir(token)
	if err := os.Mkdir(d, 0o755); err != nil {
		return nil, err
	}
	fd, err := unix.Open(d, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		_ = unix.Rmdir(d)
		return nil, err
	}
	c.mu.Lock()
	c.live[token] = true
	c.mu.Unlock()
	cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, fd
	return func() { _ = unix.Close(fd) }, nil
}

// kill kills every process in the command's cgroup.
func (c *execCgroups) kill(token string) error {
	return os.WriteFile(filepath.Join(c.dir(token), "cgroup.kill"), []byte("1"), 0)
}

// release ends the command's claim on its cgroup and removes it if it is
// empty; processes the command left running (a background server) keep
// it, and a later sweep removes it once they are gone.
func (c *execCgroups) release(token string) {
	c.mu.Lock()
	delete(c.live, token)
	c.mu.Unlock()
	_ = unix.Rmdir(c.dir(token))
}

// sweep removes the empty cgroups of ended commands (rmdir fails on a
// populated one).
func (c *execCgroups) sweep() {
	entries, err := os.ReadDir(c.root)
	if err != nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range entries {
		if e.IsDir() && !c.live[e.Name()] {
			_ = unix.Rmdir(filepath.Join(c.root, e.Name()))
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

// endTree is called when the command with token has ended and its
// output is read: its cgroup goes once empty.
func (s *Server) endTree(token string) {
	if s.cgroups != nil {
		s.cgroups.release(token)
	}
}
