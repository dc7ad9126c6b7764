package service_test

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/dataplane"
	"github.com/aetherium/aetherium-core/pkg/dataplane/dataplanetest"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// createVM creates a running VM through the stack's service.
func createVM(t testing.TB, s *stack.Stack, name string) *types.VM {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	id, err := s.Service.CreateVMTask(ctx, name, 1, 128)
	require.NoError(t, err)
	task, err := s.Service.WaitTask(ctx, id)
	require.NoError(t, err)
	require.Equal(t, types.TaskSucceeded, task.State, task.Error)
	var res struct {
		VMID string `json:"vm_id"`
	}
	require.NoError(t, json.Unmarshal(task.Result, &res))
	vm, err := s.Service.GetVM(ctx, uuid.MustParse(res.VMID))
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, vm.State)
	return vm
}

// agentClient is an agent client whose every connection goes through d,
// closed at the end of t.
func agentClient(t testing.TB, d agent.Dialer) *agent.Client {
	t.Helper()
	c, err := agent.NewClient(d)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// TestDialAgent drives a VM's guest agent from the service's side, through
// the owning worker's data plane, with an ordinary agent client.
func TestDialAgent(t *testing.T) {
	s := stack.Start(t, stack.Options{Workers: []string{"w1", "w2"}})
	vm := createVM(t, s, "tunnel")
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	var dialer service.AgentDialer = s.Service

	c, err := agent.NewClient(func(ctx context.Context) (net.Conn, error) { return dialer.DialAgent(ctx, vm.ID) })
	require.NoError(t, err)

	info, err := c.Info(ctx)
	require.NoError(t, err)
	require.NotEmpty(t, info.GetVersion())
	require.True(t, info.GetPid1(), "the docker backend runs the agent as the container's init")

	res, err := c.Exec(ctx, types.Command{Cmd: "echo", Args: []string{"hi"}}, nil, nil)
	require.NoError(t, err)
	require.Equal(t, 0, res.ExitCode, string(res.Stderr))
	require.Equal(t, "hi\n", string(res.Stdout))

	// The process table: start, find, signal, see the end.
	st, err := c.StartProcess(ctx, agent.ProcessSpec{Cmd: "sleep", Args: []string{"60"}, Tag: "sleeper"})
	require.NoError(t, err)
	defer st.Close()
	ev, err := st.Recv()
	require.NoError(t, err)
	require.NotZero(t, ev.PID, "the first event is the start")
	procs, err := c.ListProcesses(ctx)
	require.NoError(t, err)
	i := slices.IndexFunc(procs, func(p agent.ProcessInfo) bool { return p.PID == ev.PID })
	require.GreaterOrEqual(t, i, 0, "the started process is listed: %+v", procs)
	require.Equal(t, "sleeper", procs[i].Tag)
	require.Equal(t, []string{"60"}, procs[i].Args)
	require.NoError(t, c.SignalProcess(ctx, agent.ProcessSelector{Tag: "sleeper"}, syscall.SIGTERM))
	for ev.End == nil {
		ev, err = st.Recv()
		require.NoError(t, err)
	}
	require.Equal(t, "signal: terminated", ev.End.Status)
	_, err = st.Recv()
	require.ErrorIs(t, err, io.EOF)

	// Closing the client leaves nothing behind on the worker.
	require.Positive(t, dataplane.OpenTunnels())
	require.NoError(t, c.Close())
	dataplanetest.RequireNoTunnels(t)
}

func TestDialAgentErrors(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	vm := createVM(t, s, "tunnel-errs")
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()

	t.Run("another tenant's vm", func(t *testing.T) {
		other := service.WithScope(ctx, service.Scope{Tenant: "someone-else"})
		_, err := s.Service.DialAgent(other, vm.ID)
		require.ErrorIs(t, err, types.ErrNotFound)
		require.ErrorContains(t, err, "does not exist", "another tenant's vm reads like a missing one")
		_, err = s.Service.DialAgent(ctx, uuid.NewString())
		require.ErrorIs(t, err, types.ErrNotFound)
		conn, err := s.Service.DialAgent(service.WithScope(ctx, service.Scope{Tenant: vm.Tenant}), vm.ID)
		require.NoError(t, err, "its own tenant reaches it")
		require.NoError(t, conn.Close())
	})
	t.Run("not a uuid", func(t *testing.T) {
		_, err := s.Service.DialAgent(ctx, "vm-1")
		require.ErrorIs(t, err, types.ErrInvalid)
	})
	t.Run("wrong token", func(t *testing.T) {
		const wrong = "not-the-cluster-token"
		svc := service.NewTaskService(s.Queue, s.Store, service.WithDataPlane(dataplane.NewClient(wrong)))
		_, err := svc.DialAgent(ctx, vm.ID)
		require.ErrorIs(t, err, types.ErrUnavailable)
		require.ErrorContains(t, err, "cluster token")
		require.NotContains(t, err.Error(), wrong)
	})
	t.Run("no data plane", func(t *testing.T) {
		svc := service.NewTaskService(s.Queue, s.Store)
		_, err := svc.DialAgent(ctx, vm.ID)
		require.ErrorIs(t, err, types.ErrNotSupported)
	})
	t.Run("stopped behind the store's back", func(t *testing.T) {
		// The store still says running: the worker's backend answers.
		v := createVM(t, s, "tunnel-stopped")
		require.NoError(t, s.VMMs[v.Owner].StopVM(ctx, v.ID, true))
		_, err := s.Service.DialAgent(ctx, v.ID)
		require.ErrorIs(t, err, types.ErrConflict)
		require.ErrorContains(t, err, "start it")
	})
	t.Run("stopped", func(t *testing.T) {
		id, err := s.Service.StopVMTask(ctx, vm.ID)
		require.NoError(t, err)
		task, err := s.Service.WaitTask(ctx, id)
		require.NoError(t, err)
		require.Equal(t, types.TaskSucceeded, task.State, task.Error)
		_, err = s.Service.DialAgent(ctx, vm.ID)
		require.ErrorIs(t, err, types.ErrConflict)
		require.ErrorContains(t, err, "vm start")
	})
	dataplanetest.RequireNoTunnels(t)
}

// BenchmarkAgentInfo measures an Info RPC straight to the agent's socket
// (as the worker reaches it) and through the service's tunnel (API host ->
// worker's data plane -> agent), so the difference is what the tunnel
// adds: on a warm connection (info/) and with a new one each time
// (connect+info/).
func BenchmarkAgentInfo(b *testing.B) {
	s := stack.Start(b, stack.Options{})
	vm := createVM(b, s, "bench-tunnel")
	for _, bc := range []struct {
		name string
		dial agent.Dialer
	}{
		{"direct", func(ctx context.Context) (net.Conn, error) { return s.VMMs[vm.Owner].DialAgent(ctx, vm.ID) }},
		{"tunnel", func(ctx context.Context) (net.Conn, error) { return s.Service.DialAgent(ctx, vm.ID) }},
	} {
		// A new connection each time: the cost of a plane that dials per
		// request (TCP, the upgrade, the worker's dial, gRPC's handshake).
		b.Run("connect+info/"+bc.name, func(b *testing.B) {
			testenv.Measure(b, func() {
				c, err := agent.NewClient(bc.dial)
				if err == nil {
					_, err = c.Info(b.Context())
					c.Close()
				}
				if err != nil {
					b.Fatal(err)
				}
			})
		})
		b.Run("info/"+bc.name, func(b *testing.B) {
			c := agentClient(b, bc.dial)
			_, err := c.Info(b.Context()) // connects
			require.NoError(b, err)
			testenv.Measure(b, func() {
				if _, err := c.Info(b.Context()); err != nil {
					b.Fatal(err)
				}
			})
		})
	}
}
