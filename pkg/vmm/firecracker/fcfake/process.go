package fcfake

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/test/bufconn"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
)

// Files the re-executed fake reads and writes beside its API socket (in the
// emulated chroot, with the jailer).
const (
	// BehaviorFile, when present, holds a Behavior as JSON.
	BehaviorFile = "fcfake.json"
	// RequestLogFile receives one Request per line.
	RequestLogFile = "fcfake-requests.jsonl"
	// EventLogFile receives one line per event: "ctrl-alt-del",
	// "agent-shutdown reboot=true", "vsock-reset" (a snapshot reset the
	// vsock device, closing its connections), "exit".
	EventLogFile = "fcfake-events.log"
	// VsockLogFile receives a line "connect" per accepted CONNECT to
	// the agent's port.
	VsockLogFile = "fcfake-vsock.log"
	// IdentityLogFile receives one IdentityRequest per line, for each
	// SetIdentity the fake guest's agent was sent.
	IdentityLogFile = "fcfake-identity.jsonl"
	// JailerArgsFile is written by JailerMain into the jail directory
	// (beside root/) with the arguments it was given, as JSON.
	JailerArgsFile = "fcfake-jailer.json"
	// RootEnv tells a fake started by JailerMain where its chroot is.
	RootEnv = "FCFAKE_ROOT"
)

// Behavior changes what the process fake does, for error-path tests.
type Behavior struct {
	// Fail answers "METHOD /path" with 400 and this fault_message.
	Fail map[string]string `json:"fail,omitempty"`
	// IgnoreShutdown keeps the VMM running after the agent's Shutdown, as a
	// guest that powered off without Firecracker noticing would.
	IgnoreShutdown bool `json:"ignore_shutdown,omitempty"`
	// IgnoreCtrlAltDel keeps it running after SendCtrlAltDel too, so only
	// SIGKILL ends it.
	IgnoreCtrlAltDel bool `json:"ignore_ctrl_alt_del,omitempty"`
}

// guestPort is what the hybrid vsock forwards; anything else is refused.
const guestPort = agent.DefaultVsockPort

// Main runs the fake as a firecracker process: firecracker --api-sock PATH
// --id ID [...]. It serves until the "guest" shuts down (the agent's
// Shutdown or SendCtrlAltDel) or a signal, and returns the exit code. The
// spec path comes from $FCFAKE_SPEC.
func Main(args []string) int {
	fs := flag.NewFlagSet("firecracker", flag.ContinueOnError)
	apiSock := fs.String("api-sock", "/run/firecracker.socket", "API socket path")
	id := fs.String("id", "anonymous-instance", "instance id")
	// Accepted as the jailer and firecracker's users pass them.
	fs.String("start-time-us", "", "")
	fs.String("start-time-cpu-us", "", "")
	fs.String("parent-cpu-time-us", "", "")
	fs.String("level", "", "")
	fs.String("log-path", "", "")
	fs.Bool("show-level", false, "")
	fs.Bool("no-seccomp", false, "")
	if err := fs.Parse(args); err != nil {
		return 1
	}
	root := os.Getenv(RootEnv)
	host := func(p string) string {
		if root != "" && filepath.IsAbs(p) {
			return filepath.Join(root, p)
		}
		return p
	}
	dir := host(filepath.Dir(*apiSock))
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("fcfake", *id)

	spec, err := LoadSpec(os.Getenv(SpecEnv))
	if err != nil {
		log.Error("cannot load the spec; set "+SpecEnv, "err", err)
		return 1
	}
	var beh Behavior
	if b, err := os.ReadFile(filepath.Join(dir, BehaviorFile)); err == nil {
		if err := json.Unmarshal(b, &beh); err != nil {
			log.Error("bad behavior file", "err", err)
			return 1
		}
	}
	reqLog, err := os.OpenFile(filepath.Join(dir, RequestLogFile), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		log.Error("cannot open the request log", "err", err)
		return 1
	}
	defer reqLog.Close()
	events := &eventLog{path: filepath.Join(dir, EventLogFile)}

	done := make(chan int, 1)
	exit := func(code int) {
		select {
		case done <- code:
		default:
		}
	}
	guest := &guest{log: log, conns: &eventLog{path: filepath.Join(dir, VsockLogFile)},
		identity: &eventLog{path: filepath.Join(dir, IdentityLogFile)}}
	srv, err := New(Options{
		Spec:       spec,
		ID:         *id,
		Root:       root,
		Fail:       beh.Fail,
		RequestLog: reqLog,
		OnStart: func(c VMConfig) error {
			return guest.start(c.VsockPath(), beh.IgnoreShutdown, events, exit)
		},
		OnPause: guest.setPaused,
		OnVsockReset: func() {
			events.add("vsock-reset")
			guest.resetVsock()
		},
		OnCtrlAltDel: func() {
			events.add("ctrl-alt-del")
			if !beh.IgnoreCtrlAltDel {
				// With reboot=k the guest resets through the i8042
				// controller and Firecracker exits.
				exit(0)
			}
		},
	})
	if err != nil {
		log.Error("cannot create the fake", "err", err)
		return 1
	}
	l, err := net.Listen("unix", host(*apiSock))
	if err != nil {
		log.Error("cannot bind the API socket", "err", err)
		return 1
	}
	hs := &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second}
	go hs.Serve(l)

	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT)
	var code int
	select {
	case code = <-done:
	case sig := <-sigc:
		code = 128 + int(sig.(syscall.Signal))
	}
	events.add("exit")
	hs.Close()
	guest.stop()
	return code
}

