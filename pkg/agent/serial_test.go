package agent

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// fakeDev behaves as a virtio-serial port does for the guest: bytes the
// host sent stay queued across host connections (stale bytes), the guest
// reads end-of-file at once while no host is connected and its queue is
// empty, and what the guest writes while no host is connected is lost.
type fakeDev struct {
	mu      sync.Mutex
	cond    *sync.Cond
	toGuest []byte
	host    net.Conn // the device's end of the connected host's pipe
	opens   int
}

func newFakeDev() *fakeDev {
	d := &fakeDev{}
	d.cond = sync.NewCond(&d.mu)
	return d
}

// connect connects a host (as a client of QEMU's chardev socket does),
// replacing the current one without the guest seeing a disconnection when
// one is connected (as a VM restored from a file may).
func (d *fakeDev) connect() net.Conn {
	hostEnd, devEnd := net.Pipe()
	d.mu.Lock()
	if d.host != nil {
		d.host.Close()
	}
	d.host = devEnd
	d.mu.Unlock()
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := devEnd.Read(buf)
			d.mu.Lock()
			d.toGuest = append(d.toGuest, buf[:n]...)
			if err != nil && d.host == devEnd {
				d.host = nil
			}
			d.cond.Broadcast()
			d.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return hostEnd
}

// inject queues bytes for the guest as if an earlier host had sent them.
func (d *fakeDev) inject(b []byte) {
	d.mu.Lock()
	d.toGuest = append(d.toGuest, b...)
	d.cond.Broadcast()
	d.mu.Unlock()
}

func (d *fakeDev) open() (port, error) {
	d.mu.Lock()
	d.opens++
	d.mu.Unlock()
	return &fakePort{d: d}, nil
}

type fakePort struct {
	d      *fakeDev
	closed bool
}

func (p *fakePort) Read(b []byte) (int, error) {
	d := p.d
	d.mu.Lock()
	defer d.mu.Unlock()
	for len(d.toGuest) == 0 && d.host != nil && !p.closed {
		d.cond.Wait()
	}
	if p.closed {
		return 0, os.ErrClosed
	}
	if len(d.toGuest) == 0 {
		return 0, io.EOF // no host: the port reads end-of-file
	}
	n := copy(b, d.toGuest)
	d.toGuest = d.toGuest[n:]
	return n, nil
}

func (p *fakePort) Write(b []byte) (int, error) {
	p.d.mu.Lock()
	h, closed := p.d.host, p.closed
	p.d.mu.Unlock()
	if closed {
		return 0, os.ErrClosed
	}
	if h == nil {
		return len(b), nil // lost, as QEMU drops it with no client
	}
	_ = h.SetWriteDeadline(time.Now().Add(2 * time.Second))
	return h.Write(b)
}

func (p *fakePort) Close() error {
	p.d.mu.Lock()
	p.closed = true
	p.d.cond.Broadcast()
	p.d.mu.Unlock()
	return nil
}

func (p *fakePort) SetWriteDeadline(time.Time) error { return nil }

// echo serves l: each stream gets back what it sends.
func echo(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			_, _ = io.Copy(c, c)
		}()
	}
}

func roundTrip(t *testing.T, ch *SerialChannel, msg string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, err := ch.Dial(ctx)
	require.NoError(t, err)
	defer c.Close()
	_, err = io.WriteString(c, msg)
	require.NoError(t, err)
	got := make([]byte, len(msg))
	require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
	_, err = io.ReadFull(c, got)
	require.NoError(t, err)
	require.Equal(t, msg, string(got))
}

func TestSerialChannelSurvivesHostChanges(t *testing.T) {
	dev := newFakeDev()
	l := newSerialListener("test", dev.open)
	defer l.Close()
	go echo(l)

	dialDev := func(context.Context) (net.Conn, error) { return dev.connect(), nil }
	ch := NewSerialChannel(dialDev)
	roundTrip(t, ch, "first")
	roundTrip(t, ch, "second stream, same session")

	// A worker restart: the host goes away mid-session, bytes of an old
	// session (a partial yamux frame, an old handshake, binary junk) sit
	// in the guest's queue, and a new host comes.
	require.NoError(t, ch.Close())
	_, err := ch.Dial(t.Context())
	require.ErrorIs(t, err, net.ErrClosed)
	time.Sleep(50 * time.Millisecond)
	dev.inject([]byte{0, 1, 0, 0, 0, 0, 0, 9, 0, 0, 0, 200, 'x'})
	dev.inject([]byte(serialHello + newNonce() + "\n" + serialStart + "deadbeef\n\xff\xfe\n"))
	ch2 := NewSerialChannel(dialDev)
	roundTrip(t, ch2, "after a restart")

	// A VM restored from a file: a new host connects while the guest is
	// still in its session with the old one, which it never saw leave.
	ch3 := NewSerialChannel(dialDev)
	roundTrip(t, ch3, "after a restore")
	ch2.Close()

	// The old channel's session broke with its connection; a channel
	// whose session broke makes a new one on its next Dial.
	ch3.Reset()
	roundTrip(t, ch3, "after a reset")
	ch3.Close()
}

