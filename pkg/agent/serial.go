package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// The serial channel carries the agent's gRPC over one byte stream that
// either end may lose and find again at any time: a virtio-serial port in
// the guest, a Unix socket (QEMU's chardev) on the host. Unlike vsock it
// survives migration, so a VM saved to a file and restored, or a clone of a
// snapshot, answers on it again.
//
// One host connection carries one session, multiplexed by yamux: every
// gRPC connection is a yamux stream. The byte stream is not reset when the
// host goes away (a worker restart, a VM restored from a file): the guest
// may still hold bytes of the old session, and the host may receive the
// guest's last words to the old one. So every session starts with a resync
// handshake of text lines, each side discarding whatever is not the line it
// expects:
//
//	host  -> HELLO n   (repeated, with growing gaps, until answered)
//	guest -> ACK n     (for every HELLO it reads)
//	host  -> START n   (once, after the first ACK n; no HELLO after it)
//	guest -> READY n   (then yamux, guest as server)
//	host discards up to READY n (extra ACKs), then yamux as client.
//
// n is a fresh random nonce per host connection, so a line of an older
// session never matches. A guest caught inside an older session sees the
// HELLO as a yamux protocol error, abandons that session and resyncs; the
// repeated HELLO then finds it.
const (
	serialMagic  = "AETHERIUM-SERIAL/1 "
	serialHello  = serialMagic + "HELLO "
	serialAck    = serialMagic + "ACK "
	serialStart  = serialMagic + "START "
	serialReady  = serialMagic + "READY "
	serialMaxLen = 128 // longer lines are stale binary data, discarded

	// SerialPortName is the name of the agent's virtio-serial port
	// (QEMU's virtserialport name=).
	SerialPortName = bootparams.AgentSerialPort
	// SerialScheme starts a listen address that names a virtio-serial
	// port: serial://NAME.
	SerialScheme = "serial://"
)

// ListenChannel opens the listener the agent serves on: spec is
// serial://NAME for the virtio-serial port NAME (ListenSerial), or
// anything Listen takes.
func ListenChannel(spec string) (net.Listener, error) {
	if name, ok := strings.CutPrefix(spec, SerialScheme); ok {
		return ListenSerial(name)
	}
	return Listen(spec)
}

// Timing of the handshake. Variables so that tests may shorten them.
var (
	// serialHelloFirst and serialHelloMax bound the gap between repeated
	// HELLOs.
	serialHelloFirst = 20 * time.Millisecond
	serialHelloMax   = 500 * time.Millisecond
	// serialReadyWait bounds the wait for READY after START.
	serialReadyWait = 5 * time.Second
	// serialIdleFirst and serialIdleMax bound the guest's sleeps while no
	// host is connected (its port then reads end-of-file at once).
	serialIdleFirst = 2 * time.Millisecond
	serialIdleMax   = 20 * time.Millisecond
	// serialWriteWait bounds one handshake write of the guest's.
	serialWriteWait = 2 * time.Second
)

// yamuxConfig is both ends' session configuration. Keep-alives are off:
// a paused VM cannot answer them, and a lost host shows as end-of-file
// (guest) or a closed socket (host) anyway.
func yamuxConfig() *yamux.Config {
	c := yamux.DefaultConfig()
	c.EnableKeepAlive = false
	c.LogOutput = io.Discard
	return c
}

// lineReader splits a byte stream into handshake lines, keeping what it
// has read past the last line it returned (see rest) and any partial line
// across errors, so a read timeout loses nothing.
type lineReader struct {
	r   io.Reader
	buf []byte
	// skipping is set while the rest of an over-long line is dropped.
	skipping bool
}

// next returns the next line without its newline. Over-long lines are
// dropped.
func (l *lineReader) next() (string, error) {
	var chunk [512]byte
	for {
		if i := bytes.IndexByte(l.buf, '\n'); i >= 0 {
			line := string(l.buf[:i])
			l.buf = l.buf[i+1:]
			if len(line) <= serialMaxLen && !l.skipping {
				return strings.TrimSuffix(line, "\r"), nil
			}
			l.skipping = false
			continue
		}
		if len(l.buf) > serialMaxLen {
			l.buf = l.buf[:0] // stale binary data
			l.skipping = true
		}
		n, err := l.r.Read(chunk[:])
		l.buf = append(l.buf, chunk[:n]...)
		if err != nil && n == 0 {
			return "", err
		}
	}
}

