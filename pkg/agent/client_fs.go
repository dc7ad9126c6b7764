package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// FileType is the kind of a file system entry, of the entry itself:
// symlinks are not followed.
type FileType int

const (
	// FileTypeOther is a device, socket or named pipe.
	FileTypeOther FileType = iota
	FileTypeFile
	FileTypeDirectory
	FileTypeSymlink
)

func (t FileType) String() string {
	switch t {
	case FileTypeFile:
		return "file"
	case FileTypeDirectory:
		return "directory"
	case FileTypeSymlink:
		return "symlink"
	default:
		return "other"
	}
}

// EntryInfo describes a file system entry in the guest.
type EntryInfo struct {
	// Name is the last element of Path.
	Name string
	// Path is absolute and clean.
	Path string
	Type FileType
	Size int64
	// Mode has the permission and type bits, as os.Lstat gives them.
	Mode os.FileMode
	// Permissions is the mode as ls -l shows it, e.g. "drwxr-xr-x".
	Permissions string
	// Owner and Group are names, or the numeric ids when the guest has no
	// name for them.
	Owner, Group string
	ModTime      time.Time
	// SymlinkTarget is where a symlink points, as it is written.
	SymlinkTarget string
}

// The paths of the file system calls are absolute, or relative to the home
// directory of user ("~" and "~/..." too); empty user is the agent's user
// (root). user also owns the directories MakeDir and Move create.

// Stat describes path without following a final symlink. A missing path
// gives types.ErrNotFound.
func (c *Client) Stat(ctx context.Context, path, user string) (*EntryInfo, error) {
	op := "inspecting " + path + " in the guest"
	resp, err := c.api.Stat(ctx, &agentpb.StatRequest{Path: path, User: user})
	if err != nil {
		return nil, c.newCallError(ctx, op, err)
	}
	return entryFrom(resp.GetEntry()), nil
}

// ListDir lists the entries below the directory path, depth levels deep
// (0 and 1: its direct children), each directory's entries sorted by name
// and followed by those of its subdirectories. Symlinks are listed and not
// followed. A missing path gives types.ErrNotFound, one that is not a
// directory types.ErrInvalid.
func (c *Client) ListDir(ctx context.Context, path, user string, depth int) ([]EntryInfo, error) {
	op := "listing " + path + " in the guest"
	if depth < 0 {
		return nil, fmt.Errorf("%s: %w: depth %d is negative", op, types.ErrInvalid, depth)
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.api.ListDir(sctx, &agentpb.ListDirRequest{Path: path, User: user, Depth: uint32(min(depth, 1<<31))})
	if err != nil {
		return nil, c.newCallError(ctx, op, err)
	}
	var entries []EntryInfo
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			return entries, nil
		}
		if err != nil {
			return nil, c.newCallError(ctx, op, err)
		}
		for _, e := range m.GetEntries() {
			entries = append(entries, *entryFrom(e))
		}
	}
}

// MakeDir creates the directory path and its missing parents, owned by
// user. It is idempotent: when the directory exists, it returns created
// false and describes it. Anything else in the way gives types.ErrInvalid.
func (c *Client) MakeDir(ctx context.Context, path, user string) (created bool, entry *EntryInfo, err error) {
	op := "making directory " + path + " in the guest"
	resp, err := c.api.MakeDir(ctx, &agentpb.MakeDirRequest{Path: path, User: user})
	if err != nil {
		err = c.newCallError(ctx, op, err)
		if !errors.Is(err, types.ErrConflict) {
			return false, nil, err
		}
		entry, err := c.Stat(ctx, path, user)
		if err != nil {
			return false, nil, err
		}
		return false, entry, nil
	}
	return true, entryFrom(resp.GetEntry()), nil
}

// Move renames src to dst, creating the missing parents of dst owned by
// user, and describes dst. Like rename(2), it replaces a file at dst. A
// missing src gives types.ErrNotFound.
func (c *Client) Move(ctx context.Context, src, dst, user string) (*EntryInfo, error) {
	op := "moving " + src + " to " + dst + " in the guest"
	resp, err := c.api.Move(ctx, &agentpb.MoveRequest{Source: src, Destination: dst, User: user})
	if err != nil {
		return nil, c.newCallError(ctx, op, err)
	}
	return entryFrom(resp.GetEntry()), nil
}

// Remove removes path and everything below it, without following
// symlinks. A missing path is not an error, so it is idempotent.
func (c *Client) Remove(ctx context.Context, path, user string) error {
	op := "removing " + path + " in the guest"
	if _, err := c.api.Remove(ctx, &agentpb.RemoveRequest{Path: path, User: user}); err != nil {
		return c.newCallError(ctx, op, err)
	}
	return nil
}

func entryFrom(e *agentpb.EntryInfo) *EntryInfo {
	info := &EntryInfo{
		Name:          e.GetName(),
		Path:          e.GetPath(),
		Size:          e.GetSize(),
		Mode:          os.FileMode(e.GetMode()),
		Permissions:   e.GetPermissions(),
		Owner:         e.GetOwner(),
		Group:         e.GetGroup(),
		ModTime:       time.Unix(0, e.GetModifiedUnixNano()),
		SymlinkTarget: e.GetSymlinkTarget(),
	}
	switch e.GetType() {
	case agentpb.FileType_FILE_TYPE_FILE:
		info.Type = FileTypeFile
	case agentpb.FileType_FILE_TYPE_DIRECTORY:
		info.Type = FileTypeDirectory
	case agentpb.FileType_FILE_TYPE_SYMLINK:
		info.Type = FileTypeSymlink
	}
	return info
}
