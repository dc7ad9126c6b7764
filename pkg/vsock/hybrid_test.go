package vsock

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// fakeVMM serves the host side of hybrid vsock on a Unix socket: for each
// connection it reads the CONNECT line and hands it to reply, which writes
// what the VMM would.
func fakeVMM(t *testing.T, path string, reply func(c net.Conn, port string)) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, err := bufio.NewReader(c).ReadString('\n')
				if err != nil {
					return
				}
				port, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "CONNECT ")
				if !ok {
					return
				}
				reply(c, port)
			}()
		}
	}()
}

func TestDialKeepsBytesAfterOK(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.sock")
	fakeVMM(t, path, func(c net.Conn, port string) {
		// The OK line and the guest's first bytes arrive in one write.
		io.WriteString(c, "OK 1073741824\nhello from "+port+"\n")
		io.Copy(c, c) // then echo
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, path, 9999)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	got, err := br.ReadString('\n')
	if err != nil || got != "hello from 9999\n" {
		t.Fatalf("first line = %q, %v; want the bytes sent with OK", got, err)
	}
	io.WriteString(c, "ping\n")
	if got, _ := br.ReadString('\n'); got != "ping\n" {
		t.Fatalf("echo = %q", got)
	}
}

func TestDialErrors(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	if _, err := Dial(ctx, filepath.Join(dir, "missing.sock"), 1); err == nil {
		t.Fatal("dial of a missing socket succeeded")
	} else if oe := (*OpError)(nil); !errors.As(err, &oe) || oe.Op != "dial" {
		t.Fatalf("err = %v, want an OpError from dial", err)
	}

	refused := filepath.Join(dir, "refused.sock")
	fakeVMM(t, refused, func(net.Conn, string) {}) // closes: nothing listens in the guest
	if _, err := Dial(ctx, refused, 2); err == nil || !strings.Contains(err.Error(), "nothing listens") {
		t.Fatalf("err = %v, want the closed-before-OK explanation", err)
	}

	bad := filepath.Join(dir, "bad.sock")
	fakeVMM(t, bad, func(c net.Conn, _ string) { io.WriteString(c, "NOPE\n") })
	if _, err := Dial(ctx, bad, 3); err == nil || !strings.Contains(err.Error(), `"NOPE\n"`) {
		t.Fatalf("err = %v, want the bad reply quoted", err)
	}

	long := filepath.Join(dir, "long.sock")
	fakeVMM(t, long, func(c net.Conn, _ string) { io.WriteString(c, strings.Repeat("x", 1000)) })
	if _, err := Dial(ctx, long, 4); err == nil || !strings.Contains(err.Error(), "without a newline") {
		t.Fatalf("err = %v, want a bounded reply", err)
	}

	// A VMM that never answers: the context bounds the handshake.
	silent := filepath.Join(dir, "silent.sock")
	fakeVMM(t, silent, func(c net.Conn, _ string) { time.Sleep(5 * time.Second) })
	short, cancel2 := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel2()
	start := time.Now()
	if _, err := Dial(short, silent, 5); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want the deadline", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("handshake took %v past its deadline", d)
	}
}

func TestDialRetryWaitsForGuest(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// The socket appears late, and the guest listens later still.
	ready := make(chan struct{})
	go func() {
		time.Sleep(100 * time.Millisecond)
		fakeVMM(t, path, func(c net.Conn, port string) {
			select {
			case <-ready:
				io.WriteString(c, "OK 5\n")
				io.Copy(c, c)
			default:
			}
		})
		time.Sleep(100 * time.Millisecond)
		close(ready)
	}()
	c, err := DialRetry(ctx, path, 9999, Backoff{})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	short, cancel2 := context.WithTimeout(ctx, 150*time.Millisecond)
	defer cancel2()
	_, err = DialRetry(short, filepath.Join(t.TempDir(), "never.sock"), 9999, Backoff{})
	if !errors.Is(err, types.ErrUnavailable) || !strings.Contains(err.Error(), "vsock connection timeout") {
		t.Fatalf("err = %v, want ErrUnavailable naming the vsock timeout", err)
	}
}

func TestParseReply(t *testing.T) {
	for in, want := range map[string]uint32{"OK 0\n": 0, "OK 1073741824\n": 1073741824, "OK 4294967295\n": 4294967295} {
		got, err := ParseReply([]byte(in))
		if err != nil || got != want {
			t.Errorf("ParseReply(%q) = %d, %v", in, got, err)
		}
	}
	for _, in := range []string{"", "OK", "OK \n", "OK 12", "ok 12\n", "OK -1\n", "OK +1\n", "OK 4294967296\n", "OK 1 2\n", "OK 12\r\n", "ERR 1\n"} {
		if _, err := ParseReply([]byte(in)); err == nil {
			t.Errorf("ParseReply(%q) succeeded", in)
		}
	}
}

func FuzzParseReply(f *testing.F) {
	for _, s := range []string{"OK 1\n", "OK 4294967295\n", "OK 4294967296\n", "OK \n", "NOPE\n", "OK 0012\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParseReply(b)
		if err != nil {
			return
		}
		// Anything accepted must be exactly OK, digits, newline.
		s := string(b)
		if !strings.HasPrefix(s, "OK ") || !strings.HasSuffix(s, "\n") {
			t.Fatalf("accepted %q", b)
		}
		digits := s[3 : len(s)-1]
		if strings.TrimLeft(digits, "0123456789") != "" || len(digits) == 0 {
			t.Fatalf("accepted %q", b)
		}
		_ = p
	})
}

// FuzzDial runs the whole handshake against arbitrary VMM output and checks
// that whatever follows a valid OK line reaches the caller unchanged.
func FuzzDial(f *testing.F) {
	f.Add([]byte("OK 1\n"), []byte("payload"))
	f.Add([]byte("OK 1"), []byte("\npayload"))
	f.Add([]byte("garbage"), []byte(""))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, reply, payload []byte) {
		a, b := net.Pipe()
		defer a.Close()
		go func() {
			defer b.Close()
			bufio.NewReader(b).ReadString('\n')
			b.Write(append(append([]byte{}, reply...), payload...))
		}()
		_ = dir
		br := bufio.NewReader(a)
		io.WriteString(a, "CONNECT 1\n")
		line, err := readLine(br)
		if err != nil {
			return
		}
		if _, err := ParseReply(line); err != nil {
			return
		}
		rest, _ := io.ReadAll(br)
		whole := append(append([]byte{}, reply...), payload...)
		if string(line)+string(rest) != string(whole) {
			t.Fatalf("lost bytes: line %q rest %q whole %q", line, rest, whole)
		}
	})
}