// guest stands in for the microVM: a hybrid vsock socket that forwards
// CONNECT 9999 to an fc-agent running in this process.
type guest struct {
	log *slog.Logger
	// conns logs accepted connections (VsockLogFile).
	conns  *eventLog
	paused atomic.Bool

	// identity logs the SetIdentity requests (IdentityLogFile).
	identity *eventLog

	mu    sync.Mutex
	vsock net.Listener
	agent *agent.Server
	grpc  *grpc.Server
	// open are the open forwarded connections, closed by a vsock reset.
	open map[net.Conn]struct{}
}

// resetVsock closes every open vsock connection, as the guest does on
// Firecracker's VIRTIO_VSOCK_EVENT_TRANSPORT_RESET; the listener stays.
func (g *guest) resetVsock() {
	g.mu.Lock()
	defer g.mu.Unlock()
	for c := range g.open {
		c.Close()
	}
	clear(g.open)
}

func (g *guest) track(c net.Conn, open bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.open == nil {
		g.open = map[net.Conn]struct{}{}
	}
	if open {
		g.open[c] = struct{}{}
	} else {
		delete(g.open, c)
	}
}

func (g *guest) setPaused(p bool) { g.paused.Store(p) }

func (g *guest) start(udsPath string, ignoreShutdown bool, events *eventLog, exit func(int)) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if udsPath == "" || g.vsock != nil {
		return nil
	}
	l, err := net.Listen("unix", udsPath)
	if err != nil {
		return err
	}
	inner := bufconn.Listen(1 << 20)
	srv := agent.NewServer(agent.ServerConfig{
		Logger: g.log,
		OnShutdown: func(reboot bool) {
			events.add("agent-shutdown reboot=" + strconv.FormatBool(reboot))
			if !ignoreShutdown {
				exit(0)
			}
		},
	})
	// The agent runs in this host process, not in a guest: its
	// SetIdentity would change the host's clock, hostname and
	// machine-id. The fake guest records the request instead.
	gs := grpc.NewServer()
	agentpb.RegisterAgentServer(gs, identityRecorder{Server: srv, log: g.identity})
	go gs.Serve(inner)
	g.vsock, g.agent, g.grpc = l, srv, gs
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go g.forward(c, inner)
		}
	}()
	return nil
}

// forward speaks the host side of Firecracker's hybrid vsock handshake
// (docs/vsock.md): "CONNECT <port>\n", answered "OK <host port>\n".
func (g *guest) forward(c net.Conn, inner *bufconn.Listener) {
	defer c.Close()
	g.track(c, true)
	defer g.track(c, false)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		return
	}
	port, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "CONNECT ")
	// A paused guest does not accept; neither does a port nobody listens on.
	if !ok || port != strconv.Itoa(guestPort) || g.paused.Load() {
		return
	}
	if g.conns != nil {
		g.conns.add("connect")
	}
	up, err := inner.DialContext(context.Background())
	if err != nil {
		return // the agent has shut down
	}
	defer up.Close()
	c.SetReadDeadline(time.Time{})
	if _, err := fmt.Fprintf(c, "OK %d\n", 1073741824); err != nil {
		return
	}
	go func() {
		io.Copy(up, br)
		up.Close()
	}()
	io.Copy(c, up)
}

