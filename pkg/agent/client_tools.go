package agent

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// ToolsAdded says what AddTools did.
type ToolsAdded struct {
	// AlreadyPresent is set when the guest had the volume: nothing was
	// extracted and the content was not read to its end.
	AlreadyPresent bool
	// Entries and Bytes count what was extracted: files, directories and
	// symlinks, and the bytes of file content.
	Entries, Bytes int64
}

// AddTools adds tool volume vol to the running guest: content is a tar
// stream of the volume's content (relative names; regular files,
// directories and symlinks only), root is the guest's tools root
// (types.ToolSet.Root), and vol.Dir must be root/vol.Key. Once it
// returns, the volume's bin directories are on the PATH of every new
// command.
//
// It is idempotent: a volume the guest has already (same key, a valid
// marker at vol.Dir) succeeds at once with AlreadyPresent. The volume
// appears whole or not at all: if ctx ends, content fails or the agent
// refuses the stream, the agent removes what it extracted. Errors wrap
// types.ErrInvalid for a bad volume or tar stream (an entry escaping the
// volume, of another type, or content over the agent's size limit) and
// for a guest whose tools root is another, types.ErrNotSupported for an
// agent older than protocol 4.
func (c *Client) AddTools(ctx context.Context, vol types.ToolVolume, root string, content io.Reader) (ToolsAdded, error) {
	op := "adding tool volume " + vol.Key + " to the guest"
	if err := validToolsRoot(root); err != nil {
		return ToolsAdded{}, fmt.Errorf("%s: %w", op, err)
	}
	vol.Image = ""
	if err := checkToolVolume(root, vol); err != nil {
		return ToolsAdded{}, fmt.Errorf("%s: %w", op, err)
	}
	// Cancelling the stream, not closing it, tells the agent the content
	// is incomplete.
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.api.AddTools(sctx)
	if err != nil {
		return ToolsAdded{}, c.revisionError(ctx, op, err, protocolTools)
	}
	hdr := &agentpb.AddToolsHeader{Root: root, Volume: toolVolumeTo(vol)}
	err = stream.Send(&agentpb.AddToolsRequest{Msg: &agentpb.AddToolsRequest_Header{Header: hdr}})
	// The agent may end the call early (the volume is there, or it
	// refused the stream); CloseAndRecv says which.
	if err == nil {
		if rerr := sendChunks(content, func(b []byte) error {
			return stream.Send(&agentpb.AddToolsRequest{Msg: &agentpb.AddToolsRequest_Tar{Tar: b}})
		}); rerr != nil {
			cancel()
			return ToolsAdded{}, fmt.Errorf("%s: reading the content: %w", op, rerr)
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return ToolsAdded{}, c.revisionError(ctx, op, err, protocolTools)
	}
	return ToolsAdded{AlreadyPresent: resp.GetAlreadyPresent(), Entries: resp.GetFiles(), Bytes: resp.GetBytes()}, nil
}

// AddToolsDir is AddTools with the content of hostDir, a directory on the
// host (the volume's Dir in the host's tool cache), archived as it is
// streamed: symlinks are sent as symlinks, never followed. The agent
// ignores a marker in hostDir and writes its own from vol. Cancellation
// and idempotency are AddTools's.
func (c *Client) AddToolsDir(ctx context.Context, vol types.ToolVolume, root, hostDir string) (ToolsAdded, error) {
	fi, err := os.Stat(hostDir)
	if err != nil {
		return ToolsAdded{}, fmt.Errorf("adding tool volume %s to the guest: %w", vol.Key, err)
	}
	if !fi.IsDir() {
		return ToolsAdded{}, fmt.Errorf("adding tool volume %s to the guest: %w: %s is not a directory", vol.Key, types.ErrInvalid, hostDir)
	}
	pr, pw := io.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		pw.CloseWithError(writeToolTar(pw, hostDir))
	}()
	added, err := c.AddTools(ctx, vol, root, pr)
	// Ends the archiving when the agent stopped reading early.
	pr.CloseWithError(errors.New("the agent stopped reading"))
	<-done
	return added, err
}

// writeToolTar writes the tar of dir's content to w. AddFS reads
// symlinks through os.DirFS's ReadLink and archives them as symlinks.
func writeToolTar(w io.Writer, dir string) error {
	tw := tar.NewWriter(w)
	if err := tw.AddFS(os.DirFS(dir)); err != nil {
		return fmt.Errorf("archiving %s: %w", dir, err)
	}
	return tw.Close()
}

// ListTools lists the tool volumes the guest agent puts on PATH, sorted by
// key; none when the guest has no tools root. An agent older than
// protocol 4 gives types.ErrNotSupported.
func (c *Client) ListTools(ctx context.Context) ([]types.ToolVolume, error) {
	resp, err := c.api.ListTools(ctx, &agentpb.ListToolsRequest{})
	if err != nil {
		return nil, c.revisionError(ctx, "listing the guest's tool volumes", err, protocolTools)
	}
	var vols []types.ToolVolume
	for _, v := range resp.GetVolumes() {
		vols = append(vols, toolVolumeFrom(v))
	}
	return vols, nil
}
