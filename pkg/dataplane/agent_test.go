package dataplane_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/dataplane"
	"github.com/aetherium/aetherium-core/pkg/dataplane/dataplanetest"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// fakeVMM dials a fake agent: the test holds the other end of each pipe.
// Any other call panics on the nil interface.
type fakeVMM struct {
	vmm.VMOrchestrator
	mu     sync.Mutex
	err    error         // returned by DialAgent when set
	agents chan net.Conn // the agent's ends, one per dial
}

func (f *fakeVMM) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	f.mu.Lock()
	err := f.err
	f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	host, guest := net.Pipe()
	select {
	case f.agents <- guest:
		return host, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

type fakeStore map[string]*types.VM

func (s fakeStore) GetVM(_ context.Context, id string) (*types.VM, error) {
	if vm, ok := s[id]; ok {
		return vm, nil
	}
	return nil, types.ErrNotFound
}

// tunnelEnv is a handler with a fake VMM served on 127.0.0.1.
type tunnelEnv struct {
	addr, token string
	vmID        string // running, owned by the handler's worker
	otherVM     string // owned by another worker
	vmm         *fakeVMM
	srv         *http.Server
	handler     *dataplane.Handler
	client      *dataplane.Client
}

func startTunnelEnv(t *testing.T) *tunnelEnv {
	t.Helper()
	e := &tunnelEnv{token: "secret-token", vmID: uuid.NewString(), otherVM: uuid.NewString(),
		vmm: &fakeVMM{agents: make(chan net.Conn, 4)}}
	store := fakeStore{
		e.vmID:    {ID: e.vmID, Owner: "w1", State: types.VMRunning},
		e.otherVM: {ID: e.otherVM, Owner: "w2", State: types.VMRunning},
	}
	h, err := dataplane.NewHandler(dataplane.HandlerConfig{WorkerID: "w1", Token: e.token, VMM: e.vmm, Store: store})
	require.NoError(t, err)
	e.handler = h
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	e.addr = ln.Addr().String()
	e.srv = &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = e.srv.Serve(ln)
	}()
	e.client = dataplane.NewClient(e.token)
	t.Cleanup(func() {
		e.client.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = e.srv.Shutdown(ctx)
		<-done
		dataplanetest.RequireNoTunnels(t)
	})
	return e
}

// agent returns the agent's end of the latest dial.
func (e *tunnelEnv) agent(t *testing.T) net.Conn {
	t.Helper()
	select {
	case c := <-e.vmm.agents:
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("the handler did not dial the agent")
		return nil
	}
}

func TestAgentTunnelSplices(t *testing.T) {
	e := startTunnelEnv(t)
	ctx := t.Context()
	conn, err := e.client.DialAgent(ctx, e.addr, e.vmID)
	require.NoError(t, err)
	agent := e.agent(t)
	require.Eventually(t, func() bool { return dataplane.OpenTunnels() == 1 }, 5*time.Second, time.Millisecond)

	// Both ways, binary, and larger than any buffer on the way.
	payload := make([]byte, 1<<20)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	go func() { _, _ = agent.Write(payload) }()
	got := make([]byte, len(payload))
	_, err = io.ReadFull(conn, got)
	require.NoError(t, err)
	require.Equal(t, payload, got, "agent to client")
	go func() { _, _ = conn.Write(payload) }()
	_, err = io.ReadFull(agent, got)
	require.NoError(t, err)
	require.Equal(t, payload, got, "client to agent")

	// The client closing ends the tunnel: the agent sees EOF and nothing
	// is left on the worker.
	require.NoError(t, conn.Close())
	_, err = agent.Read(make([]byte, 1))
	require.ErrorIs(t, err, io.EOF)
	dataplanetest.RequireNoTunnels(t)

	// The agent closing ends it too.
	conn, err = e.client.DialAgent(ctx, e.addr, e.vmID)
	require.NoError(t, err)
	defer conn.Close()
	agent = e.agent(t)
	require.NoError(t, agent.Close())
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = conn.Read(make([]byte, 1))
	require.ErrorIs(t, err, io.EOF)
	dataplanetest.RequireNoTunnels(t)
}

// TestAgentTunnelEarlyBytes: bytes the agent sent at once can arrive in
// the same segment as the 101; the client's conn yields them first.
func TestAgentTunnelEarlyBytes(t *testing.T) {
	t.Run("through the handler", func(t *testing.T) {
		e := startTunnelEnv(t)
		// The fake agent greets before the client could read anything,
		// as a gRPC server sends its settings.
		go func() {
			a := <-e.vmm.agents
			defer a.Close()
			_, _ = a.Write([]byte("greeting"))
			_, _ = io.Copy(io.Discard, a)
		}()
		conn, err := e.client.DialAgent(t.Context(), e.addr, e.vmID)
		require.NoError(t, err)
		defer conn.Close()
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		got := make([]byte, len("greeting"))
		_, err = io.ReadFull(conn, got)
		require.NoError(t, err)
		require.Equal(t, "greeting", string(got))
	})
	t.Run("from the client with the request", func(t *testing.T) {
		// A client that does not wait for the 101 (gRPC's preface right
		// behind the request): the server reads it ahead with the headers.
		e := startTunnelEnv(t)
		c, err := net.Dial("tcp", e.addr)
		require.NoError(t, err)
		defer c.Close()
		_, err = fmt.Fprintf(c, "GET /internal/v1/vms/%s/agent HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\nclient-early", e.vmID, e.token, dataplane.AgentProtocol)
		require.NoError(t, err)
		agent := e.agent(t)
		got := make([]byte, len("client-early"))
		_ = agent.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.ReadFull(agent, got)
		require.NoError(t, err)
		require.Equal(t, "client-early", string(got))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		require.NoError(t, err)
		require.Equal(t, http.StatusSwitchingProtocols, resp.StatusCode)
	})
	t.Run("in the answer's segment", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
				return
			}
			_, _ = io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "+dataplane.AgentProtocol+"\r\n\r\nearly bytes|later")
			_, _ = io.Copy(io.Discard, c)
		}()
		conn, err := dataplane.NewClient("t").DialAgent(t.Context(), ln.Addr().String(), uuid.NewString())
		require.NoError(t, err)
		defer conn.Close()
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(io.LimitReader(conn, int64(len("early bytes|later"))))
		require.NoError(t, err)
		require.Equal(t, "early bytes|later", string(got))
	})
}

