package agent

import (
	"bytes"
	"errors"
	"io"
	"maps"
	"os"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
)

// endedRetention is how long an ended process stays in the table, so that
// a client that reconnects a moment late still learns how it ended.
const endedRetention = 60 * time.Second

// Fan-out to the streams following a process. Each subscriber has a
// buffer of subscriberBuffer output chunks (each at most chunkSize, so
// about 2 MiB). When a buffer is full, the output pump waits for room, so
// that a reader that is merely slower than the process loses nothing (the
// process is slowed down, as by a terminal); but it waits at most
// subscriberStall for a chunk's subscribers together. A subscriber that
// took nothing for that long is cut off (its stream ends with
// ResourceExhausted, and it may connect again to follow new output), so a
// stuck or gone reader holds the process and the other readers up once,
// for at most subscriberStall, and never again.
const (
	subscriberBuffer = 64
	subscriberStall  = 2 * time.Second
)

// procTable holds the processes started by StartProcess, by pid and by
// tag, while they run and for endedRetention after.
type procTable struct {
	mu    sync.Mutex
	byPID map[uint32]*tableProc
	byTag map[string]*tableProc
}

func newProcTable() *procTable {
	return &procTable{byPID: make(map[uint32]*tableProc), byTag: make(map[string]*tableProc)}
}

// errTagInUse is returned by add when a running process has the tag.
var errTagInUse = errors.New("tag in use")

// tagFree reports whether no running process holds tag. It is checked
// before the start, to fail early, and again by add, which settles a race
// between two starts.
func (t *procTable) tagFree(tag string) bool {
	if tag == "" {
		return true
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	old, ok := t.byTag[tag]
	return !ok || old.ended()
}

// add enters a started process. An ended entry with the same pid or tag
// is replaced: the pid was reused, or the tag given to a new process.
func (t *procTable) add(p *tableProc) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if p.tag != "" {
		if old, ok := t.byTag[p.tag]; ok && !old.ended() {
			return errTagInUse
		}
		t.byTag[p.tag] = p
	}
	t.byPID[p.pid] = p
	return nil
}

// forget removes p after its retention, unless newer entries replaced it.
func (t *procTable) forget(p *tableProc) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.byPID[p.pid] == p {
		delete(t.byPID, p.pid)
	}
	if p.tag != "" && t.byTag[p.tag] == p {
		delete(t.byTag, p.tag)
	}
}

// find returns the process a selector names, or nil.
func (t *procTable) find(sel *agentpb.ProcessSelector) *tableProc {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch s := sel.GetSelector().(type) {
	case *agentpb.ProcessSelector_Pid:
		return t.byPID[s.Pid]
	case *agentpb.ProcessSelector_Tag:
		return t.byTag[s.Tag]
	}
	return nil
}

// running lists the processes that have not ended, by pid.
func (t *procTable) running() []*tableProc {
	t.mu.Lock()
	defer t.mu.Unlock()
	var ps []*tableProc
	for _, p := range t.byPID {
		if !p.ended() {
			ps = append(ps, p)
		}
	}
	slices.SortFunc(ps, func(a, b *tableProc) int { return int(a.pid) - int(b.pid) })
	return ps
}

// tableProc is one process of the table. Its output goes to every
// subscriber at the time it is read, and nowhere when there is none.
type tableProc struct {
	pid  uint32
	tag  string
	cmd  string
	args []string
	env  map[string]string // as requested
	cwd  string            // as resolved

	stdin     *os.File // write end; nil when the process reads /dev/null
	stdinOnce sync.Once
	stdinMu   sync.Mutex // guards stdinDone
	stdinDone bool       // CloseStdin was called or the process ended

	mu   sync.Mutex
	subs map[*subscriber]struct{}
	end  *agentpb.ProcessEnd // set, under mu, just before done is closed
	done chan struct{}
}

func (p *tableProc) ended() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *tableProc) info() *agentpb.ProcessInfo {
	return &agentpb.ProcessInfo{
		Pid:  p.pid,
		Tag:  p.tag,
		Cmd:  p.cmd,
		Args: slices.Clone(p.args),
		Env:  maps.Clone(p.env),
		Cwd:  p.cwd,
	}
}

// subscriber is one stream following a process's output.
type subscriber struct {
	events chan *agentpb.ProcessEvent
	// lagged is closed when the subscriber was cut off for falling behind.
	lagged chan struct{}
	// gone is closed when the stream stopped following.
	gone chan struct{}
}

