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