func TestSerialChannelDialBoundedByContext(t *testing.T) {
	// Nothing answers: a host connected to a port no guest serves.
	ch := NewSerialChannel(func(context.Context) (net.Conn, error) {
		a, b := net.Pipe()
		go func() { _, _ = io.Copy(io.Discard, b) }()
		return a, nil
	})
	defer ch.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := ch.Dial(ctx)
	require.ErrorIs(t, err, types.ErrUnavailable)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Less(t, time.Since(start), 2*time.Second)

	// A socket that cannot be dialled.
	ch2 := NewSerialChannel(func(context.Context) (net.Conn, error) { return nil, errors.New("no such socket") })
	_, err = ch2.Dial(t.Context())
	require.ErrorIs(t, err, types.ErrUnavailable)
	require.ErrorContains(t, err, "no such socket")
}

// TestSerialChannelCarriesGRPC runs the agent's own client and server over
// the channel, across a host change.
func TestSerialChannelCarriesGRPC(t *testing.T) {
	dev := newFakeDev()
	l := newSerialListener("test", dev.open)
	srv := NewServer(ServerConfig{})
	go func() { _ = srv.Serve(l) }()
	defer srv.Stop()

	for range 2 {
		ch := NewSerialChannel(func(context.Context) (net.Conn, error) { return dev.connect(), nil })
		c, err := NewClient(ch.Dial)
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		info, err := c.WaitReady(ctx)
		cancel()
		require.NoError(t, err)
		require.Equal(t, Version, info.Version)
		c.Close()
		ch.Close()
	}
}

func TestListenSerialRejectsBadNames(t *testing.T) {
	for _, name := range []string{"", "../x", "a/b"} {
		_, err := ListenChannel("serial://" + name)
		require.ErrorIs(t, err, types.ErrInvalid, name)
	}
}

func TestLineReader(t *testing.T) {
	long := make([]byte, 300)
	for i := range long {
		long[i] = 'a'
	}
	lr := &lineReader{r: io.MultiReader(
		&oneByte{b: []byte("ab")}, &oneByte{b: []byte("c\r\n")},
		&oneByte{b: append(long, '\n')}, &oneByte{b: []byte("x\nrest")})}
	line, err := lr.next()
	require.NoError(t, err)
	require.Equal(t, "abc", line)
	line, err = lr.next()
	require.NoError(t, err)
	require.Equal(t, "x", line, "the over-long line is dropped")
	require.Equal(t, "", string(lr.rest())) // "rest" not read yet: no newline needed
	_, err = lr.next()
	require.ErrorIs(t, err, io.EOF)
	require.Equal(t, "rest", string(lr.rest()), "what follows the last line is kept")
}

// oneByte yields b one byte a read.
type oneByte struct{ b []byte }

func (o *oneByte) Read(p []byte) (int, error) {
	if len(o.b) == 0 {
		return 0, io.EOF
	}
	p[0] = o.b[0]
	o.b = o.b[1:]
	return 1, nil
}

// TestSerialStreamCloseEndsRead: closing a stream ends a Read blocked on
// it even though the guest never answers (a paused or stopped guest), as
// gRPC's client, which waits for its reader when it closes, needs.
func TestSerialStreamCloseEndsRead(t *testing.T) {
	dev := newFakeDev()
	l := newSerialListener("test", dev.open)
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close() // held open, never read or written
		}
	}()
	ch := NewSerialChannel(func(context.Context) (net.Conn, error) { return dev.connect(), nil })
	defer ch.Close()
	c, err := ch.Dial(t.Context())
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 1))
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	require.NoError(t, c.Close())
	select {
	case err := <-done:
		require.Error(t, err)
	case <-time.After(2 * time.Second):
		t.Fatal("Close left a Read blocked")
	}
}
