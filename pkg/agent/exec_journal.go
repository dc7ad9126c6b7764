package agent

import (
	"slices"
	"sync"
	"time"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
)

// ExecRetention is how long the agent keeps an ended execution that was
// started with an execution id, so that a caller that lost its connection
// (a worker that crashed and was replaced) can still reattach and collect
// the output and exit. A reattach after that, or after the guest rebooted,
// finds no record.
const ExecRetention = 15 * time.Minute

// Bounds of the journal beyond ExecRetention, so that the agent's memory
// stays bounded however many commands run: at most DefaultMaxEndedExecs
// ended executions, holding at most DefaultMaxEndedExecBytes of output
// together; past either, the oldest ended ones are forgotten first.
// Running executions are never forgotten; each holds at most its output
// cap per stream.
const (
	DefaultMaxEndedExecs     = 256
	DefaultMaxEndedExecBytes = 64 << 20
)

// execJournal holds the executions started with an id, while they run and
// for a retention period after they end.
type execJournal struct {
	retention time.Duration
	maxEnded  int
	maxBytes  int64

	mu    sync.Mutex
	byID  map[string]*execRecord
	ended []*execRecord // oldest end first
}

func newExecJournal(maxEnded int, maxBytes int64) *execJournal {
	return &execJournal{
		retention: ExecRetention,
		maxEnded:  maxEnded,
		maxBytes:  maxBytes,
		byID:      make(map[string]*execRecord),
	}
}

// claim returns the record of id and false when the journal holds one;
// otherwise it enters rec under id and returns it and true: the caller
// then starts the command and must call started or abandon. Two calls
// with one id cannot both get true.
func (j *execJournal) claim(id string, rec *execRecord) (*execRecord, bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.pruneLocked(time.Now())
	if old, ok := j.byID[id]; ok {
		return old, false
	}
	rec.id = id
	j.byID[id] = rec
	return rec, true
}

// lookup returns the record of id, or nil.
func (j *execJournal) lookup(id string) *execRecord {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.pruneLocked(time.Now())
	return j.byID[id]
}

// abandon removes a claimed record whose command was not started because
// the request cannot run (or the agent is stopping): nothing ran, so a
// retry may try again.
func (j *execJournal) abandon(rec *execRecord) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.byID[rec.id] == rec {
		delete(j.byID, rec.id)
	}
}

// finished moves rec, which has ended, to the ended list and applies the
// bounds.
func (j *execJournal) finished(rec *execRecord) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.byID[rec.id] != rec {
		return
	}
	j.ended = append(j.ended, rec)
	j.pruneLocked(time.Now())
	// Forgotten on time even if no other Exec comes to prune.
	time.AfterFunc(j.retention, func() {
		j.mu.Lock()
		defer j.mu.Unlock()
		j.pruneLocked(time.Now())
	})
}

// pruneLocked forgets ended records past their retention, then the oldest
// while the count or the bytes exceed the bounds.
func (j *execJournal) pruneLocked(now time.Time) {
	var bytes int64
	for _, r := range j.ended {
		bytes += r.size()
	}
	drop := 0
	for drop < len(j.ended) {
		r := j.ended[drop]
		if now.Sub(r.endedAt) < j.retention && len(j.ended)-drop <= j.maxEnded && bytes <= j.maxBytes {
			break
		}
		bytes -= r.size()
		delete(j.byID, r.id)
		drop++
	}
	if drop > 0 {
		j.ended = slices.Delete(j.ended, 0, drop)
	}
}

// len reports how many records the journal holds, running and ended.
func (j *execJournal) len() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return len(j.byID)
}

// outputChunk is a piece of stdout or stderr as the command wrote it.
type outputChunk struct {
	stderr bool
	data   []byte
}

func (c outputChunk) response() *agentpb.ExecResponse {
	if c.stderr {
		return stderrResponse(c.data)
	}
	return stdoutResponse(c.data)
}

// execRecord is one execution's state, shared by the streams that follow
// it: the original caller's and those that reattached. Output is kept in
// order, up to the command's cap per stream, so a follower that comes
// late replays it from the start. Every execution has one; only those with
// an id are in the journal.
type execRecord struct {
	id string

	// ready is closed once the start settled: pid and startedAt are set
	// (pid 0 and exit set for a program that could not be started), or
	// startErr is (the request was refused; the record was abandoned).
	ready     chan struct{}
	pid       int
	startedAt time.Time
	startErr  error

	// kill asks the supervisor to kill the command's tree (buffered).
	kill chan string

	mu      sync.Mutex
	chunks  []outputChunk
	kept    int64
	exit    *agentpb.ExecExit // set once, when it ended
	failure error             // instead of exit: the status was lost
	endedAt time.Time
	changed chan struct{} // closed and replaced on every change
	done    chan struct{} // closed when it ended
}

func newExecRecord() *execRecord {
	return &execRecord{
		ready:   make(chan struct{}),
		kill:    make(chan string, 1),
		changed: make(chan struct{}),
		done:    make(chan struct{}),
	}
}

// ended is closed once the exit (or failure) is recorded.
func (r *execRecord) ended() <-chan struct{} { return r.done }

// requestKill asks the supervisor to kill the command's whole tree; it
// never blocks and is harmless after the end.
func (r *execRecord) requestKill(why string) {
	select {
	case r.kill <- why:
	default: // a kill is pending already
	}
}

func (r *execRecord) notifyLocked() {
	close(r.changed)
	r.changed = make(chan struct{})
}

// record appends output; the pump has applied the cap.
func (r *execRecord) record(c outputChunk) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.chunks = append(r.chunks, c)
	r.kept += int64(len(c.data))
	r.notifyLocked()
}

// end sets the exit; followers send it after the output.
func (r *execRecord) end(x *agentpb.ExecExit) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.exit, r.endedAt = x, time.Now()
	r.notifyLocked()
	close(r.done)
}

// fail ends the record with err, a gRPC status, when the exit status
// could not be collected; followers return err instead of the exit.
func (r *execRecord) fail(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failure, r.endedAt = err, time.Now()
	r.notifyLocked()
	close(r.done)
}

func (r *execRecord) size() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.kept
}

// follow sends the output kept from the start, then live output, then the
// exit, through send. It returns nil once the exit was sent, send's error
// if the stream broke, or the error of done when it closed first.
func (r *execRecord) follow(send func(*agentpb.ExecResponse) error, done <-chan struct{}, doneErr func() error) error {
	next := 0
	for {
		r.mu.Lock()
		chunks, exit, failure, changed := r.chunks[next:], r.exit, r.failure, r.changed
		r.mu.Unlock()
		for _, c := range chunks {
			if err := send(c.response()); err != nil {
				return err
			}
		}
		next += len(chunks)
		if failure != nil {
			return failure
		}
		if exit != nil {
			// Read under the same lock as chunks: nothing follows it.
			return send(&agentpb.ExecResponse{Msg: &agentpb.ExecResponse_Exit{Exit: exit}})
		}
		select {
		case <-changed:
		case <-done:
			return doneErr()
		}
	}
}
