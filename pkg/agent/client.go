package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Backoff between attempts to reach an agent, both for WaitReady and for
// gRPC's reconnects: a guest boots in well under a second, so the defaults
// (1s growing to 2min) would add most of the boot time again.
const (
	readyBaseDelay = 5 * time.Millisecond
	readyMaxDelay  = 200 * time.Millisecond
	// connectTimeout bounds one connection attempt, dial and handshake.
	connectTimeout = 10 * time.Second
)

// Client talks to one agent. It is safe for concurrent use; one connection
// carries all calls and is re-dialled when it breaks.
//
// Errors wrap types.ErrUnavailable when the agent cannot be reached,
// types.ErrNotFound for missing files and processes, types.ErrInvalid for
// requests that cannot succeed as given, types.ErrConflict for what exists
// already, types.ErrNotSupported when the agent is too old for a call, and
// the context's error when ctx ended.
type Client struct {
	conn *grpc.ClientConn
	api  agentpb.AgentClient

	// protocol is the agent's protocol revision once Info was asked for
	// it by a call that depends on it; 0: not known yet.
	protocol atomic.Uint32
}

// NewClient makes a client that reaches the agent through d. It does no
// I/O: the first call dials.
func NewClient(d Dialer) (*Client, error) {
	if d == nil {
		return nil, fmt.Errorf("%w: agent client needs a dialer", types.ErrInvalid)
	}
	conn, err := grpc.NewClient("passthrough:///agent",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return d(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay:  readyBaseDelay,
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   readyMaxDelay,
			},
			MinConnectTimeout: connectTimeout,
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("creating agent client: %w", err)
	}
	return &Client{conn: conn, api: agentpb.NewAgentClient(conn)}, nil
}

// Close closes the connection; calls in flight fail. Commands they started
// are killed by the agent, except those started with an execution id
// (ExecOptions.ExecutionID), which run on to be reattached.
func (c *Client) Close() error {
	return c.conn.Close()
}

// Info asks the agent about itself and the guest. It fails fast, with
// types.ErrUnavailable, when the agent cannot be reached.
func (c *Client) Info(ctx context.Context) (*agentpb.InfoResponse, error) {
	info, err := c.api.Info(ctx, &agentpb.InfoRequest{})
	if err != nil {
		return nil, rpcError(ctx, "asking the guest agent for info", err)
	}
	return info, nil
}

// WaitReady calls Info until the agent answers or ctx ends, retrying with a
// backoff from 5ms up to 200ms while it is unreachable. Errors other than
// types.ErrUnavailable end the wait at once.
func (c *Client) WaitReady(ctx context.Context) (*agentpb.InfoResponse, error) {
	var info *agentpb.InfoResponse
	err := UntilReachable(ctx, func(ctx context.Context) (err error) {
		info, err = c.Info(ctx)
		return err
	})
	return info, err
}

// UntilReachable calls call until it returns anything but an error
// wrapping types.ErrUnavailable (the agent cannot be reached yet), or ctx
// ends, with a backoff from 5ms up to 200ms between calls. It is how a
// caller makes its first call to a guest whose agent may still be
// starting its readiness test, sparing a separate Info round trip: call
// must be safe to repeat. An error from ctx's end names the last attempt's.
func UntilReachable(ctx context.Context, call func(ctx context.Context) error) error {
	delay := readyBaseDelay
	var last error
	for {
		err := call(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			if last == nil {
				return fmt.Errorf("waiting for the guest agent: %w", ctx.Err())
			}
			return fmt.Errorf("waiting for the guest agent: %w; last attempt: %w", ctx.Err(), last)
		}
		if !errors.Is(err, types.ErrUnavailable) {
			return err
		}
		last = err
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
		delay = min(delay*2, readyMaxDelay)
	}
}