// rest is what was read past the last returned line.
func (l *lineReader) rest() []byte { return l.buf }

// prefixed is a connection that yields pre before reading on.
type prefixed struct {
	io.ReadWriteCloser
	pre []byte
}

func (p *prefixed) Read(b []byte) (int, error) {
	if len(p.pre) > 0 {
		n := copy(b, p.pre)
		p.pre = p.pre[n:]
		return n, nil
	}
	return p.ReadWriteCloser.Read(b)
}

// fullClose is a yamux stream whose Close also ends its reads, as
// net.Conn's contract says and gRPC relies on: yamux's Close only
// half-closes, so a reader would wait for the peer's FIN, which a paused
// or stopped guest never sends.
type fullClose struct{ *yamux.Stream }

func (c fullClose) Close() error {
	err := c.Stream.Close()
	_ = c.Stream.SetReadDeadline(time.Unix(1, 0))
	return err
}

func newNonce() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	return hex.EncodeToString(b[:])
}

// validNonce reports whether s is a nonce as newNonce makes them.
func validNonce(s string) bool {
	if len(s) != 32 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}

// SerialChannel is the host's end of an agent's serial channel: it keeps
// one session with the guest over the connections dial makes (to QEMU's
// chardev socket), makes a new one when the session breaks, and hands out
// its streams. Its Dial is an agent.Dialer. It is safe for concurrent use.
type SerialChannel struct {
	dial func(ctx context.Context) (net.Conn, error)
	// sem serialises making sessions while letting waiters give up with
	// their ctx.
	sem chan struct{}

	mu     sync.Mutex
	sess   *yamux.Session
	closed bool
}

// NewSerialChannel returns a channel that reaches the guest through the
// connections dial makes. It does no I/O.
func NewSerialChannel(dial func(ctx context.Context) (net.Conn, error)) *SerialChannel {
	return &SerialChannel{dial: dial, sem: make(chan struct{}, 1)}
}

// Dial returns a new stream to the agent: over the current session, or a
// new one made first (dial, handshake). ctx bounds only the dial; the
// stream lives until closed or until the session breaks. An agent that
// does not answer before ctx ends gives an error wrapping
// types.ErrUnavailable; a closed channel refuses with net.ErrClosed.
func (c *SerialChannel) Dial(ctx context.Context) (net.Conn, error) {
	for attempt := 0; ; attempt++ {
		sess, err := c.session(ctx)
		if err != nil {
			return nil, err
		}
		st, err := sess.OpenStream()
		if err == nil {
			return fullClose{st}, nil
		}
		// A session broken since it was made: make a new one once.
		c.drop(sess)
		if attempt > 0 {
			return nil, fmt.Errorf("%w: opening a stream to the guest agent: %v", types.ErrUnavailable, err)
		}
	}
}

// Close ends the session; streams in use fail. Dial then refuses.
func (c *SerialChannel) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if c.sess != nil {
		c.sess.Close()
		c.sess = nil
	}
	return nil
}

// Reset ends the current session, if any, so that the next Dial makes a
// new one: for a guest the host knows it lost (a VM restored from a file).
func (c *SerialChannel) Reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sess != nil {
		c.sess.Close()
		c.sess = nil
	}
}

func (c *SerialChannel) drop(s *yamux.Session) {
	c.mu.Lock()
	if c.sess == s {
		c.sess = nil
	}
	c.mu.Unlock()
	s.Close()
}

// current returns the live session, or nil.
func (c *SerialChannel) current() (*yamux.Session, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, fmt.Errorf("agent serial channel: %w", net.ErrClosed)
	}
	if c.sess != nil && !c.sess.IsClosed() {
		return c.sess, nil
	}
	return nil, nil
}