func TestAgentTunnelErrors(t *testing.T) {
	e := startTunnelEnv(t)
	ctx := t.Context()
	tests := []struct {
		name  string
		token string
		vmID  string
		err   error // of the fake VMM's dial
		kind  error
		msg   string
	}{
		{name: "another worker's vm", vmID: e.otherVM, kind: types.ErrNotFound, msg: "not on worker w1"},
		{name: "unknown vm", vmID: uuid.NewString(), kind: types.ErrNotFound},
		{name: "not a uuid", vmID: "x", kind: types.ErrNotFound},
		{name: "wrong token", token: "wrong-token", vmID: e.vmID, kind: types.ErrUnavailable, msg: "cluster token"},
		{name: "stopped vm", vmID: e.vmID, err: fmt.Errorf("%w: vm is stopped; start it first", types.ErrConflict), kind: types.ErrConflict, msg: "start it"},
		{name: "agent unreachable", vmID: e.vmID, err: fmt.Errorf("%w: no agent", types.ErrUnavailable), kind: types.ErrUnavailable, msg: "no agent"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e.vmm.mu.Lock()
			e.vmm.err = tt.err
			e.vmm.mu.Unlock()
			c := e.client
			if tt.token != "" {
				c = dataplane.NewClient(tt.token)
				defer c.Close()
			}
			conn, err := c.DialAgent(ctx, e.addr, tt.vmID)
			require.ErrorIs(t, err, tt.kind)
			require.ErrorContains(t, err, tt.msg)
			require.Nil(t, conn)
			if tt.token != "" {
				require.NotContains(t, err.Error(), tt.token)
			}
		})
	}
	e.vmm.mu.Lock()
	e.vmm.err = nil
	e.vmm.mu.Unlock()

	t.Run("no upgrade", func(t *testing.T) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+e.addr+"/internal/v1/vms/"+e.vmID+"/agent", nil)
		require.NoError(t, err)
		req.Header.Set("Authorization", "Bearer "+e.token)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		require.Equal(t, http.StatusUpgradeRequired, resp.StatusCode)
		require.Equal(t, dataplane.AgentProtocol, resp.Header.Get("Upgrade"))
		var b struct {
			Error struct{ Code, Message string }
		}
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&b))
		require.Equal(t, dataplane.CodeInvalid, b.Error.Code)
	})

	t.Run("unreachable worker", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		addr := ln.Addr().String()
		ln.Close()
		_, err = e.client.DialAgent(ctx, addr, e.vmID)
		require.ErrorIs(t, err, types.ErrUnavailable)
		require.ErrorContains(t, err, "data_advertise")
	})

	t.Run("ctx ends during the upgrade", func(t *testing.T) {
		// A worker that accepts and never answers.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err == nil {
				defer c.Close()
				_, _ = io.Copy(io.Discard, c)
			}
		}()
		dctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err = e.client.DialAgent(dctx, ln.Addr().String(), e.vmID)
		require.ErrorIs(t, err, context.DeadlineExceeded)
		require.Less(t, time.Since(start), 2*time.Second)

		cctx, cancel := context.WithCancel(ctx)
		time.AfterFunc(100*time.Millisecond, cancel)
		_, err = e.client.DialAgent(cctx, ln.Addr().String(), e.vmID)
		require.ErrorIs(t, err, context.Canceled)
	})

	t.Run("a good dial after the errors", func(t *testing.T) {
		conn, err := e.client.DialAgent(ctx, e.addr, e.vmID)
		require.NoError(t, err)
		e.agent(t)
		conn.Close()
		dataplanetest.RequireNoTunnels(t)
	})
}

// TestAgentTunnelShutdown: shutting the server down closes the tunnels it
// hijacked, and refuses new ones.
func TestAgentTunnelShutdown(t *testing.T) {
	e := startTunnelEnv(t)
	conn, err := e.client.DialAgent(t.Context(), e.addr, e.vmID)
	require.NoError(t, err)
	defer conn.Close()
	agent := e.agent(t)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	require.NoError(t, e.srv.Shutdown(ctx))
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = conn.Read(make([]byte, 1))
	require.True(t, errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || isReset(err), "the client's end is closed: %v", err)
	_, err = agent.Read(make([]byte, 1))
	require.ErrorIs(t, err, io.EOF, "the agent's end is closed")
	dataplanetest.RequireNoTunnels(t)
	e.handler.CloseTunnels() // again: harmless
}

func isReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset")
}
