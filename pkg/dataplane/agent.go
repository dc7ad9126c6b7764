package dataplane

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// agentPath is the route of a VM's agent tunnel.
const agentPath = "/internal/v1/vms/{id}/agent"

// AgentProtocol is the Upgrade token of the agent tunnel: after the 101
// the connection carries the guest agent's gRPC (HTTP/2) stream verbatim.
const AgentProtocol = "aetherium-agent/1"

// agentDialTimeout bounds the worker's dial of a guest agent; the caller's
// own ctx bounds the whole exchange on its side.
const agentDialTimeout = 10 * time.Second

// switchingProtocols is the whole 101 answer. It is written by hand after
// the hijack: net/http treats 101 as a final status and would add headers
// of its own.
const switchingProtocols = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + AgentProtocol + "\r\n\r\n"

// openTunnels counts the tunnels being spliced in this process.
var openTunnels atomic.Int64

// OpenTunnels returns how many agent tunnels the handlers of this process
// are splicing. Each is counted until both of its connections are closed
// and both copying goroutines have returned, so tests use it to check that
// a closed tunnel leaves nothing behind.
func OpenTunnels() int64 { return openTunnels.Load() }

// isAgentUpgrade reports whether r asks for the agent protocol: Connection
// lists "upgrade" and Upgrade names AgentProtocol, both case-insensitively.
func isAgentUpgrade(r *http.Request) bool {
	return headerHasToken(r.Header, "Connection", "upgrade") && headerHasToken(r.Header, "Upgrade", AgentProtocol)
}

// headerHasToken reports whether the comma-separated lists of header key
// hold token.
func headerHasToken(h http.Header, key, token string) bool {
	for _, v := range h.Values(key) {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// agentTunnel upgrades the request to a raw stream to the VM's guest
// agent. The checks, the dial and every error happen before the 101, so
// that they are answered as on the file routes.
func (h *Handler) agentTunnel(w http.ResponseWriter, r *http.Request) {
	if !isAgentUpgrade(r) {
		w.Header().Set("Connection", "Upgrade")
		w.Header().Set("Upgrade", AgentProtocol)
		writeCode(w, http.StatusUpgradeRequired, CodeInvalid, "the agent route is a protocol upgrade: send Connection: Upgrade and Upgrade: "+AgentProtocol)
		return
	}
	id, err := h.ownedVM(r)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	srv, _ := r.Context().Value(http.ServerContextKey).(*http.Server)
	if err := h.watchShutdown(srv); err != nil {
		h.fail(w, r, err)
		return
	}
	dctx, cancel := context.WithTimeout(r.Context(), agentDialTimeout)
	agentConn, err := h.cfg.VMM.DialAgent(dctx, id)
	cancel()
	if err != nil {
		h.fail(w, r, fmt.Errorf("reaching the agent of vm %s: %w", id, err))
		return
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		agentConn.Close()
		h.fail(w, r, fmt.Errorf("upgrading the connection for vm %s's agent: %w", id, err))
		return
	}
	t := &tunnel{client: conn, agent: agentConn}
	if !h.track(t) {
		t.close() // the server is shutting down
		return
	}
	defer h.untrack(t)
	// The server's header deadline must not cut the tunnel later.
	_ = conn.SetDeadline(time.Time{})
	if _, err := brw.WriteString(switchingProtocols); err == nil {
		err = brw.Flush()
	}
	if err != nil {
		t.close()
		return
	}
	h.log.Debug("agent tunnel opened", "vm_id", id, "remote", r.RemoteAddr)
	start := time.Now()
	// The client sends nothing before the 101, but whatever the server
	// read ahead must go first. Past it, the copy reads the socket itself
	// rather than through the server's buffers, so the kernel can splice.
	var fromClient io.Reader = conn
	if n := brw.Reader.Buffered(); n > 0 {
		early, _ := brw.Reader.Peek(n)
		fromClient = io.MultiReader(bytes.NewReader(bytes.Clone(early)), conn)
	}
	up, down := t.splice(fromClient)
	h.log.Debug("agent tunnel closed", "vm_id", id, "remote", r.RemoteAddr, "bytes_in", up, "bytes_out", down, "duration", time.Since(start))
}

// tunnel is one spliced pair of connections.
type tunnel struct {
	client, agent net.Conn
	once          sync.Once
}

// close closes both connections, which ends both copies; it may be called
// more than once and from any goroutine.
func (t *tunnel) close() {
	t.once.Do(func() {
		t.client.Close()
		t.agent.Close()
	})
}

// splice copies both ways until either side closes or fails, then closes
// both and returns once both copies have returned, with the bytes each
// carried: up from the client (read through fromClient), down from the
// agent.
func (t *tunnel) splice(fromClient io.Reader) (up, down int64) {
	openTunnels.Add(1)
	defer openTunnels.Add(-1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		up, _ = io.Copy(t.agent, fromClient)
		t.close()
	}()
	down, _ = io.Copy(t.client, t.agent)
	t.close()
	<-done
	return up, down
}

// watchShutdown makes srv's Shutdown close this handler's tunnels, which
// it does not track once hijacked; it registers once per server. After a
// shutdown began, new tunnels are refused.
func (h *Handler) watchShutdown(srv *http.Server) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closing {
		return fmt.Errorf("%w: the worker is shutting down; retry once it is back", types.ErrUnavailable)
	}
	if srv == nil || h.servers[srv] {
		return nil
	}
	if h.servers == nil {
		h.servers = map[*http.Server]bool{}
	}
	h.servers[srv] = true
	srv.RegisterOnShutdown(h.CloseTunnels)
	return nil
}

// track records t as open unless the handler is closing.
func (h *Handler) track(t *tunnel) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closing {
		return false
	}
	if h.tunnels == nil {
		h.tunnels = map[*tunnel]struct{}{}
	}
	h.tunnels[t] = struct{}{}
	return true
}

