package agent

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
)

// defaultFileMode is the mode of written files when the request has none.
const defaultFileMode = 0o644

// WriteFile creates or truncates a file and writes the streamed data. Only
// the permission bits of the mode are used, and they are applied even to an
// existing file and regardless of the agent's umask. A broken stream leaves
// what was written so far; writing again is the way to recover.
func (s *Server) WriteFile(stream grpc.ClientStreamingServer[agentpb.WriteFileRequest, agentpb.WriteFileResponse]) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	h := first.GetHeader()
	if h == nil {
		return status.Error(codes.InvalidArgument, "the first WriteFile message must carry the header")
	}
	path := h.GetPath()
	if !filepath.IsAbs(path) {
		return status.Errorf(codes.InvalidArgument, "file path %q must be absolute", path)
	}
	mode := fs.FileMode(h.GetMode()) & fs.ModePerm
	if h.GetMode() == 0 {
		mode = defaultFileMode
	}
	owner, err := s.fileOwner(h.GetUser())
	if err != nil {
		return err
	}
	if h.GetMakeParents() {
		if err := makeParents(filepath.Dir(path), owner); err != nil {
			return fileStatus(err)
		}
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) && !h.GetMakeParents() {
			return status.Errorf(codes.NotFound, "directory %s does not exist; create it first or set make_parents", filepath.Dir(path))
		}
		return fileStatus(err)
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm() != mode {
		if err := f.Chmod(mode); err != nil {
			return fileStatus(err)
		}
	}
	if owner != nil {
		if err := f.Chown(owner.uid, owner.gid); err != nil {
			return fileStatus(err)
		}
	}
	var written int64
	for {
		req, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		n, err := f.Write(req.GetData())
		written += int64(n)
		if err != nil {
			return fileStatus(err)
		}
	}
	if err := f.Close(); err != nil {
		return fileStatus(err)
	}
	s.log.Debug("file written", "path", path, "bytes", written)
	return stream.SendAndClose(&agentpb.WriteFileResponse{BytesWritten: written})
}

// ReadFile streams a file. A file larger than max_bytes fails with
// FailedPrecondition before anything is sent when its size is known, and
// as soon as the limit is passed otherwise (e.g. files in /proc).
func (s *Server) ReadFile(req *agentpb.ReadFileRequest, stream grpc.ServerStreamingServer[agentpb.ReadFileResponse]) error {
	path, limit := req.GetPath(), req.GetMaxBytes()
	if !filepath.IsAbs(path) {
		return status.Errorf(codes.InvalidArgument, "file path %q must be absolute", path)
	}
	f, err := os.Open(path)
	if err != nil {
		return fileStatus(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fileStatus(err)
	}
	if fi.IsDir() {
		return status.Errorf(codes.FailedPrecondition, "%s is a directory; only files can be read", path)
	}
	tooBig := func(size string) error {
		return status.Errorf(codes.FailedPrecondition, "%s is %s bytes, more than the %d allowed; raise max_bytes", path, size, limit)
	}
	if limit > 0 && fi.Mode().IsRegular() && fi.Size() > limit {
		return tooBig(fmt.Sprint(fi.Size()))
	}
	buf := make([]byte, chunkSize)
	var total int64
	for {
		n, err := f.Read(buf)
		if n > 0 {
			total += int64(n)
			if limit > 0 && total > limit {
				return tooBig(fmt.Sprintf("more than %d", limit))
			}
			// A fresh slice: gRPC may hold the message after Send.
			if err := stream.Send(&agentpb.ReadFileResponse{Data: bytes.Clone(buf[:n])}); err != nil {
				return err
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fileStatus(err)
		}
	}
}

// fileOwnership is who owns a written file.
type fileOwnership struct{ uid, gid int }

// fileOwner resolves the user of WriteFile, MakeDir or Move the way exec resolves its user: a
// name through the guest's /etc/passwd or a numeric uid. Empty: nil, the
// agent's own user, and nothing is chowned.
func (s *Server) fileOwner(spec string) (*fileOwnership, error) {
	if spec == "" {
		return nil, nil
	}
	id, err := s.lookupIdentity(spec)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "cannot give files to user %q: %v; give a user from the guest's /etc/passwd or a numeric uid", spec, err)
	}
	if id.cred == nil {
		// The agent's own user (unprivileged agents may only name
		// themselves): files are already theirs.
		return nil, nil
	}
	return &fileOwnership{uid: int(id.cred.Uid), gid: int(id.cred.Gid)}, nil
}

// makeParents creates dir and its missing ancestors, like os.MkdirAll, and
// gives the ones it created to owner (nil: left to the agent's user).
func makeParents(dir string, owner *fileOwnership) error {
	var missing []string
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err == nil {
			if !fi.IsDir() {
				return &fs.PathError{Op: "mkdir", Path: d, Err: syscall.ENOTDIR}
			}
			break
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		missing = append(missing, d)
		if d == filepath.Dir(d) {
			break
		}
	}
	for i := len(missing) - 1; i >= 0; i-- {
		d := missing[i]
		if err := os.Mkdir(d, 0o755); err != nil {
			if errors.Is(err, fs.ErrExist) {
				continue // made by a concurrent call: not ours to chown
			}
			return err
		}
		if owner != nil {
			if err := os.Chown(d, owner.uid, owner.gid); err != nil {
				return err
			}
		}
	}
	return nil
}

// fileStatus gives a file system error the gRPC code the client maps to an
// error kind.
func fileStatus(err error) error {
	code := codes.Internal
	switch {
	case errors.Is(err, fs.ErrNotExist):
		code = codes.NotFound
	case errors.Is(err, fs.ErrExist):
		code = codes.AlreadyExists
	case errors.Is(err, fs.ErrPermission):
		code = codes.PermissionDenied
	case errors.Is(err, syscall.EISDIR), errors.Is(err, syscall.ENOTDIR),
		errors.Is(err, syscall.EROFS), errors.Is(err, syscall.ETXTBSY),
		errors.Is(err, syscall.ENOTEMPTY), errors.Is(err, syscall.EXDEV),
		errors.Is(err, syscall.EBUSY), errors.Is(err, syscall.EINVAL):
		code = codes.FailedPrecondition
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		code = codes.ResourceExhausted
	}
	return status.Error(code, err.Error())
}