// subscribe adds a subscriber for the output produced from now on. It
// returns nil when the process has ended already; then p.end is set.
func (p *tableProc) subscribe() *subscriber {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.end != nil {
		return nil
	}
	sub := &subscriber{
		events: make(chan *agentpb.ProcessEvent, subscriberBuffer),
		lagged: make(chan struct{}),
		gone:   make(chan struct{}),
	}
	p.subs[sub] = struct{}{}
	return sub
}

// unsubscribe is called once, when the stream stops following.
func (p *tableProc) unsubscribe(sub *subscriber) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.subs, sub)
	close(sub.gone)
}

// cutOff drops a subscriber that fell behind.
func (p *tableProc) cutOff(sub *subscriber) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.subs[sub]; ok {
		delete(p.subs, sub)
		close(sub.lagged)
	}
}

// broadcast hands ev to every subscriber, waiting for full ones at most
// subscriberStall in all (see subscriberBuffer).
func (p *tableProc) broadcast(ev *agentpb.ProcessEvent) {
	p.mu.Lock()
	subs := slices.Collect(maps.Keys(p.subs))
	p.mu.Unlock()
	var (
		stall   *time.Timer
		expired bool
	)
	for _, sub := range subs {
		select {
		case sub.events <- ev:
			continue
		case <-sub.gone:
			continue
		default:
		}
		if expired {
			p.cutOff(sub)
			continue
		}
		if stall == nil {
			stall = time.NewTimer(subscriberStall)
			defer stall.Stop()
		}
		select {
		case sub.events <- ev:
		case <-sub.gone:
		case <-stall.C:
			expired = true
			p.cutOff(sub)
		}
	}
}

// finish records how the process ended and releases the subscribers, who
// send the end once they have sent the output before it.
func (p *tableProc) finish(end *agentpb.ProcessEnd) {
	p.mu.Lock()
	p.end = end
	p.subs = nil
	p.mu.Unlock()
	close(p.done)
	p.closeStdin()
}

// endEvent is only valid after done is closed.
func (p *tableProc) endEvent() *agentpb.ProcessEvent {
	p.mu.Lock()
	defer p.mu.Unlock()
	return &agentpb.ProcessEvent{Event: &agentpb.ProcessEvent_End{End: p.end}}
}

func (p *tableProc) closeStdin() {
	p.stdinMu.Lock()
	p.stdinDone = true
	p.stdinMu.Unlock()
	if p.stdin != nil {
		p.stdinOnce.Do(func() { p.stdin.Close() })
	}
}

// pump broadcasts what the process writes to r, each read as soon as it
// arrives, until r ends.
func (p *tableProc) pump(r io.Reader, stderr bool) {
	buf := make([]byte, chunkSize)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			// A fresh slice: the event is shared by the subscribers and
			// gRPC may hold it after Send.
			data := &agentpb.ProcessData{Output: &agentpb.ProcessData_Stdout{Stdout: bytes.Clone(buf[:n])}}
			if stderr {
				data.Output = &agentpb.ProcessData_Stderr{Stderr: bytes.Clone(buf[:n])}
			}
			p.broadcast(&agentpb.ProcessEvent{Event: &agentpb.ProcessEvent_Data{Data: data}})
		}
		if err != nil {
			return
		}
	}
}

// processEnd describes a wait status as Go's os.ProcessState does, so the
// host sees what cmd.Wait would have given: ExitCode, String, and the
// *exec.ExitError text for an unsuccessful end.
func processEnd(res waitResult) *agentpb.ProcessEnd {
	if res.err != nil {
		return &agentpb.ProcessEnd{ExitCode: -1, Status: "unknown", Error: "collecting the exit status: " + res.err.Error()}
	}
	ws := res.status
	end := &agentpb.ProcessEnd{ExitCode: -1, Exited: ws.Exited()}
	switch {
	case ws.Exited():
		end.ExitCode = int32(ws.ExitStatus())
		end.Status = "exit status " + strconv.Itoa(ws.ExitStatus())
	case ws.Signaled():
		end.Status = "signal: " + ws.Signal().String()
	case ws.Stopped():
		end.Status = "stop signal: " + ws.StopSignal().String()
	case ws.Continued():
		end.Status = "continued"
	}
	if ws.CoreDump() {
		end.Status += " (core dumped)"
	}
	if !ws.Exited() || ws.ExitStatus() != 0 {
		end.Error = end.Status
	}
	return end
}

// signalValid reports whether sig is a signal number kill(2) accepts.
func signalValid(sig syscall.Signal) bool { return sig > 0 && sig <= 64 }