// WriteFile writes what r yields to path in the guest and returns how many
// bytes were written. Only the permission bits of o.Mode are used (0:
// 0644); they are applied to an existing file too. o.User (a name or uid
// in the guest) owns the file and the directories made for it. Without
// o.MakeParents a missing parent directory fails with types.ErrNotFound.
// Writing the same content again is harmless. If ctx ends, or r fails, the
// file may be left partly written.
func (c *Client) WriteFile(ctx context.Context, path string, r io.Reader, o types.FileOptions) (int64, error) {
	op := "writing " + path + " in the guest"
	if o.User != "" {
		// An older agent would drop the field and leave the file root's.
		info, err := c.Info(ctx)
		if err != nil {
			return 0, err
		}
		if info.GetProtocol() < protocolFileUser {
			return 0, fmt.Errorf("%s: %w: the guest agent (%s, protocol %d) cannot give files an owner; rebuild the guest image with a newer fc-agent", op, types.ErrNotSupported, info.GetVersion(), info.GetProtocol())
		}
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.api.WriteFile(sctx)
	if err != nil {
		return 0, rpcError(ctx, op, err)
	}
	hdr := &agentpb.WriteFileHeader{Path: path, Mode: o.Mode & uint32(os.ModePerm), MakeParents: o.MakeParents, User: o.User}
	err = stream.Send(&agentpb.WriteFileRequest{Msg: &agentpb.WriteFileRequest_Header{Header: hdr}})
	if err == nil {
		if rerr := sendChunks(r, func(b []byte) error {
			return stream.Send(&agentpb.WriteFileRequest{Msg: &agentpb.WriteFileRequest_Data{Data: b}})
		}); rerr != nil {
			return 0, fmt.Errorf("%s: reading the content: %w", op, rerr)
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return 0, rpcError(ctx, op, err)
	}
	return resp.GetBytesWritten(), nil
}

// sendChunks sends what r yields, in chunks of at most chunkSize, until r
// ends or send fails. A failed send means the agent ended the call, and
// the stream's CloseAndRecv says why, so only r's error is returned.
func sendChunks(r io.Reader, send func([]byte) error) error {
	buf := make([]byte, chunkSize)
	for {
		n, rerr := r.Read(buf)
		if n > 0 {
			if err := send(bytes.Clone(buf[:n])); err != nil {
				return nil
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}

// ReadFile returns the content of path in the guest. A file larger than
// maxBytes (0: no limit) fails with types.ErrInvalid; a missing one with
// types.ErrNotFound.
func (c *Client) ReadFile(ctx context.Context, path string, maxBytes int64) ([]byte, error) {
	var buf bytes.Buffer
	if _, err := c.ReadFileTo(ctx, path, &buf, maxBytes); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// ReadFileTo streams the content of path in the guest to w, one chunk at a
// time, and returns how many bytes it wrote. Errors are those of ReadFile;
// when the file cannot be opened nothing is written to w. A failure after
// the first chunk (the limit passed, the agent gone, w failing) leaves w
// with part of the file.
func (c *Client) ReadFileTo(ctx context.Context, path string, w io.Writer, maxBytes int64) (int64, error) {
	op := "reading " + path + " in the guest"
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.api.ReadFile(sctx, &agentpb.ReadFileRequest{Path: path, MaxBytes: maxBytes})
	if err != nil {
		return 0, rpcError(ctx, op, err)
	}
	var total int64
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, rpcError(ctx, op, err)
		}
		data := m.GetData()
		// The agent enforces the limit too; this guards against one that
		// does not.
		if maxBytes > 0 && total+int64(len(data)) > maxBytes {
			return total, fmt.Errorf("%s: %w: the file is larger than %d bytes", op, types.ErrInvalid, maxBytes)
		}
		n, err := w.Write(data)
		total += int64(n)
		if err != nil {
			return total, fmt.Errorf("%s: writing the content: %w", op, err)
		}
	}
}

// Shutdown asks the agent to power the guest off, or reboot it, when it is
// PID 1, and to end itself otherwise. Running commands are killed. The
// guest may go down before the reply arrives, in which case the error wraps
// types.ErrUnavailable. Asking twice is harmless.
func (c *Client) Shutdown(ctx context.Context, reboot bool) error {
	if _, err := c.api.Shutdown(ctx, &agentpb.ShutdownRequest{Reboot: reboot}); err != nil {
		return rpcError(ctx, "shutting the guest down", err)
	}
	return nil
}

// rpcError maps a gRPC error to the error kinds of pkg/types, in this one
// place. op says what was being done.
func rpcError(ctx context.Context, op string, err error) error {
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("%s: %w", op, ctxErr)
	}
	st := status.Convert(err)
	msg := st.Message()
	switch st.Code() {
	case codes.NotFound:
		return fmt.Errorf("%s: %w: %s", op, types.ErrNotFound, msg)
	case codes.InvalidArgument, codes.FailedPrecondition, codes.PermissionDenied:
		return fmt.Errorf("%s: %w: %s", op, types.ErrInvalid, msg)
	case codes.AlreadyExists:
		return fmt.Errorf("%s: %w: %s", op, types.ErrConflict, msg)
	case codes.Unimplemented:
		return fmt.Errorf("%s: %w: the guest agent is too old (%s); rebuild the guest image", op, types.ErrNotSupported, msg)
	case codes.Unavailable:
		return fmt.Errorf("%s: %w: cannot reach the guest agent (%s); check that the VM is running and fc-agent listens", op, types.ErrUnavailable, msg)
	case codes.Canceled:
		return fmt.Errorf("%s: %w", op, context.Canceled)
	case codes.DeadlineExceeded:
		return fmt.Errorf("%s: %w", op, context.DeadlineExceeded)
	default:
		return fmt.Errorf("%s: guest agent failed (%s): %s", op, st.Code(), msg)
	}
}
