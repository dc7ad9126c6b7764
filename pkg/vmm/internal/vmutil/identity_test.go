package vmutil

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// identityAgent records the SetIdentity requests it gets instead of
// changing the machine the tests run on (a real agent would set this
// host's clock and hostname). protocol below 6 answers Unimplemented.
type identityAgent struct {
	agentpb.UnimplementedAgentServer
	protocol uint32

	mu   sync.Mutex
	reqs []*agentpb.SetIdentityRequest
}

func (a *identityAgent) Info(context.Context, *agentpb.InfoRequest) (*agentpb.InfoResponse, error) {
	return &agentpb.InfoResponse{Version: "test", Protocol: a.protocol}, nil
}

func (a *identityAgent) SetIdentity(_ context.Context, req *agentpb.SetIdentityRequest) (*agentpb.SetIdentityResponse, error) {
	if a.protocol < 6 {
		return nil, status.Error(codes.Unimplemented, "unknown method SetIdentity")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.reqs = append(a.reqs, req)
	return &agentpb.SetIdentityResponse{}, nil
}

func (a *identityAgent) taken() []*agentpb.SetIdentityRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.reqs
}

func serveIdentityAgent(t *testing.T, a *identityAgent) *agent.Client {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := agent.Listen("unix://" + sock)
	require.NoError(t, err)
	gs := grpc.NewServer()
	agentpb.RegisterAgentServer(gs, a)
	go gs.Serve(l)
	c, err := agent.NewClient(agent.UnixDialer(sock))
	require.NoError(t, err)
	t.Cleanup(func() {
		c.Close()
		gs.Stop()
	})
	return c
}

func TestReidentify(t *testing.T) {
	a := &identityAgent{protocol: 6}
	c := serveIdentityAgent(t, a)
	spec := types.VMSpec{Name: "Build VM_7"}
	nid := &agent.NetIdentity{
		MAC:     net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 7},
		Addr:    netip.MustParsePrefix("10.88.0.7/16"),
		Gateway: netip.MustParseAddr("10.88.0.1"),
		DNS:     []netip.Addr{netip.MustParseAddr("192.0.2.53")},
	}
	before := time.Now()
	require.NoError(t, Reidentify(t.Context(), c, spec, nid))
	require.NoError(t, Reidentify(t.Context(), c, spec, nil))
	after := time.Now()

	reqs := a.taken()
	require.Len(t, reqs, 2)
	first, second := reqs[0], reqs[1]
	// The hostname a cold boot gets (aetherium.hostname=).
	require.Equal(t, bootparams.HostnameArg(spec.Name), bootparams.Arg(bootparams.Hostname, first.GetHostname()))
	require.Equal(t, "build-vm-7", first.GetHostname())
	require.NoError(t, agent.ValidMachineID(first.GetMachineId()))
	require.Len(t, first.GetEntropy(), CloneEntropyBytes)
	require.NotEqual(t, make([]byte, CloneEntropyBytes), first.GetEntropy())
	require.WithinRange(t, time.Unix(0, first.GetUnixNano()), before, after)
	require.Equal(t, "02:aa:00:00:00:07", first.GetNetwork().GetMac())
	require.Equal(t, "10.88.0.7/16", first.GetNetwork().GetAddress())
	require.Equal(t, "10.88.0.1", first.GetNetwork().GetGateway())
	require.Equal(t, []string{"192.0.2.53"}, first.GetNetwork().GetDns())

	// Every call is a new identity: clones of one snapshot differ.
	require.Nil(t, second.GetNetwork())
	require.Equal(t, first.GetHostname(), second.GetHostname())
	require.NotEqual(t, first.GetMachineId(), second.GetMachineId())
	require.False(t, bytes.Equal(first.GetEntropy(), second.GetEntropy()))
}

func TestSyncClockSendsOnlyTheTime(t *testing.T) {
	a := &identityAgent{protocol: 6}
	c := serveIdentityAgent(t, a)
	before := time.Now()
	require.NoError(t, SyncClock(t.Context(), c))
	reqs := a.taken()
	require.Len(t, reqs, 1)
	require.WithinRange(t, time.Unix(0, reqs[0].GetUnixNano()), before, time.Now())
	reqs[0].UnixNano = 0
	require.Empty(t, reqs[0].String(), "nothing but the time is sent")
}

func TestReidentifyOldAgent(t *testing.T) {
	c := serveIdentityAgent(t, &identityAgent{protocol: 5})
	err := Reidentify(t.Context(), c, types.VMSpec{Name: "a"}, nil)
	require.ErrorIs(t, err, types.ErrNotSupported)
	require.ErrorContains(t, err, `clone "a"`)
	require.ErrorIs(t, SyncClock(t.Context(), c), types.ErrNotSupported)
}
