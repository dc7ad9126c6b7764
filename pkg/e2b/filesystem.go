package e2b

import (
	"context"
	"errors"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/aetherium/aetherium-core/pkg/agent"
	pb "github.com/aetherium/aetherium-core/pkg/e2b/gen/filesystem"
	"github.com/aetherium/aetherium-core/pkg/e2b/gen/filesystem/filesystemconnect"
)

// filesystemService is envd's filesystem.Filesystem over the guest
// agent's file system calls. Paths are resolved against the user's home
// by the agent and answered absolute.
type filesystemService struct {
	s *Server
}

var _ filesystemconnect.FilesystemHandler = (*filesystemService)(nil)

func entryPB(e *agent.EntryInfo) *pb.EntryInfo {
	out := &pb.EntryInfo{Name: e.Name, Path: e.Path, Size: e.Size, Mode: uint32(e.Mode.Perm()),
		Permissions: e.Permissions, Owner: e.Owner, Group: e.Group}
	switch e.Type {
	case agent.FileTypeFile:
		out.Type = pb.FileType_FILE_TYPE_FILE
	case agent.FileTypeDirectory:
		out.Type = pb.FileType_FILE_TYPE_DIRECTORY
	case agent.FileTypeSymlink:
		out.Type = pb.FileType_FILE_TYPE_SYMLINK
	}
	if !e.ModTime.IsZero() {
		out.ModifiedTime = timestamppb.New(e.ModTime)
	}
	if e.SymlinkTarget != "" {
		out.SymlinkTarget = &e.SymlinkTarget
	}
	return out
}

func (f *filesystemService) Stat(ctx context.Context, req *connect.Request[pb.StatRequest]) (*connect.Response[pb.StatResponse], error) {
	user, err := rpcUser(req.Header())
	if err != nil {
		return nil, err
	}
	e, err := sandboxFrom(ctx).client.Stat(ctx, req.Msg.GetPath(), user)
	if err != nil {
		return nil, f.s.rpcError(err)
	}
	return connect.NewResponse(&pb.StatResponse{Entry: entryPB(e)}), nil
}

func (f *filesystemService) ListDir(ctx context.Context, req *connect.Request[pb.ListDirRequest]) (*connect.Response[pb.ListDirResponse], error) {
	user, err := rpcUser(req.Header())
	if err != nil {
		return nil, err
	}
	es, err := sandboxFrom(ctx).client.ListDir(ctx, req.Msg.GetPath(), user, int(req.Msg.GetDepth()))
	if err != nil {
		return nil, f.s.rpcError(err)
	}
	out := &pb.ListDirResponse{Entries: make([]*pb.EntryInfo, 0, len(es))}
	for i := range es {
		out.Entries = append(out.Entries, entryPB(&es[i]))
	}
	return connect.NewResponse(out), nil
}

func (f *filesystemService) MakeDir(ctx context.Context, req *connect.Request[pb.MakeDirRequest]) (*connect.Response[pb.MakeDirResponse], error) {
	user, err := rpcUser(req.Header())
	if err != nil {
		return nil, err
	}
	created, e, err := sandboxFrom(ctx).client.MakeDir(ctx, req.Msg.GetPath(), user)
	if err != nil {
		return nil, f.s.rpcError(err)
	}
	if !created {
		return nil, connect.NewError(connect.CodeAlreadyExists, errors.New("directory '"+e.Path+"' already exists"))
	}
	return connect.NewResponse(&pb.MakeDirResponse{Entry: entryPB(e)}), nil
}

func (f *filesystemService) Move(ctx context.Context, req *connect.Request[pb.MoveRequest]) (*connect.Response[pb.MoveResponse], error) {
	user, err := rpcUser(req.Header())
	if err != nil {
		return nil, err
	}
	e, err := sandboxFrom(ctx).client.Move(ctx, req.Msg.GetSource(), req.Msg.GetDestination(), user)
	if err != nil {
		return nil, f.s.rpcError(err)
	}
	return connect.NewResponse(&pb.MoveResponse{Entry: entryPB(e)}), nil
}

func (f *filesystemService) Remove(ctx context.Context, req *connect.Request[pb.RemoveRequest]) (*connect.Response[pb.RemoveResponse], error) {
	user, err := rpcUser(req.Header())
	if err != nil {
		return nil, err
	}
	if err := sandboxFrom(ctx).client.Remove(ctx, req.Msg.GetPath(), user); err != nil {
		return nil, f.s.rpcError(err)
	}
	return connect.NewResponse(&pb.RemoveResponse{}), nil
}

// Watching needs inotify in the guest agent, which it does not offer yet.
const watchGap = "watching a directory (files.watchDir; poll files.list instead)"

func (f *filesystemService) WatchDir(context.Context, *connect.Request[pb.WatchDirRequest], *connect.ServerStream[pb.WatchDirResponse]) error {
	return rpcUnimplemented(watchGap)
}

func (f *filesystemService) CreateWatcher(context.Context, *connect.Request[pb.CreateWatcherRequest]) (*connect.Response[pb.CreateWatcherResponse], error) {
	return nil, rpcUnimplemented(watchGap)
}

func (f *filesystemService) GetWatcherEvents(context.Context, *connect.Request[pb.GetWatcherEventsRequest]) (*connect.Response[pb.GetWatcherEventsResponse], error) {
	return nil, rpcUnimplemented(watchGap)
}

func (f *filesystemService) RemoveWatcher(context.Context, *connect.Request[pb.RemoveWatcherRequest]) (*connect.Response[pb.RemoveWatcherResponse], error) {
	return nil, rpcUnimplemented(watchGap)
}