func (g *guest) stop() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.vsock != nil {
		g.vsock.Close()
	}
	if g.agent != nil {
		g.agent.Stop()
		g.grpc.Stop()
	}
}

// IdentityRequest is what the fake guest records of a SetIdentity call.
type IdentityRequest struct {
	Hostname     string `json:"hostname,omitempty"`
	MachineID    string `json:"machine_id,omitempty"`
	EntropyBytes int    `json:"entropy_bytes,omitempty"`
	// UnixNano is the time the guest's clock would be stepped to.
	UnixNano int64 `json:"unix_nano,omitempty"`
	// MAC and Address are the network identity, if any.
	MAC     string `json:"mac,omitempty"`
	Address string `json:"address,omitempty"`
}

// identityRecorder is the agent with SetIdentity recorded, not applied:
// the fake's agent runs on the host, whose identity is not the guest's.
type identityRecorder struct {
	*agent.Server
	log *eventLog
}

// SetIdentity records req and answers as an agent that applied it.
func (r identityRecorder) SetIdentity(_ context.Context, req *agentpb.SetIdentityRequest) (*agentpb.SetIdentityResponse, error) {
	rec := IdentityRequest{Hostname: req.GetHostname(), MachineID: req.GetMachineId(), EntropyBytes: len(req.GetEntropy()),
		UnixNano: req.GetUnixNano(), MAC: req.GetNetwork().GetMac(), Address: req.GetNetwork().GetAddress()}
	b, _ := json.Marshal(rec)
	if r.log != nil {
		r.log.add(string(b))
	}
	return &agentpb.SetIdentityResponse{}, nil
}

type eventLog struct {
	mu   sync.Mutex
	path string
}

func (e *eventLog) add(ev string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	f, err := os.OpenFile(e.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return
	}
	fmt.Fprintln(f, ev)
	f.Close()
}

// JailerArgs is what JailerMain records about its invocation.
type JailerArgs struct {
	ID            string   `json:"id"`
	ExecFile      string   `json:"exec_file"`
	UID           int      `json:"uid"`
	GID           int      `json:"gid"`
	ChrootBaseDir string   `json:"chroot_base_dir"`
	CgroupVersion string   `json:"cgroup_version"`
	ParentCgroup  string   `json:"parent_cgroup,omitempty"`
	Cgroups       []string `json:"cgroups,omitempty"`
	NetNS         string   `json:"netns,omitempty"`
	Daemonize     bool     `json:"daemonize,omitempty"`
	Extra         []string `json:"extra,omitempty"`
}

var jailerIDRE = regexp.MustCompile(`^[A-Za-z0-9-]{1,64}$`)

