package agent

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
)

// listDirBatch is how many entries one ListDir message carries: a deep
// listing can run into the hundreds of thousands, more than one gRPC
// message may hold.
const listDirBatch = 256

// resolvePath makes a request path absolute against the home of userSpec
// (see homePath). required rejects an empty path, which would otherwise
// name the home directory itself: too easy to remove or move by mistake.
func (s *Server) resolvePath(p, userSpec string, required bool) (string, error) {
	if p == "" && required {
		return "", status.Error(codes.InvalidArgument, "path is empty; give an absolute path or one relative to the user's home")
	}
	if filepath.IsAbs(p) {
		return filepath.Clean(p), nil
	}
	id, err := s.lookupIdentity(userSpec)
	if err != nil {
		return "", status.Errorf(codes.InvalidArgument, "cannot resolve %q against the home of user %q: %v; give an absolute path or a user from the guest's /etc/passwd", p, userSpec, err)
	}
	return homePath(p, id.home), nil
}

// Stat describes path itself, not what a symlink there points to.
func (s *Server) Stat(_ context.Context, req *agentpb.StatRequest) (*agentpb.StatResponse, error) {
	path, err := s.resolvePath(req.GetPath(), req.GetUser(), false)
	if err != nil {
		return nil, err
	}
	entry, err := lstatEntry(path, newNameCache())
	if err != nil {
		return nil, err
	}
	return &agentpb.StatResponse{Entry: entry}, nil
}

