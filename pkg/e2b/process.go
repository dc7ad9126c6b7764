package e2b

import (
	"context"
	"errors"
	"io"
	"maps"
	"net/http"
	"strconv"
	"syscall"
	"time"

	"connectrpc.com/connect"

	"github.com/aetherium/aetherium-core/pkg/agent"
	pb "github.com/aetherium/aetherium-core/pkg/e2b/gen/process"
	"github.com/aetherium/aetherium-core/pkg/e2b/gen/process/processconnect"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// processService is envd's process.Process over the guest agent's process
// table: processes outlive the request that started them, a client that
// goes away only stops following, and Connect-Timeout-Ms kills.
type processService struct {
	s *Server
}

var _ processconnect.ProcessHandler = (*processService)(nil)

// keepaliveOf reads Keepalive-Ping-Interval (seconds); 0: none.
func keepaliveOf(h http.Header) time.Duration {
	n, err := strconv.Atoi(h.Get("Keepalive-Ping-Interval"))
	if err != nil || n <= 0 {
		return 0
	}
	return time.Duration(n) * time.Second
}

func (p *processService) Start(ctx context.Context, req *connect.Request[pb.StartRequest], stream *connect.ServerStream[pb.StartResponse]) error {
	sb := sandboxFrom(ctx)
	if req.Msg.Pty != nil {
		return rpcUnimplemented("a PTY (terminal) session")
	}
	user, err := rpcUser(req.Header())
	if err != nil {
		return err
	}
	cfg := req.Msg.GetProcess()
	if cfg.GetCmd() == "" {
		return connect.NewError(connect.CodeInvalidArgument, errors.New("process.cmd is empty; give the program to run"))
	}
	env := maps.Clone(sb.vm.Env)
	if env == nil {
		env = map[string]string{}
	}
	maps.Copy(env, cfg.GetEnvs())
	spec := agent.ProcessSpec{
		Cmd: cfg.GetCmd(), Args: cfg.GetArgs(), Env: env, Cwd: cfg.GetCwd(), User: user, Tag: req.Msg.GetTag(),
		Stdin: req.Msg.GetStdin(), KeepaliveInterval: keepaliveOf(req.Header()),
	}
	// Connect-Timeout-Ms became ctx's deadline: envd kills the process
	// then, whether or not anyone still follows it.
	if dl, ok := ctx.Deadline(); ok {
		spec.Timeout = max(time.Until(dl), time.Millisecond)
	}
	ctx, cancel := p.s.streamCtx(ctx)
	defer cancel()
	if spec.Cmd == bash {
		if spec.Cmd, err = p.s.shell(ctx, sb); err != nil {
			return p.s.rpcError(err)
		}
	}
	ps, err := sb.client.StartProcess(ctx, spec)
	if err != nil {
		return p.s.rpcError(err)
	}
	return p.s.follow(ctx, ps, func(ev *pb.ProcessEvent) error { return stream.Send(&pb.StartResponse{Event: ev}) })
}

// bash is the program the SDKs run every command with ("/bin/bash -l -c
// CMD"); guests without bash (the busybox images) run /bin/sh instead,
// whose -l and -c mean the same.
const bash = "/bin/bash"

// shell returns bash, or /bin/sh when the sandbox has no bash. The answer
// is kept with the sandbox's cached client, so only the first command on a
// connection pays for the check.
func (s *Server) shell(ctx context.Context, sb *sandbox) (string, error) {
	if sh := s.clients.shell(sb.id); sh != "" {
		return sh, nil
	}
	sh := bash
	if _, err := sb.client.Stat(ctx, bash, ""); errors.Is(err, types.ErrNotFound) {
		sh = "/bin/sh"
	} else if err != nil {
		return "", err
	}
	s.clients.setShell(sb.id, sh)
	return sh, nil
}

func (p *processService) Connect(ctx context.Context, req *connect.Request[pb.ConnectRequest], stream *connect.ServerStream[pb.ConnectResponse]) error {
	sel, err := selector(req.Msg.GetProcess())
	if err != nil {
		return err
	}
	ctx, cancel := p.s.streamCtx(ctx)
	defer cancel()
	ps, err := sandboxFrom(ctx).client.ConnectProcess(ctx, sel, keepaliveOf(req.Header()))
	if err != nil {
		return p.s.rpcError(err)
	}
	return p.s.follow(ctx, ps, func(ev *pb.ProcessEvent) error { return stream.Send(&pb.ConnectResponse{Event: ev}) })
}

// follow sends a process's events, start first and end last, until the
// end, the client leaving or ctx's deadline.
func (s *Server) follow(ctx context.Context, ps agent.ProcessStream, send func(*pb.ProcessEvent) error) error {
	defer ps.Close()
	for {
		ev, err := ps.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			switch {
			case s.closed():
				return connect.NewError(connect.CodeUnavailable, errors.New("aether-api is shutting down; the process keeps running: reconnect with commands.connect(pid)"))
			case ctx.Err() != nil:
				return s.rpcError(ctx.Err())
			}
			return s.rpcError(err)
		}
		var out pb.ProcessEvent
		switch {
		case ev.End != nil:
			end := &pb.ProcessEvent_EndEvent{ExitCode: ev.End.ExitCode, Exited: ev.End.Exited, Status: ev.End.Status}
			if ev.End.Error != "" {
				end.Error = &ev.End.Error
			}
			out.Event = &pb.ProcessEvent_End{End: end}
		case ev.Stdout != nil:
			out.Event = &pb.ProcessEvent_Data{Data: &pb.ProcessEvent_DataEvent{Output: &pb.ProcessEvent_DataEvent_Stdout{Stdout: ev.Stdout}}}
		case ev.Stderr != nil:
			out.Event = &pb.ProcessEvent_Data{Data: &pb.ProcessEvent_DataEvent{Output: &pb.ProcessEvent_DataEvent_Stderr{Stderr: ev.Stderr}}}
		case ev.Keepalive:
			out.Event = &pb.ProcessEvent_Keepalive{Keepalive: &pb.ProcessEvent_KeepAlive{}}
		default:
			out.Event = &pb.ProcessEvent_Start{Start: &pb.ProcessEvent_StartEvent{Pid: ev.PID}}
		}
		if err := send(&out); err != nil {
			return err // the client went away; the process runs on
		}
		if ev.End != nil {
			return nil
		}
	}
}

