// Command nettool is the network tests' helper inside a guest, whose Debian
// minbase root has no nc, ip or ping. The tests build it statically
// (CGO_ENABLED=0) and copy it in through the agent.
//
//	nettool listen ADDR          answer each TCP connection with the peer's address
//	nettool dial ADDR TIMEOUT    connect, print what the server says (exit 1 on failure)
//	nettool spoof SRC DST:PORT MSG   send one UDP datagram from a forged source address
//	nettool send ADDR BYTES      connect and write BYTES zero bytes, then print the reply
//	nettool addr IFACE           print the IPv4 addresses of an interface
package main

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "nettool:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("usage: nettool listen|dial|spoof|send|addr ...")
	}
	switch {
	case args[0] == "listen" && len(args) == 2:
		return listen(args[1])
	case args[0] == "dial" && len(args) == 3:
		d, err := time.ParseDuration(args[2])
		if err != nil {
			return err
		}
		return dial(args[1], d)
	case args[0] == "spoof" && len(args) == 4:
		return spoof(args[1], args[2], args[3])
	case args[0] == "send" && len(args) == 3:
		n, err := strconv.ParseInt(args[2], 10, 64)
		if err != nil {
			return err
		}
		return send(args[1], n)
	case args[0] == "addr" && len(args) == 2:
		return addrs(args[1])
	}
	return fmt.Errorf("bad arguments %q", args)
}

func listen(addr string) error {
	l, err := net.Listen("tcp4", addr)
	if err != nil {
		return err
	}
	fmt.Println("listening")
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		fmt.Fprintf(c, "%s\n", c.RemoteAddr().(*net.TCPAddr).IP)
		c.Close()
	}
}

func dial(addr string, timeout time.Duration) error {
	c, err := net.DialTimeout("tcp4", addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	fmt.Print(line)
	return nil
}

// spoof sends a UDP datagram whose IPv4 header, written here, names src as
// its source: a raw socket with IPPROTO_RAW implies IP_HDRINCL, and the
// kernel fills in the checksum and length but keeps the given source.
func spoof(src, dst, msg string) error {
	s, err := netip.ParseAddr(src)
	if err != nil {
		return err
	}
	d, err := netip.ParseAddrPort(dst)
	if err != nil {
		return err
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
	if err != nil {
		return fmt.Errorf("raw socket: %w", err)
	}
	defer syscall.Close(fd)
	udpLen := 8 + len(msg)
	pkt := make([]byte, 20+udpLen)
	pkt[0] = 0x45                                         // IPv4, 5-word header
	binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt))) // total length
	pkt[8] = 64                                           // TTL
	pkt[9] = syscall.IPPROTO_UDP                          // protocol
	copy(pkt[12:16], s.AsSlice())                         // forged source
	copy(pkt[16:20], d.Addr().AsSlice())                  // destination
	binary.BigEndian.PutUint16(pkt[20:], 40000)           // source port
	binary.BigEndian.PutUint16(pkt[22:], d.Port())        // destination port
	binary.BigEndian.PutUint16(pkt[24:], uint16(udpLen))  // UDP length
	copy(pkt[28:], msg)                                   // UDP checksum 0: none
	to := &syscall.SockaddrInet4{Addr: d.Addr().As4()}
	if err := syscall.Sendto(fd, pkt, 0, to); err != nil {
		return fmt.Errorf("sending: %w", err)
	}
	fmt.Println("sent")
	return nil
}

func send(addr string, n int64) error {
	c, err := net.DialTimeout("tcp4", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := io.CopyN(c, zeros{}, n); err != nil {
		return err
	}
	c.(*net.TCPConn).CloseWrite()
	reply, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	fmt.Print(string(reply))
	return nil
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func addrs(name string) error {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return err
	}
	as, err := ifc.Addrs()
	if err != nil {
		return err
	}
	var out []string
	for _, a := range as {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() {
			out = append(out, p.String())
		}
	}
	fmt.Println(strings.Join(out, " "))
	return nil
}