// ListDir streams the entries below a directory, depth levels deep, each
// directory's entries sorted by name and followed by its children's.
// Symlinks are listed, never followed; path itself may be a symlink to a
// directory. Subdirectories that cannot be read are skipped.
func (s *Server) ListDir(req *agentpb.ListDirRequest, stream grpc.ServerStreamingServer[agentpb.ListDirResponse]) error {
	root, err := s.resolvePath(req.GetPath(), req.GetUser(), false)
	if err != nil {
		return err
	}
	fi, err := os.Stat(root)
	if err != nil {
		return fileStatus(err)
	}
	if !fi.IsDir() {
		return status.Errorf(codes.InvalidArgument, "%s is not a directory", root)
	}
	depth := max(int(req.GetDepth()), 1)
	names := newNameCache()
	batch := &agentpb.ListDirResponse{}
	flush := func() error {
		if len(batch.Entries) == 0 {
			return nil
		}
		err := stream.Send(batch)
		batch = &agentpb.ListDirResponse{}
		return err
	}
	var walk func(dir string, level int) error
	walk = func(dir string, level int) error {
		ents, err := os.ReadDir(dir)
		if err != nil && level == 1 && len(ents) == 0 {
			return fileStatus(err)
		}
		for _, e := range ents {
			fi, err := e.Info()
			if err != nil {
				continue // removed since it was listed
			}
			p := filepath.Join(dir, e.Name())
			batch.Entries = append(batch.Entries, entryInfo(p, fi, names))
			if len(batch.Entries) >= listDirBatch {
				if err := flush(); err != nil {
					return err
				}
			}
			if e.IsDir() && level < depth {
				if err := walk(p, level+1); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := walk(root, 1); err != nil {
		return err
	}
	return flush()
}

// MakeDir creates a directory and its missing parents, giving the ones it
// creates to the request's user. An existing directory (or a symlink to
// one) answers AlreadyExists, anything else in the way InvalidArgument.
func (s *Server) MakeDir(_ context.Context, req *agentpb.MakeDirRequest) (*agentpb.MakeDirResponse, error) {
	path, err := s.resolvePath(req.GetPath(), req.GetUser(), true)
	if err != nil {
		return nil, err
	}
	owner, err := s.fileOwner(req.GetUser())
	if err != nil {
		return nil, err
	}
	if fi, err := os.Stat(path); err == nil {
		if fi.IsDir() {
			return nil, status.Errorf(codes.AlreadyExists, "directory %s already exists", path)
		}
		return nil, status.Errorf(codes.InvalidArgument, "%s exists and is not a directory", path)
	}
	if err := makeParents(path, owner); err != nil {
		return nil, notDirInvalid(err)
	}
	entry, err := lstatEntry(path, newNameCache())
	if err != nil {
		return nil, err
	}
	return &agentpb.MakeDirResponse{Entry: entry}, nil
}

// Move renames source to destination, creating the destination's missing
// parent directories for the request's user. Like rename(2), it replaces
// a destination file and fails across file systems.
func (s *Server) Move(_ context.Context, req *agentpb.MoveRequest) (*agentpb.MoveResponse, error) {
	src, err := s.resolvePath(req.GetSource(), req.GetUser(), true)
	if err != nil {
		return nil, err
	}
	dst, err := s.resolvePath(req.GetDestination(), req.GetUser(), true)
	if err != nil {
		return nil, err
	}
	owner, err := s.fileOwner(req.GetUser())
	if err != nil {
		return nil, err
	}
	if _, err := os.Lstat(src); err != nil {
		return nil, fileStatus(err)
	}
	if err := makeParents(filepath.Dir(dst), owner); err != nil {
		return nil, notDirInvalid(err)
	}
	if err := os.Rename(src, dst); err != nil {
		return nil, fileStatus(err)
	}
	entry, err := lstatEntry(dst, newNameCache())
	if err != nil {
		return nil, err
	}
	return &agentpb.MoveResponse{Entry: entry}, nil
}

// Remove removes a path and everything below it, without following
// symlinks. A missing path is not an error; "/" is refused.
func (s *Server) Remove(_ context.Context, req *agentpb.RemoveRequest) (*agentpb.RemoveResponse, error) {
	path, err := s.resolvePath(req.GetPath(), req.GetUser(), true)
	if err != nil {
		return nil, err
	}
	if path == "/" {
		return nil, status.Error(codes.InvalidArgument, "refusing to remove /")
	}
	if err := os.RemoveAll(path); err != nil {
		return nil, fileStatus(err)
	}
	return &agentpb.RemoveResponse{}, nil
}

// notDirInvalid reports a file where a directory is needed as
// InvalidArgument: the same request can never succeed.
func notDirInvalid(err error) error {
	if errors.Is(err, syscall.ENOTDIR) || errors.Is(err, syscall.EEXIST) {
		return status.Errorf(codes.InvalidArgument, "%v: a file is in the way of the directory", err)
	}
	return fileStatus(err)
}

func lstatEntry(path string, names *nameCache) (*agentpb.EntryInfo, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, fileStatus(err)
	}
	return entryInfo(path, fi, names), nil
}

// entryInfo describes path, whose lstat is fi.
func entryInfo(path string, fi fs.FileInfo, names *nameCache) *agentpb.EntryInfo {
	m := fi.Mode()
	e := &agentpb.EntryInfo{
		Name:             fi.Name(),
		Path:             path,
		Size:             fi.Size(),
		Mode:             uint32(m),
		Permissions:      permString(m),
		ModifiedUnixNano: fi.ModTime().UnixNano(),
	}
	if path == "/" {
		e.Name = "/"
	}
	switch {
	case m.IsRegular():
		e.Type = agentpb.FileType_FILE_TYPE_FILE
	case m.IsDir():
		e.Type = agentpb.FileType_FILE_TYPE_DIRECTORY
	case m&fs.ModeSymlink != 0:
		e.Type = agentpb.FileType_FILE_TYPE_SYMLINK
		e.SymlinkTarget, _ = os.Readlink(path)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		e.Owner, e.Group = names.user(st.Uid), names.group(st.Gid)
	}
	return e
}

// permString formats a mode as ls -l does, e.g. "drwxr-sr-x" or
// "lrwxrwxrwx" (Go's FileMode.String differs for special bits and types).
func permString(m fs.FileMode) string {
	b := []byte("----------")
	switch {
	case m&fs.ModeDir != 0:
		b[0] = 'd'
	case m&fs.ModeSymlink != 0:
		b[0] = 'l'
	case m&fs.ModeNamedPipe != 0:
		b[0] = 'p'
	case m&fs.ModeSocket != 0:
		b[0] = 's'
	case m&fs.ModeCharDevice != 0:
		b[0] = 'c'
	case m&fs.ModeDevice != 0:
		b[0] = 'b'
	}
	const rwx = "rwxrwxrwx"
	for i := range 9 {
		if m&(1<<(8-i)) != 0 {
			b[i+1] = rwx[i]
		}
	}
	special := func(i int, set bool, on, off byte) {
		if !set {
			return
		}
		if b[i] == 'x' {
			b[i] = on
		} else {
			b[i] = off
		}
	}
	special(3, m&fs.ModeSetuid != 0, 's', 'S')
	special(6, m&fs.ModeSetgid != 0, 's', 'S')
	special(9, m&fs.ModeSticky != 0, 't', 'T')
	return string(b)
}

// nameCache resolves uids and gids to names once per request: a listing
// would otherwise read /etc/passwd for every entry. Ids without a name
// stay numeric.
type nameCache struct {
	users, groups map[uint32]string
}

func newNameCache() *nameCache {
	return &nameCache{users: make(map[uint32]string), groups: make(map[uint32]string)}
}

func (c *nameCache) user(uid uint32) string {
	if n, ok := c.users[uid]; ok {
		return n
	}
	n := strconv.FormatUint(uint64(uid), 10)
	if u, err := user.LookupId(n); err == nil {
		n = u.Username
	}
	c.users[uid] = n
	return n
}

func (c *nameCache) group(gid uint32) string {
	if n, ok := c.groups[gid]; ok {
		return n
	}
	n := strconv.FormatUint(uint64(gid), 10)
	if g, err := user.LookupGroupId(n); err == nil {
		n = g.Name
	}
	c.groups[gid] = n
	return n
}
