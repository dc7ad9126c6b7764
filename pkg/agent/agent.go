// Package agent is the guest agent, fc-agent, and the host's client for it.
//
// The agent runs inside every VM or container and serves the host over gRPC
// (the protocol in agentpb) on any byte stream: AF_VSOCK in a Firecracker
// guest, a unix socket or TCP elsewhere. It runs commands that die with
// their call (Exec), keeps a table of processes that outlive it
// (StartProcess and the calls that follow, attach to, signal and feed
// them), reads, writes and manages files, and keeps the guest's tool
// volumes (types.ToolSet: found under the tools root at start, added by
// AddTools), whose bin directories lead every command's PATH. Server is
// the guest side,
// Client the host side; Listen and Dialer connect the two.
package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"

	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
)

// Version is the agent's version, reported by Info.
const Version = "0.1.0"

// DefaultVsockPort is the AF_VSOCK port the agent listens on in a guest.
const DefaultVsockPort = bootparams.AgentPort

// protocolRevision is reported by Info so a host can tell which features of
// aetherium.agent.v1 the agent understands.
//
//	1: the first release.
//	2: WriteFileHeader.user (an older agent ignores it).
//	3: the process table (StartProcess, ConnectProcess, ...) and the file
//	   system RPCs (Stat, ListDir, MakeDir, Move, Remove).
//	4: tool volumes (AddTools, ListTools), and every command's PATH
//	   starts with their bin directories.
//	5: ExecStart.execution_id and reattach_only (the execution journal,
//	   ExecResponse.reattached), and killing a command kills every
//	   process it started (ExecTokenEnv).
//	6: SetIdentity (clone identity: clock, RNG reseed, hostname,
//	   machine-id, network).
const protocolRevision = 6

// protocolFileUser is the first revision that honours WriteFileHeader.user.
const protocolFileUser = 2

// protocolProcessesFiles is the first revision with the process table and
// the file system RPCs; an older agent answers them Unimplemented.
const protocolProcessesFiles = 3

// protocolTools is the first revision with AddTools and ListTools.
const protocolTools = 4

// protocolExecJournal is the first revision that journals executions by
// ExecStart.execution_id and kills a command's whole process tree.
const protocolExecJournal = 5

// protocolIdentity is the first revision with SetIdentity.
const protocolIdentity = 6

// chunkSize bounds every data message (output, file content, stdin): small
// enough to stream promptly, large enough to keep per-message cost low.
const chunkSize = 32 << 10

// Dialer opens a byte stream to an agent. It is called again whenever the
// client needs a new connection, so it must be safe to call more than once.
type Dialer func(ctx context.Context) (net.Conn, error)

// UnixDialer dials the agent listening on the unix socket at path.
func UnixDialer(path string) Dialer {
	return func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}
}

// Listen opens the listener the agent serves on. spec is one of
//
//	unix:///abs/path     a unix socket; a stale socket file is removed first
//	                     and the socket is made 0600
//	vsock://:9999        AF_VSOCK on any context ID (vsock://CID:PORT for one)
//	tcp://127.0.0.1:1234 TCP, for development only: it has no authentication
func Listen(spec string) (net.Listener, error) {
	scheme, rest, ok := strings.Cut(spec, "://")
	if !ok {
		return nil, fmt.Errorf("listen address %q has no scheme; use unix:///path, vsock://:%d or tcp://host:port", spec, DefaultVsockPort)
	}
	switch scheme {
	case "unix":
		return listenUnix(rest)
	case "vsock":
		return listenVsock(rest)
	case "tcp":
		l, err := net.Listen("tcp", rest)
		if err != nil {
			return nil, fmt.Errorf("listening on %s: %w", spec, err)
		}
		return l, nil
	default:
		return nil, fmt.Errorf("listen address %q has unknown scheme %q; use unix, vsock or tcp", spec, scheme)
	}
}

func listenUnix(path string) (net.Listener, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("unix socket path %q must be absolute, e.g. unix:///run/fc-agent.sock", path)
	}
	// A socket left by a previous run would make bind fail with EADDRINUSE.
	// Only sockets are removed so a typo cannot delete a regular file.
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("cannot listen on %s: the path exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing stale socket %s: %w", path, err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	// Whoever can connect can run commands as the agent's user.
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("restricting socket %s to its owner: %w", path, err)
	}
	return l, nil
}

func listenVsock(hostport string) (net.Listener, error) {
	host, portStr, err := net.SplitHostPort(hostport)
	if err != nil {
		return nil, fmt.Errorf("vsock address %q: %w; use vsock://:%d", hostport, err, DefaultVsockPort)
	}
	port, err := strconv.ParseUint(portStr, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("vsock port %q is not a number; use vsock://:%d", portStr, DefaultVsockPort)
	}
	cid := uint64(unix.VMADDR_CID_ANY)
	if host != "" {
		if cid, err = strconv.ParseUint(host, 10, 32); err != nil {
			return nil, fmt.Errorf("vsock context ID %q is not a number; leave it empty to accept any", host)
		}
	}
	l, err := vsock.ListenContextID(uint32(cid), uint32(port), nil)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("listening on vsock port %d: %w; the kernel has no vsock device (load vhost_vsock/vmw_vsock_virtio_transport, or use unix:// outside a VM)", port, err)
		}
		return nil, fmt.Errorf("listening on vsock port %d: %w", port, err)
	}
	return l, nil
}
