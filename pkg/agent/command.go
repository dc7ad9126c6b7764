package agent

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// defaultPath ends every command's PATH unless the request sets one; the
// tool volumes' bin directories come before it (toolRegistry). The
// agent's own environment is not inherited: as PID 1 it has next to none,
// and commands should not depend on how the agent was started.
const defaultPath = bootparams.DefaultPath

// Exit codes of commands that never ran, as a shell reports them.
const (
	exitNotFound      = bootparams.ExitNotFound
	exitCannotExecute = bootparams.ExitCannotExecute
)

// startError is a program that is missing or cannot be run. The request
// itself was valid, so Exec reports it as a shell would: exit code 127
// (not found) or 126 (found but not executable), with the reason on
// stderr. Every other error of newCmd is a request the agent refuses.
type startError struct {
	code   int    // exitNotFound or exitCannotExecute
	name   string // the program as the request named it
	reason string // "command not found", "permission denied", ...
	err    error  // the underlying error, if any
}

func (e *startError) Error() string { return e.name + ": " + e.reason }
func (e *startError) Unwrap() error { return e.err }

func notFound(name string) *startError {
	return &startError{code: exitNotFound, name: name, reason: "command not found", err: exec.ErrNotFound}
}

// cannotRun explains why the program at path, which was found, failed to
// start. ENOENT for a file that exists means its script interpreter or
// dynamic loader is missing; a shell reports that as 126 too.
func cannotRun(name, path string, err error) *startError {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return &startError{code: exitCannotExecute, name: name, reason: err.Error(), err: err}
	}
	se := &startError{code: exitCannotExecute, name: name, reason: errno.Error(), err: err}
	if errno == syscall.ENOENT {
		if _, statErr := os.Stat(path); errors.Is(statErr, fs.ErrNotExist) {
			se.code = exitNotFound
		} else {
			se.reason = "bad interpreter or dynamic loader: " + errno.Error()
		}
	}
	return se
}

// identity is who a command runs as.
type identity struct {
	cred *syscall.Credential // nil: the agent's own user
	name string              // for USER and LOGNAME; may be empty
	home string
}

// selfIdentity describes the agent's own user. A static build reads
// /etc/passwd itself; a guest without an entry still gets a usable HOME.
func selfIdentity() identity {
	if u, err := user.Current(); err == nil {
		return identity{name: u.Username, home: cmp.Or(u.HomeDir, "/")}
	}
	return identity{home: cmp.Or(os.Getenv("HOME"), "/")}
}