func (h *Handler) untrack(t *tunnel) {
	h.mu.Lock()
	delete(h.tunnels, t)
	h.mu.Unlock()
}

// CloseTunnels closes every open agent tunnel and refuses new ones; the
// file routes keep working. The server the handler runs in calls it when
// it shuts down, since hijacked connections are beyond its Shutdown. It
// returns without waiting for the tunnels' goroutines, which end at once.
// Calling it again is harmless.
func (h *Handler) CloseTunnels() {
	h.mu.Lock()
	h.closing = true
	open := make([]*tunnel, 0, len(h.tunnels))
	for t := range h.tunnels {
		open = append(open, t)
	}
	h.mu.Unlock()
	for _, t := range open {
		t.close()
	}
}

// DialAgent opens a byte stream to the guest agent of VM vmID through the
// data plane of the worker at addr: an HTTP upgrade to AgentProtocol, after
// which the connection speaks the agent's gRPC, so that agent.NewClient
// can run over it. ctx bounds the dial and the upgrade (as do the client's
// DialTimeout and ResponseHeaderTimeout); the returned conn outlives ctx
// and the caller closes it. Errors are those of the file routes: the
// worker's answer mapped to its kind in pkg/types (types.ErrNotFound for a
// VM the worker does not own, types.ErrConflict for one that does not
// run), types.ErrUnavailable when the worker or the agent cannot be
// reached or the token is refused, and ctx's error when ctx ended.
func (c *Client) DialAgent(ctx context.Context, addr, vmID string) (net.Conn, error) {
	what := fmt.Sprintf("connecting to the agent of vm %s through worker %s", vmID, addr)
	u := url.URL{Scheme: "http", Host: addr, Path: "/internal/v1/vms/" + vmID + "/agent"}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %w", what, types.ErrInvalid, err)
	}
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", AgentProtocol)
	req.Header.Set("Authorization", "Bearer "+c.token)
	conn, err := c.dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, unreachable(ctx, what, err)
	}
	// The upgrade is bounded like any answer's headers, and by ctx; the
	// tunnel itself is not.
	deadline := time.Now().Add(c.headerTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	_ = conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	fail := func(err error) (net.Conn, error) {
		stop()
		conn.Close()
		return nil, err
	}
	// Request.Write buffers, so the request leaves in one write.
	if err := req.Write(conn); err != nil {
		return fail(unreachable(ctx, what, err))
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return fail(unreachable(ctx, what, err))
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		var b errorBody
		_ = json.NewDecoder(io.LimitReader(resp.Body, maxErrorBody)).Decode(&b)
		resp.Body.Close()
		return fail(errorOf(resp.StatusCode, b, what))
	}
	if !headerHasToken(resp.Header, "Upgrade", AgentProtocol) {
		return fail(fmt.Errorf("%s: %w: the worker switched to %q instead of %s; run the same Aetherium version on the API and the workers",
			what, types.ErrUnavailable, resp.Header.Get("Upgrade"), AgentProtocol))
	}
	if !stop() && ctx.Err() != nil {
		conn.Close()
		return nil, fmt.Errorf("%s: %w", what, ctx.Err())
	}
	_ = conn.SetDeadline(time.Time{})
	// The agent may have spoken already (gRPC servers send their settings
	// at once): whatever came with the 101 is read first.
	pending, _ := br.Peek(br.Buffered())
	return &tunnelConn{Conn: conn, pending: bytes.Clone(pending)}, nil
}

// tunnelConn is the client's end of a tunnel.
type tunnelConn struct {
	net.Conn
	mu      sync.Mutex
	pending []byte // read ahead with the 101, served before the socket
}

func (c *tunnelConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		c.mu.Unlock()
		return n, nil
	}
	c.mu.Unlock()
	return c.Conn.Read(p)
}

// CloseWrite half-closes the stream towards the worker.
func (c *tunnelConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return fmt.Errorf("%w: close-write", types.ErrNotSupported)
}
