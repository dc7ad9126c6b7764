package agent

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// DefaultMaxToolBytes bounds the file content of one tool volume AddTools
// extracts, unless ServerConfig.MaxToolBytes sets another bound. The
// largest runtimes mise installs (a JDK, a Python with its standard
// library) are well under it.
const DefaultMaxToolBytes = 4 << 30

// toolWorkPrefix starts the name of a volume being extracted under the
// tools root: hidden, so the registry never takes it for a volume, and
// recognisable, so a crash's leftovers can be removed.
const toolWorkPrefix = ".adding-"

// AddTools extracts a tool volume streamed as a tar into a hidden
// directory next to its Dir, writes its marker, syncs and renames it into
// place, so a volume appears complete or not at all. A volume whose Dir
// already holds a valid marker for the same key is left as it is. A call
// that fails or is cancelled removes what it extracted.
func (s *Server) AddTools(stream grpc.ClientStreamingServer[agentpb.AddToolsRequest, agentpb.AddToolsResponse]) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	h := first.GetHeader()
	if h == nil {
		return status.Error(codes.InvalidArgument, "the first AddTools message must carry the header")
	}
	root, vol := h.GetRoot(), toolVolumeFrom(h.GetVolume())
	if err := validToolsRoot(root); err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	if err := checkToolVolume(root, vol); err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	if err := s.tools.useRoot(root); err != nil {
		return status.Error(codes.FailedPrecondition, err.Error())
	}
	log := s.log.With("key", vol.Key, "dir", vol.Dir)
	if present, err := toolPresent(root, vol); err != nil || present {
		if err != nil {
			return err
		}
		s.tools.refresh()
		log.Info("tool volume already present")
		return stream.SendAndClose(&agentpb.AddToolsResponse{AlreadyPresent: true})
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return fileStatus(fmt.Errorf("creating the tools root: %w", err))
	}
	start := time.Now()
	work, err := os.MkdirTemp(root, toolWorkPrefix+vol.Key+"-")
	if err != nil {
		return fileStatus(fmt.Errorf("creating a work directory for tool volume %s: %w", vol.Key, err))
	}
	placed := false
	defer func() {
		if !placed {
			if err := os.RemoveAll(work); err != nil {
				log.Warn("cannot remove a tool volume's partial extraction", "work", work, "err", err)
			}
		}
	}()
	files, size, err := extractTar(&tarChunks{stream: stream}, work, s.cfg.MaxToolBytes)
	if err != nil {
		log.Info("tool volume refused", "err", err)
		return err
	}
	if err := finishToolVolume(work, vol); err != nil {
		return fileStatus(fmt.Errorf("adding tool volume %s: %w", vol.Key, err))
	}
	if err := os.Rename(work, vol.Dir); err != nil {
		// Another call placed it meanwhile: the same volume.
		if present, perr := toolPresent(root, vol); perr != nil || !present {
			return fileStatus(fmt.Errorf("moving tool volume %s into place: %w", vol.Key, err))
		}
		s.tools.refresh()
		log.Info("tool volume placed by a concurrent call")
		return stream.SendAndClose(&agentpb.AddToolsResponse{AlreadyPresent: true})
	}
	placed = true
	s.tools.refresh()
	log.Info("tool volume added", "files", files, "bytes", size, "took", time.Since(start))
	return stream.SendAndClose(&agentpb.AddToolsResponse{Files: files, Bytes: size})
}

// ListTools lists the volumes of the tool registry.
func (s *Server) ListTools(_ context.Context, _ *agentpb.ListToolsRequest) (*agentpb.ListToolsResponse, error) {
	root, vols, _ := s.tools.snapshot()
	resp := &agentpb.ListToolsResponse{Root: root}
	for _, v := range vols {
		resp.Volumes = append(resp.Volumes, toolVolumeTo(v))
	}
	return resp, nil
}

func toolVolumeFrom(v *agentpb.ToolVolume) types.ToolVolume {
	return types.ToolVolume{Key: v.GetKey(), Spec: v.GetSpec(), Dir: v.GetDir(), BinPaths: slices.Clone(v.GetBinPaths())}
}

func toolVolumeTo(v types.ToolVolume) *agentpb.ToolVolume {
	return &agentpb.ToolVolume{Key: v.Key, Spec: v.Spec, Dir: v.Dir, BinPaths: slices.Clone(v.BinPaths)}
}