// lookupIdentity resolves a user name or numeric uid. Switching users needs
// root; an unprivileged agent accepts only its own uid.
func (s *Server) lookupIdentity(spec string) (identity, error) {
	if spec == "" {
		return s.self, nil
	}
	u, err := lookupUser(spec)
	if err != nil {
		return identity{}, err
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err := errors.Join(err1, err2); err != nil {
		return identity{}, fmt.Errorf("user %q has a non-numeric uid or gid: %w", spec, err)
	}
	id := identity{name: u.Username, home: cmp.Or(u.HomeDir, "/")}
	euid := os.Geteuid()
	if euid != 0 {
		if uint64(euid) == uid {
			return id, nil
		}
		return identity{}, fmt.Errorf("the agent runs as uid %d and cannot run commands as user %q; run fc-agent as root to switch users", euid, spec)
	}
	id.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	if gids, err := u.GroupIds(); err == nil {
		for _, g := range gids {
			if n, err := strconv.ParseUint(g, 10, 32); err == nil {
				id.cred.Groups = append(id.cred.Groups, uint32(n))
			}
		}
	}
	return id, nil
}

// lookupUser accepts a name or a numeric uid. A uid without a passwd entry
// runs with gid 0 and HOME=/, as `docker run --user` does.
func lookupUser(spec string) (*user.User, error) {
	if _, err := strconv.ParseUint(spec, 10, 32); err != nil {
		u, err := user.Lookup(spec)
		if err != nil {
			return nil, fmt.Errorf("looking up user %q: %w", spec, err)
		}
		return u, nil
	}
	u, err := user.LookupId(spec)
	var unknown user.UnknownUserIdError
	if errors.As(err, &unknown) {
		return &user.User{Uid: spec, Gid: "0", HomeDir: "/"}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("looking up uid %s: %w", spec, err)
	}
	return u, nil
}

// buildCmd turns a request into a command that is ready to start, in its
// own process group so that it and everything it spawns can be killed
// together.
func (s *Server) buildCmd(start *agentpb.ExecStart) (*exec.Cmd, error) {
	return s.newCmd(start.GetCmd(), start.GetArgs(), start.GetEnv(), start.GetUser(),
		func(home string) (string, error) { return workDir(start.GetCwd(), home) })
}

// newCmd builds a command run as user (see lookupIdentity) in its own
// process group, with PATH (the tools' bin directories, then
// defaultPath), HOME, USER and LOGNAME under env. dir picks
// the working directory from the user's home. A missing or unusable
// program is a *startError; any other error is a request that cannot be
// run as given.
func (s *Server) newCmd(name string, args []string, reqEnv map[string]string, userSpec string, dir func(home string) (string, error)) (*exec.Cmd, error) {
	if name == "" {
		return nil, errors.New("command is empty")
	}
	if err := types.ValidateEnv(reqEnv); err != nil {
		return nil, err
	}
	id, err := s.lookupIdentity(userSpec)
	if err != nil {
		return nil, err
	}
	env := map[string]string{"PATH": s.tools.commandPath(), "HOME": id.home}
	if id.name != "" {
		env["USER"], env["LOGNAME"] = id.name, id.name
	}
	maps.Copy(env, reqEnv)

	wd, err := dir(id.home)
	if err != nil {
		return nil, err
	}
	path, err := lookPath(name, env["PATH"], wd)
	if err != nil {
		return nil, err
	}
	cmd := &exec.Cmd{
		Path:        path,
		Args:        append([]string{name}, args...),
		Dir:         wd,
		SysProcAttr: &syscall.SysProcAttr{Setpgid: true, Credential: id.cred},
	}
	for _, k := range slices.Sorted(maps.Keys(env)) {
		cmd.Env = append(cmd.Env, k+"="+env[k])
	}
	return cmd, nil
}

// workDir checks the working directory before the fork, because a failed
// chdir in the child is reported as a failed exec of the program, which
// misleads.
func workDir(cwd, home string) (string, error) {
	if cwd == "" {
		// Home, like a login shell, when it exists; many guests have no
		// home directory for root.
		if fi, err := os.Stat(home); err == nil && fi.IsDir() {
			return home, nil
		}
		return "/", nil
	}
	if !filepath.IsAbs(cwd) {
		return "", fmt.Errorf("working directory %q must be an absolute path", cwd)
	}
	fi, err := os.Stat(cwd)
	if err != nil {
		return "", fmt.Errorf("working directory: %w", err)
	}
	if !fi.IsDir() {
		return "", fmt.Errorf("working directory %s is not a directory", cwd)
	}
	return cwd, nil
}

// lookPath finds the program as a shell would, with the command's PATH
// rather than the agent's as exec.LookPath would use. A name with a slash
// is taken as a path, relative ones against dir. Relative PATH entries
// are skipped for the reason exec.ErrDot exists. Errors are *startError:
// nothing found is 127; a file found that cannot be executed (no exec
// bit, a directory named as a path) is 126, like bash.
func lookPath(file, pathEnv, dir string) (string, error) {
	if strings.Contains(file, "/") {
		p := file
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		fi, err := os.Stat(p)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return "", &startError{code: exitNotFound, name: file, reason: "no such file or directory", err: err}
		case err != nil:
			return "", cannotRun(file, p, err)
		case fi.IsDir():
			return "", &startError{code: exitCannotExecute, name: file, reason: "is a directory", err: syscall.EISDIR}
		case fi.Mode().Perm()&0o111 == 0:
			return "", &startError{code: exitCannotExecute, name: file, reason: "permission denied", err: fs.ErrPermission}
		}
		return p, nil
	}
	var denied string // a match without an exec bit, reported if nothing better is found
	for _, d := range filepath.SplitList(pathEnv) {
		if !filepath.IsAbs(d) {
			continue
		}
		p := filepath.Join(d, file)
		fi, err := os.Stat(p)
		if err != nil || !fi.Mode().IsRegular() {
			continue // directories in PATH are skipped, as shells do
		}
		if fi.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
		if denied == "" {
			denied = p
		}
	}
	if denied != "" {
		return "", &startError{code: exitCannotExecute, name: denied, reason: "permission denied", err: fs.ErrPermission}
	}
	return "", notFound(file)
}

// homePath resolves p the way a shell in home would: absolute paths stay,
// "~" and "~/x" and relative paths are taken from home, and "" is home
// itself. The result is clean.
func homePath(p, home string) string {
	switch {
	case p == "" || p == "~":
		return filepath.Clean(home)
	case strings.HasPrefix(p, "~/"):
		return filepath.Join(home, p[2:])
	case filepath.IsAbs(p):
		return filepath.Clean(p)
	default:
		return filepath.Join(home, p)
	}
}

// processDir is the working directory of a table process: cwd resolved
// against home (see homePath). An empty cwd whose home does not exist is
// "/", as for Exec, since many guests have no home for root.
func processDir(cwd, home string) (string, error) {
	dir := homePath(cwd, home)
	fi, err := os.Stat(dir)
	if err != nil {
		if cwd == "" {
			return "/", nil
		}
		if errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("cwd '%s' does not exist", dir)
		}
		return "", fmt.Errorf("cwd '%s': %w", dir, err)
	}
	if !fi.IsDir() {
		return "", fmt.Errorf("cwd '%s' is not a directory", dir)
	}
	return dir, nil
}