// JailerMain runs the fake as the jailer: it checks its arguments as
// docs/jailer.md and the jailer's argument parsing (src/jailer/src/env.rs,
// cgroup.rs) check them, builds <chroot_base>/<exec_file_name>/<id>/root
// with a copy of the exec file, records its arguments, and execs that copy
// with --id and the arguments after "--". It does not chroot, switch
// users, join cgroups or the network namespace: the exec'd fake resolves
// paths under the jail root instead ($FCFAKE_ROOT).
func JailerMain(args []string) int {
	fs := flag.NewFlagSet("jailer", flag.ContinueOnError)
	var a JailerArgs
	fs.StringVar(&a.ID, "id", "", "")
	fs.StringVar(&a.ExecFile, "exec-file", "", "")
	uid := fs.String("uid", "", "")
	gid := fs.String("gid", "", "")
	fs.StringVar(&a.ChrootBaseDir, "chroot-base-dir", "/srv/jailer", "")
	fs.StringVar(&a.CgroupVersion, "cgroup-version", "1", "")
	fs.StringVar(&a.ParentCgroup, "parent-cgroup", "", "")
	fs.Func("cgroup", "", func(v string) error {
		a.Cgroups = append(a.Cgroups, v)
		return nil
	})
	fs.StringVar(&a.NetNS, "netns", "", "")
	fs.BoolVar(&a.Daemonize, "daemonize", false, "")
	if err := fs.Parse(args); err != nil {
		return 1
	}
	a.Extra = fs.Args()
	fail := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, "jailer: "+format+"\n", args...)
		return 1
	}
	var err error
	if !jailerIDRE.MatchString(a.ID) {
		return fail("invalid --id %q: alphanumerics and hyphens, at most 64", a.ID)
	}
	if a.UID, err = strconv.Atoi(*uid); err != nil || a.UID < 0 {
		return fail("invalid --uid %q", *uid)
	}
	if a.GID, err = strconv.Atoi(*gid); err != nil || a.GID < 0 {
		return fail("invalid --gid %q", *gid)
	}
	if a.CgroupVersion != "1" && a.CgroupVersion != "2" {
		return fail("invalid --cgroup-version %q", a.CgroupVersion)
	}
	if err := checkParentCgroup(a.ParentCgroup); err != nil {
		return fail("%v", err)
	}
	for _, cg := range a.Cgroups {
		if err := checkCgroupArg(cg); err != nil {
			return fail("%v", err)
		}
	}
	if !filepath.IsAbs(a.ExecFile) || !strings.Contains(filepath.Base(a.ExecFile), "firecracker") {
		return fail("--exec-file %q must be an absolute path whose name contains \"firecracker\"", a.ExecFile)
	}
	if fi, err := os.Stat(a.ExecFile); err != nil || !fi.Mode().IsRegular() {
		return fail("--exec-file %q: %v", a.ExecFile, err)
	}
	if a.NetNS != "" {
		if _, err := os.Stat(a.NetNS); err != nil {
			return fail("--netns %q: %v", a.NetNS, err)
		}
	}
	if !filepath.IsAbs(a.ChrootBaseDir) {
		return fail("--chroot-base-dir %q must be absolute", a.ChrootBaseDir)
	}
	if len(a.Extra) > 0 && a.Extra[0] == "--" {
		a.Extra = a.Extra[1:]
	}
	name := filepath.Base(a.ExecFile)
	jail := filepath.Join(a.ChrootBaseDir, name, a.ID)
	root := filepath.Join(jail, "root")
	if err := os.MkdirAll(root, 0o755); err != nil {
		return fail("%v", err)
	}
	b, _ := json.MarshalIndent(a, "", "  ")
	if err := os.WriteFile(filepath.Join(jail, JailerArgsFile), b, 0o600); err != nil {
		return fail("%v", err)
	}
	exe := filepath.Join(root, name)
	os.Remove(exe)
	if err := os.Link(a.ExecFile, exe); err != nil {
		if err := copyFile(a.ExecFile, exe); err != nil {
			return fail("copying the exec file: %v", err)
		}
	}
	if err := os.Chown(root, a.UID, a.GID); err != nil {
		return fail("%v", err)
	}
	if err := os.Chdir(root); err != nil {
		return fail("%v", err)
	}
	// The jailer clears the environment; the fake needs only these.
	env := []string{SpecEnv + "=" + os.Getenv(SpecEnv), RootEnv + "=" + root}
	argv := append([]string{exe, "--id=" + a.ID, "--start-time-us=0", "--start-time-cpu-us=0"}, a.Extra...)
	err = syscall.Exec(exe, argv, env)
	return fail("exec %s: %v", exe, err)
}

// checkParentCgroup refuses what the jailer refuses in --parent-cgroup:
// an absolute path or one with . or .. components.
func checkParentCgroup(p string) error {
	if p == "" {
		return nil
	}
	if strings.HasPrefix(p, "/") {
		return fmt.Errorf("invalid --parent-cgroup %q: must be a relative path", p)
	}
	for _, c := range strings.Split(p, "/") {
		if c == "." || c == ".." {
			return fmt.Errorf("invalid --parent-cgroup %q: no . or .. components", p)
		}
	}
	return nil
}

// checkCgroupArg refuses a --cgroup value the jailer refuses: it must be
// <controller>.<property>=<value>, with exactly one "=", a non-empty
// value and a file name of two non-empty parts.
func checkCgroupArg(cg string) error {
	parts := strings.Split(cg, "=")
	if len(parts) != 2 || parts[1] == "" {
		return fmt.Errorf("invalid --cgroup %q: the format is <cgroup_file>=<value>", cg)
	}
	file := strings.Split(parts[0], ".")
	if len(file) != 2 || file[0] == "" || file[1] == "" {
		return fmt.Errorf("invalid --cgroup %q: the file must be <controller>.<property>", cg)
	}
	return nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
