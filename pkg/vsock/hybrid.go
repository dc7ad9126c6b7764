// Package vsock is the host side of Firecracker's hybrid vsock: the VMM
// exposes the guest's AF_VSOCK ports through one Unix socket, and a host
// program reaches guest port P by connecting to that socket and sending
// "CONNECT P\n"; the VMM answers "OK <host port>\n" and from then on the
// stream is the guest connection. Firecracker implements it natively
// (docs/vsock.md); the firecracker backend reaches its guest agent with
// this dialer. (The qemu backend reaches its agent over a virtio-serial
// port instead, agent.SerialChannel, because vhost-user-vsock blocks
// QEMU's migration and so its snapshots.)
//
// No library implements the host side of this handshake (mdlayher/vsock
// speaks AF_VSOCK, which the host never sees here), so it is written here.
package vsock

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strconv"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// maxReplyLen bounds the handshake reply line. "OK 4294967295\n" is 14 bytes;
// anything much longer is not the protocol.
const maxReplyLen = 64

// Dial connects once to guest port port through the hybrid vsock Unix socket
// at udsPath. It returns an error if the socket is missing, refuses, or the
// VMM does not answer OK (the guest has nothing listening on port yet).
// Bytes the guest sent right after the OK line are kept: reads on the
// returned conn see them first. ctx bounds the handshake only.
func Dial(ctx context.Context, udsPath string, port uint32) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", udsPath)
	if err != nil {
		return nil, opError("dial", udsPath, port, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	// Unblock the handshake when ctx is cancelled without a deadline.
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := fmt.Fprintf(c, "CONNECT %d\n", port); err != nil {
		c.Close()
		return nil, opError("connect", udsPath, port, err)
	}
	br := bufio.NewReaderSize(c, 4096)
	line, err := readLine(br)
	if err != nil {
		c.Close()
		return nil, opError("handshake", udsPath, port, ctxErr(ctx, err))
	}
	if _, err := ParseReply(line); err != nil {
		c.Close()
		return nil, opError("handshake", udsPath, port, err)
	}
	if !stop() && ctx.Err() != nil {
		c.Close()
		return nil, opError("handshake", udsPath, port, ctx.Err())
	}
	_ = c.SetDeadline(time.Time{})
	return &conn{Conn: c, r: br}, nil
}

// ctxErr reports a read that failed because ctx ended as ctx's error: the
// conn deadline mirrors ctx's and may fire before ctx records it.
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	var ne net.Error
	if dl, ok := ctx.Deadline(); ok && errors.As(err, &ne) && ne.Timeout() && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return err
}

// readLine reads up to and including '\n', refusing lines longer than
// maxReplyLen so a peer that is not speaking the protocol cannot make us
// buffer without bound.
func readLine(br *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		b, err := br.ReadByte()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil, fmt.Errorf("connection closed before the OK reply (nothing listens on that guest port yet): %w", err)
			}
			return nil, err
		}
		line = append(line, b)
		if b == '\n' {
			return line, nil
		}
		if len(line) > maxReplyLen {
			return nil, fmt.Errorf("reply longer than %d bytes without a newline: %q", maxReplyLen, line)
		}
	}
}

// ParseReply parses the VMM's answer to CONNECT: "OK <port>\n", where port is
// the host-side port number the VMM assigned. Anything else is an error that
// quotes the reply.
func ParseReply(line []byte) (uint32, error) {
	rest, ok := bytes.CutPrefix(line, []byte("OK "))
	if !ok {
		return 0, fmt.Errorf("unexpected reply %q: want \"OK <port>\\n\"", line)
	}
	rest, ok = bytes.CutSuffix(rest, []byte("\n"))
	if !ok {
		return 0, fmt.Errorf("reply %q does not end in a newline", line)
	}
	if len(rest) == 0 || len(rest) > 10 {
		return 0, fmt.Errorf("reply %q: port is not a number", line)
	}
	for _, c := range rest {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("reply %q: port is not a number", line)
		}
	}
	p, err := strconv.ParseUint(string(rest), 10, 32)
	if err != nil {
		return 0, fmt.Errorf("reply %q: port out of range", line)
	}
	return uint32(p), nil
}

// conn is the guest connection; reads drain what the handshake buffered.
type conn struct {
	net.Conn
	r *bufio.Reader
}

func (c *conn) Read(p []byte) (int, error) { return c.r.Read(p) }

// CloseWrite half-closes the stream when the underlying socket supports it.
func (c *conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return fmt.Errorf("%w: close-write", types.ErrNotSupported)
}

// Backoff paces DialRetry. Zero fields take the defaults.
type Backoff struct {
	// Initial is the first wait after a failed attempt (default 10ms).
	Initial time.Duration
	// Max caps the wait between attempts (default 250ms).
	Max time.Duration
}

// DialRetry dials until it succeeds or ctx ends, waiting with jittered
// exponential backoff between attempts. It is the readiness probe of a
// booting guest: the socket appears when the VMM starts, and CONNECT
// succeeds once the guest listens on port. The error on timeout wraps
// types.ErrUnavailable and the last attempt's error.
func DialRetry(ctx context.Context, udsPath string, port uint32, b Backoff) (net.Conn, error) {
	return Retry(ctx, fmt.Sprintf("guest port %d via %s", port, udsPath), func(ctx context.Context) (net.Conn, error) {
		return Dial(ctx, udsPath, port)
	}, b)
}

// Retry is DialRetry with the dial step given: dial is called until it
// succeeds or ctx ends, with the same backoff; what names the target in
// the timeout error. Callers that must check the socket before each dial
// (see vmutil.OwnedSocket) use it.
func Retry(ctx context.Context, what string, dial func(context.Context) (net.Conn, error), b Backoff) (net.Conn, error) {
	wait := b.Initial
	if wait <= 0 {
		wait = 10 * time.Millisecond
	}
	maxWait := b.Max
	if maxWait <= 0 {
		maxWait = 250 * time.Millisecond
	}
	attempts := 0
	for {
		attempts++
		c, err := dial(ctx)
		if err == nil {
			return c, nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%w: vsock connection timeout: %s did not answer after %d attempts: %v",
				types.ErrUnavailable, what, attempts, err)
		}
		t := time.NewTimer(wait/2 + rand.N(wait/2+1))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("%w: vsock connection timeout: %s did not answer after %d attempts: %v",
				types.ErrUnavailable, what, attempts, err)
		case <-t.C:
		}
		wait = min(wait*2, maxWait)
	}
}

// OpError is the error of a failed hybrid vsock operation.
type OpError struct {
	Op   string // "dial", "connect" or "handshake"
	Path string // the hybrid vsock Unix socket
	Port uint32 // the guest port
	Err  error
}

func (e *OpError) Error() string {
	return fmt.Sprintf("vsock %s %s port %d: %v", e.Op, e.Path, e.Port, e.Err)
}

func (e *OpError) Unwrap() error { return e.Err }

func opError(op, path string, port uint32, err error) error {
	return &OpError{Op: op, Path: path, Port: port, Err: err}
}
