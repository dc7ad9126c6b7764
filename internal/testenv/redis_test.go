package testenv

import (
	"bufio"
	"net"
	"strings"
	"testing"
	"time"
)

// TestRedis checks that Redis returns a server that answers, that each call
// gets its own server, and that the server is gone once the test ends.
func TestRedis(t *testing.T) {
	var addr string
	t.Run("start", func(t *testing.T) {
		addr = Redis(t)
		if other := Redis(t); other == addr {
			t.Fatalf("two calls returned the same server %s", addr)
		}
		conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			t.Fatalf("dialing %s: %v", addr, err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		r := bufio.NewReader(conn)
		for _, c := range []struct{ send, want string }{
			{"*1\r\n$4\r\nPING\r\n", "+PONG"},
			{"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n", "+OK"},
			{"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", "$1"},
		} {
			if _, err := conn.Write([]byte(c.send)); err != nil {
				t.Fatalf("sending %q: %v", c.send, err)
			}
			line, err := r.ReadString('\n')
			if err != nil {
				t.Fatalf("reading the answer to %q: %v", c.send, err)
			}
			if got := strings.TrimSpace(line); got != c.want {
				t.Fatalf("%q answered %q, want %q", c.send, got, c.want)
			}
		}
	})
	if t.Failed() || addr == "" {
		return
	}
	if conn, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		conn.Close()
		t.Fatalf("redis-server at %s still answers after its test ended", addr)
	}
}

// TestRedisServerRestart checks that a key survives Stop and Start (the
// append-only file), that Kill and Start keep the same address, and that
// Wipe makes the next Start empty.
func TestRedisServerRestart(t *testing.T) {
	s := StartRedis(t)
	addr := s.Addr()
	require := func(send, want string) {
		t.Helper()
		conn, err := net.DialTimeout("tcp", s.Addr(), 2*time.Second)
		if err != nil {
			t.Fatalf("dialing %s: %v", s.Addr(), err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := conn.Write([]byte(send)); err != nil {
			t.Fatalf("sending %q: %v", send, err)
		}
		line, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil {
			t.Fatalf("reading the answer to %q: %v", send, err)
		}
		if got := strings.TrimSpace(line); got != want {
			t.Fatalf("%q answered %q, want %q", send, got, want)
		}
	}
	const (
		set    = "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
		exists = "*2\r\n$6\r\nEXISTS\r\n$1\r\nk\r\n"
	)
	require(set, "+OK")
	s.Stop()
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	if s.Addr() != addr {
		t.Fatalf("restarted on %s, was %s", s.Addr(), addr)
	}
	require(exists, ":1")
	if err := s.Wipe(); err == nil {
		t.Fatal("Wipe of a running server succeeded")
	}
	s.Kill()
	if err := s.Wipe(); err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	require(exists, ":0")
}