func selector(sel *pb.ProcessSelector) (agent.ProcessSelector, error) {
	switch v := sel.GetSelector().(type) {
	case *pb.ProcessSelector_Pid:
		return agent.ProcessSelector{PID: v.Pid}, nil
	case *pb.ProcessSelector_Tag:
		return agent.ProcessSelector{Tag: v.Tag}, nil
	}
	return agent.ProcessSelector{}, connect.NewError(connect.CodeInvalidArgument, errors.New("process selector is empty; give a pid or a tag"))
}

func (p *processService) List(ctx context.Context, _ *connect.Request[pb.ListRequest]) (*connect.Response[pb.ListResponse], error) {
	ps, err := sandboxFrom(ctx).client.ListProcesses(ctx)
	if err != nil {
		return nil, p.s.rpcError(err)
	}
	out := &pb.ListResponse{Processes: []*pb.ProcessInfo{}}
	for _, pi := range ps {
		// The SDKs read config of every entry: it is always set.
		info := &pb.ProcessInfo{Pid: pi.PID, Config: &pb.ProcessConfig{Cmd: pi.Cmd, Args: pi.Args, Envs: pi.Env}}
		if pi.Cwd != "" {
			info.Config.Cwd = &pi.Cwd
		}
		if pi.Tag != "" {
			info.Tag = &pi.Tag
		}
		out.Processes = append(out.Processes, info)
	}
	return connect.NewResponse(out), nil
}

func (p *processService) SendInput(ctx context.Context, req *connect.Request[pb.SendInputRequest]) (*connect.Response[pb.SendInputResponse], error) {
	sel, err := selector(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if err := p.writeInput(ctx, sel, req.Msg.GetInput()); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.SendInputResponse{}), nil
}

func (p *processService) writeInput(ctx context.Context, sel agent.ProcessSelector, in *pb.ProcessInput) error {
	if _, ok := in.GetInput().(*pb.ProcessInput_Pty); ok {
		return rpcUnimplemented("input to a PTY (terminal) session")
	}
	if err := sandboxFrom(ctx).client.WriteStdin(ctx, sel, in.GetStdin()); err != nil {
		return p.s.rpcError(err)
	}
	return nil
}

func (p *processService) StreamInput(ctx context.Context, stream *connect.ClientStream[pb.StreamInputRequest]) (*connect.Response[pb.StreamInputResponse], error) {
	var sel *agent.ProcessSelector
	for stream.Receive() {
		switch ev := stream.Msg().GetEvent().(type) {
		case *pb.StreamInputRequest_Start:
			s, err := selector(ev.Start.GetProcess())
			if err != nil {
				return nil, err
			}
			sel = &s
		case *pb.StreamInputRequest_Data:
			if sel == nil {
				return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("the first StreamInput event must be start, naming the process"))
			}
			if err := p.writeInput(ctx, *sel, ev.Data.GetInput()); err != nil {
				return nil, err
			}
		}
	}
	if err := stream.Err(); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.StreamInputResponse{}), nil
}

func (p *processService) CloseStdin(ctx context.Context, req *connect.Request[pb.CloseStdinRequest]) (*connect.Response[pb.CloseStdinResponse], error) {
	sel, err := selector(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if err := sandboxFrom(ctx).client.CloseStdin(ctx, sel); err != nil {
		return nil, p.s.rpcError(err)
	}
	return connect.NewResponse(&pb.CloseStdinResponse{}), nil
}

func (p *processService) SendSignal(ctx context.Context, req *connect.Request[pb.SendSignalRequest]) (*connect.Response[pb.SendSignalResponse], error) {
	sel, err := selector(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	var sig syscall.Signal
	switch req.Msg.GetSignal() {
	case pb.Signal_SIGNAL_SIGKILL:
		sig = syscall.SIGKILL
	case pb.Signal_SIGNAL_SIGTERM:
		sig = syscall.SIGTERM
	default:
		return nil, connect.NewError(connect.CodeUnimplemented, errors.New("only SIGNAL_SIGKILL and SIGNAL_SIGTERM can be sent"))
	}
	if err := sandboxFrom(ctx).client.SignalProcess(ctx, sel, sig); err != nil {
		return nil, p.s.rpcError(err)
	}
	return connect.NewResponse(&pb.SendSignalResponse{}), nil
}

func (p *processService) Update(context.Context, *connect.Request[pb.UpdateRequest]) (*connect.Response[pb.UpdateResponse], error) {
	return nil, rpcUnimplemented("resizing a PTY (terminal) session")
}