// toolPresent reports whether vol.Dir holds the volume already: a valid
// marker with the same key. Something else at Dir is an error that says
// so, since it is nothing AddTools made (it never writes Dir in place).
func toolPresent(root string, vol types.ToolVolume) (bool, error) {
	fi, err := os.Lstat(vol.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fileStatus(err)
	}
	if fi.IsDir() {
		have, err := ReadToolMarker(vol.Dir, root)
		if err == nil && have.Key == vol.Key && have.Dir == vol.Dir {
			return true, nil
		}
	}
	return false, status.Errorf(codes.FailedPrecondition,
		"%s exists and is not tool volume %s (no valid %s in it); remove it and add the volume again", vol.Dir, vol.Key, types.ToolMarkerFile)
}

// finishToolVolume writes the marker of vol into its extracted content,
// makes the top directory readable like a mise install and flushes the
// file system, so the rename that follows publishes complete content.
func finishToolVolume(work string, vol types.ToolVolume) error {
	b, err := json.MarshalIndent(vol, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(work, types.ToolMarkerFile), append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("writing the marker: %w", err)
	}
	if err := os.Chmod(work, 0o755); err != nil {
		return err
	}
	d, err := os.Open(work)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := unix.Syncfs(int(d.Fd())); err != nil {
		return fmt.Errorf("syncing the extracted files: %w", err)
	}
	return nil
}

// removeToolLeftovers removes what AddTools calls cut short by a crash
// left under root. It runs before the agent serves, when no call runs.
func removeToolLeftovers(root string) []string {
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil
	}
	var removed []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), toolWorkPrefix) {
			p := filepath.Join(root, e.Name())
			if os.RemoveAll(p) == nil {
				removed = append(removed, p)
			}
		}
	}
	return removed
}

// tarChunks reads the tar bytes of an AddTools stream.
type tarChunks struct {
	stream grpc.ClientStreamingServer[agentpb.AddToolsRequest, agentpb.AddToolsResponse]
	buf    []byte
}

func (r *tarChunks) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		m, err := r.stream.Recv()
		if err != nil {
			return 0, err // io.EOF when the client is done
		}
		if m.GetHeader() != nil {
			return 0, status.Error(codes.InvalidArgument, "AddTools got a second header; send one header, then the tar")
		}
		r.buf = m.GetTar()
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