func (c *SerialChannel) session(ctx context.Context) (*yamux.Session, error) {
	if s, err := c.current(); s != nil || err != nil {
		return s, err
	}
	select {
	case c.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: waiting to reach the guest agent: %w", types.ErrUnavailable, ctx.Err())
	}
	defer func() { <-c.sem }()
	if s, err := c.current(); s != nil || err != nil {
		return s, err // made by another caller meanwhile
	}
	conn, err := c.dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w: connecting to the agent's serial port: %w", types.ErrUnavailable, err)
	}
	rwc, err := hostHandshake(ctx, conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("%w: guest agent serial handshake: %w", types.ErrUnavailable, err)
	}
	s, err := yamux.Client(rwc, yamuxConfig())
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("agent serial channel: %w", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		s.Close()
		return nil, fmt.Errorf("agent serial channel: %w", net.ErrClosed)
	}
	c.sess = s
	return s, nil
}

// hostHandshake runs the host's side of the resync handshake on conn and
// returns the stream to run yamux on. ctx bounds it.
func hostHandshake(ctx context.Context, conn net.Conn) (io.ReadWriteCloser, error) {
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	nonce := newNonce()
	lr := &lineReader{r: conn}
	gap := serialHelloFirst
	acked := false
	for !acked {
		if _, err := io.WriteString(conn, serialHello+nonce+"\n"); err != nil {
			return nil, ctxOr(ctx, err)
		}
		_ = conn.SetReadDeadline(time.Now().Add(gap))
		for {
			line, err := lr.next()
			if errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() == nil {
				break // HELLO again
			}
			if err != nil {
				return nil, ctxOr(ctx, err)
			}
			if line == serialAck+nonce {
				acked = true
				break
			}
		}
		gap = min(gap*2, serialHelloMax)
	}
	if _, err := io.WriteString(conn, serialStart+nonce+"\n"); err != nil {
		return nil, ctxOr(ctx, err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(serialReadyWait))
	for {
		line, err := lr.next()
		if err != nil {
			return nil, ctxOr(ctx, err)
		}
		if line == serialReady+nonce {
			break
		}
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		return nil, err
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	return &prefixed{ReadWriteCloser: conn, pre: lr.rest()}, nil
}

func ctxOr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// port is the guest's end of the serial channel: a device opened for each
// session. *os.File on a virtio-serial port fits, and so does a test's
// pipe.
type port interface {
	io.ReadWriteCloser
	SetWriteDeadline(t time.Time) error
}

// serialListener serves the sessions of a serial channel's guest end as a
// net.Listener: Accept returns the host's streams of whichever session is
// current.
type serialListener struct {
	open  func() (port, error)
	addr  serialAddr
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
	wg    sync.WaitGroup

	mu   sync.Mutex
	cur  io.Closer // the current port or session
	errf func(error)
}

// serialAddr is the address of a serial listener: the port's name.
type serialAddr string

func (a serialAddr) Network() string { return "serial" }
func (a serialAddr) String() string  { return string(a) }

// ListenSerial listens on the guest's virtio-serial port named name (see
// SerialPortName): it waits up to 5 s for the port to appear, then serves
// one session after another on it for as long as the listener is open.
func ListenSerial(name string) (net.Listener, error) {
	if name == "" || strings.ContainsAny(name, "/\x00") {
		return nil, fmt.Errorf("%w: serial port name %q: give the virtserialport's name=, e.g. %s", types.ErrInvalid, name, SerialPortName)
	}
	var dev string
	deadline := time.Now().Add(5 * time.Second)
	for {
		var err error
		if dev, err = findSerialPort(name); err == nil {
			break
		} else if time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(10 * time.Millisecond)
	}
	return newSerialListener(serialAddr(name), func() (port, error) {
		return os.OpenFile(dev, os.O_RDWR, 0)
	}), nil
}

// findSerialPort returns the device node of the virtio-serial port named
// name, from sysfs (no udev makes /dev/virtio-ports links in the guest).
func findSerialPort(name string) (string, error) {
	if p := "/dev/virtio-ports/" + name; fileExists(p) {
		return p, nil
	}
	names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
	for _, f := range names {
		b, err := os.ReadFile(f)
		if err == nil && strings.TrimSpace(string(b)) == name {
			dev := "/dev/" + filepath.Base(filepath.Dir(f))
			if fileExists(dev) {
				return dev, nil
			}
		}
	}
	return "", fmt.Errorf("%w: no virtio-serial port named %q (is virtio_console loaded and the VM given -device virtserialport,name=%s?)", types.ErrUnavailable, name, name)
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func newSerialListener(addr serialAddr, open func() (port, error)) *serialListener {
	l := &serialListener{open: open, addr: addr, conns: make(chan net.Conn), done: make(chan struct{})}
	l.wg.Add(1)
	go l.run()
	return l
}

// Accept implements net.Listener.
func (l *serialListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close implements net.Listener: the current session ends and no other
// starts.
func (l *serialListener) Close() error {
	l.once.Do(func() {
		close(l.done)
		l.mu.Lock()
		if l.cur != nil {
			l.cur.Close()
		}
		l.mu.Unlock()
	})
	l.wg.Wait()
	return nil
}

// Addr implements net.Listener.
func (l *serialListener) Addr() net.Addr { return l.addr }

func (l *serialListener) closed() bool {
	select {
	case <-l.done:
		return true
	default:
		return false
	}
}

// setCur records what Close must close; false when the listener closed.
func (l *serialListener) setCur(c io.Closer) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed() {
		return false
	}
	l.cur = c
	return true
}

// sleep waits d or until the listener closes; false when it closed.
func (l *serialListener) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-l.done:
		return false
	}
}

// run serves sessions until the listener closes. Each session opens the
// port afresh, so a reader of an abandoned session never takes the next
// one's bytes.
func (l *serialListener) run() {
	defer l.wg.Done()
	idle := serialIdleFirst
	for !l.closed() {
		p, err := l.open()
		if err != nil {
			// EBUSY while the last session's close completes.
			if !l.sleep(idle) {
				return
			}
			idle = min(idle*2, serialIdleMax)
			continue
		}
		if !l.setCur(p) {
			p.Close()
			return
		}
		rwc, err := l.guestHandshake(p)
		if err != nil {
			p.Close()
			continue
		}
		idle = serialIdleFirst
		sess, err := yamux.Server(rwc, yamuxConfig())
		if err != nil {
			p.Close()
			continue
		}
		if !l.setCur(sess) {
			sess.Close()
			return
		}
		for {
			st, err := sess.AcceptStream()
			if err != nil {
				break
			}
			select {
			case l.conns <- fullClose{st}:
			case <-l.done:
				st.Close()
			}
		}
		sess.Close() // closes p
	}
}

// guestHandshake runs the guest's side of the resync handshake. While no
// host is connected the port reads end-of-file at once: it then sleeps,
// with backoff, and reads again.
func (l *serialListener) guestHandshake(p port) (io.ReadWriteCloser, error) {
	lr := &lineReader{r: p}
	idle := serialIdleFirst
	pending := ""
	write := func(s string) error {
		_ = p.SetWriteDeadline(time.Now().Add(serialWriteWait))
		_, err := io.WriteString(p, s)
		_ = p.SetWriteDeadline(time.Time{})
		return err
	}
	for {
		line, err := lr.next()
		if errors.Is(err, io.EOF) {
			if !l.sleep(idle) {
				return nil, net.ErrClosed
			}
			idle = min(idle*2, serialIdleMax)
			continue
		}
		if err != nil {
			return nil, err
		}
		idle = serialIdleFirst
		switch {
		case strings.HasPrefix(line, serialHello) && validNonce(line[len(serialHello):]):
			pending = line[len(serialHello):]
			if err := write(serialAck + pending + "\n"); err != nil {
				return nil, err
			}
		case pending != "" && line == serialStart+pending:
			if err := write(serialReady + pending + "\n"); err != nil {
				return nil, err
			}
			return &prefixed{ReadWriteCloser: p, pre: lr.rest()}, nil
		}
	}
}