// extractTar writes the regular files, directories and symlinks of a tar
// stream under dir, which must be empty, and returns how many entries and
// content bytes it wrote. Nothing is written outside dir: names are
// relative and free of "..", every entry's parent must be a directory the
// archive made (never a symlink, which is created as it is and never
// followed), and os.Root refuses any path that would leave dir. Permission
// bits are kept (set-id bits dropped), modification times too; owners
// are the agent's. A top-level types.ToolMarkerFile is skipped: the agent
// writes its own. Invalid content gives InvalidArgument.
func extractTar(r io.Reader, dir string, limit int64) (files, size int64, err error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return 0, 0, fileStatus(err)
	}
	defer root.Close()
	invalid := func(format string, args ...any) error {
		return status.Errorf(codes.InvalidArgument, "tar stream: "+format, args...)
	}
	type dirMeta struct {
		name  string
		mode  fs.FileMode
		mtime time.Time
	}
	// dirs maps each directory made to its index in metas ("." is none).
	dirs := map[string]int{".": -1}
	var metas []dirMeta
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			if status.Code(err) != codes.Unknown {
				return files, size, err // the stream's own error
			}
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return files, size, invalid("it ends in the middle of an entry's header")
			}
			return files, size, invalid("%v", err)
		}
		name, err := tarName(h.Name)
		if err != nil {
			return files, size, invalid("%v", err)
		}
		if name == "." || name == types.ToolMarkerFile {
			continue
		}
		// Parents the archive does not list are made (0755); one that
		// exists but is not a directory the archive made is a symlink or
		// a file, never followed.
		for _, p := range parents(name) {
			if _, ok := dirs[p]; ok {
				continue
			}
			if _, err := root.Lstat(p); err == nil {
				return files, size, invalid("entry %q lies under %q, which is not a directory (a symlink is never followed)", h.Name, p)
			}
			if err := root.Mkdir(p, 0o700); err != nil {
				return files, size, entryError(p, err)
			}
			dirs[p] = len(metas)
			metas = append(metas, dirMeta{p, 0o755, time.Time{}})
		}
		perm := fs.FileMode(h.Mode) & fs.ModePerm
		switch h.Typeflag {
		case tar.TypeDir:
			if i, ok := dirs[name]; ok {
				// Made as a parent earlier: the entry gives its mode.
				if i >= 0 {
					metas[i].mode, metas[i].mtime = perm, h.ModTime
				}
				continue
			}
			// Writable by the agent until every entry is in.
			if err := root.Mkdir(name, 0o700); err != nil {
				return files, size, entryError(h.Name, err)
			}
			dirs[name] = len(metas)
			metas = append(metas, dirMeta{name, perm, h.ModTime})
		case tar.TypeReg:
			if h.Size > limit-size {
				return files, size, invalid("the volume's files are larger than %d bytes (at %q), the agent's limit (agent.ServerConfig.MaxToolBytes)", limit, h.Name)
			}
			n, err := writeTarFile(root, name, perm, tr)
			size += n
			if err != nil {
				return files, size, entryError(h.Name, err)
			}
			if !h.ModTime.IsZero() {
				_ = root.Chtimes(name, h.ModTime, h.ModTime)
			}
		case tar.TypeSymlink:
			if h.Linkname == "" || strings.ContainsRune(h.Linkname, 0) {
				return files, size, invalid("symlink %q has no valid target", h.Name)
			}
			if err := root.Symlink(h.Linkname, name); err != nil {
				return files, size, entryError(h.Name, err)
			}
		default:
			return files, size, invalid("entry %q is %s; a tool volume holds only regular files, directories and symlinks", h.Name, tarTypeName(h.Typeflag))
		}
		files++
	}
	// Deepest first, so a read-only directory is closed after its content.
	for _, m := range slices.Backward(metas) {
		if err := root.Chmod(m.name, m.mode); err != nil {
			return files, size, fileStatus(err)
		}
		if !m.mtime.IsZero() {
			_ = root.Chtimes(m.name, m.mtime, m.mtime)
		}
	}
	return files, size, nil
}

// tarName cleans an entry's name ("./a/b/" → "a/b") and refuses absolute
// names and names with "..".
func tarName(name string) (string, error) {
	if name == "" || strings.ContainsRune(name, 0) {
		return "", fmt.Errorf("an entry has an empty or invalid name")
	}
	if strings.HasPrefix(name, "/") {
		return "", fmt.Errorf("entry %q has an absolute name; a tool volume's names are relative to its dir", name)
	}
	for _, part := range strings.Split(name, "/") {
		if part == ".." {
			return "", fmt.Errorf("entry %q has \"..\" in its name, which would leave the volume", name)
		}
	}
	return path.Clean(name), nil
}

// tarTypeName names the entry types a tool volume cannot hold.
func tarTypeName(t byte) string {
	switch t {
	case tar.TypeLink:
		return "a hard link"
	case tar.TypeChar:
		return "a character device"
	case tar.TypeBlock:
		return "a block device"
	case tar.TypeFifo:
		return "a named pipe"
	default:
		return fmt.Sprintf("of tar type %q", t)
	}
}

// parents returns the parent directories of a clean relative name,
// outermost first: "a/b/c" → ["a", "a/b"].
func parents(name string) []string {
	var ps []string
	for i := range len(name) {
		if name[i] == '/' {
			ps = append(ps, name[:i])
		}
	}
	return ps
}

// writeTarFile creates name, which must not exist, with the content of r.
func writeTarFile(root *os.Root, name string, perm fs.FileMode, r io.Reader) (int64, error) {
	f, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return 0, err
	}
	n, err := io.Copy(f, r)
	if err == nil {
		// Explicitly, so the umask does not strip bits.
		err = f.Chmod(perm)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return n, err
}

// entryError reports a failure to write one entry: an entry given twice
// is the archive's fault, anything else the guest's.
func entryError(name string, err error) error {
	if status.Code(err) != codes.Unknown {
		return err
	}
	if errors.Is(err, fs.ErrExist) {
		return status.Errorf(codes.InvalidArgument, "tar stream: entry %q is given twice", name)
	}
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return status.Errorf(codes.InvalidArgument, "tar stream: it ends in the middle of entry %q", name)
	}
	return fileStatus(fmt.Errorf("extracting %q: %w", name, err))
}
