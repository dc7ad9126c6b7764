package api

import (
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/api/wire"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// NDJSON is the media type of output streams: one JSON Event per line.
const NDJSON = wire.NDJSON

// The request bodies, shared with pkg/client through pkg/api/wire.
type (
	ExecRequest = wire.ExecRequest
	JobRequest  = wire.JobRequest
)

// Event is one line of an output stream: "start" (exec only, first),
// then "stdout"/"stderr" chunks as produced, then "exit" or "error".
type Event struct {
	Type        string     `json:"type"`
	ExecutionID string     `json:"execution_id,omitempty"`
	DataB64     string     `json:"data_b64,omitempty"`
	ExitCode    *int       `json:"exit_code,omitempty"`
	TimedOut    *bool      `json:"timed_out,omitempty"`
	Error       *errorBody `json:"error,omitempty"`
}

// command turns a request into a command to queue.
func command(req ExecRequest) (types.Command, error) {
	c, err := req.ToCommand()
	var bad wire.ErrBadStdin
	if errors.As(err, &bad) {
		return c, badRequest("%v", bad)
	}
	return c, err
}

// wantsNDJSON reports whether the Accept header asks for an NDJSON stream.
func wantsNDJSON(r *http.Request) bool {
	for _, part := range strings.Split(r.Header.Get("Accept"), ",") {
		if mt, _, err := mime.ParseMediaType(strings.TrimSpace(part)); err == nil && mt == NDJSON {
			return true
		}
	}
	return false
}

func (s *Server) exec(w http.ResponseWriter, r *http.Request) error {
	vmID, err := pathID(r, "id")
	if err != nil {
		return err
	}
	var req ExecRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	cmd, err := command(req)
	if err != nil {
		return err
	}
	async, err := queryBool(r, "async")
	if err != nil {
		return err
	}
	stream := wantsNDJSON(r)
	if async {
		// Submitted and answered at once; stream=true keeps the output for
		// GET /v1/tasks/{id}/output.
		if stream, err = queryBool(r, "stream"); err != nil {
			return err
		}
	}
	id, err := s.svc.ExecuteCommandTaskWithOptions(r.Context(), vmID.String(), cmd, service.ExecOptions{Stream: stream})
	if err != nil {
		return err
	}
	s.log.Debug("command submitted", "vm_id", vmID, "task_id", id, "stream", stream, "async", async)
	if async {
		t, err := s.svc.GetTask(r.Context(), id)
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusAccepted, t)
	}
	if stream {
		ew := newEventWriter(w)
		if ew.send(Event{Type: "start", ExecutionID: id.String()}) == nil {
			s.pump(r, ew, id)
		}
		return nil
	}
	t, err := s.wait(r.Context(), id, "the command goes on and its result is recorded at GET /v1/executions/"+id.String())
	if err != nil {
		return err
	}
	e, err := s.svc.GetExecution(r.Context(), id)
	if errors.Is(err, types.ErrNotFound) && t.State == types.TaskFailed {
		return &Error{Status: http.StatusInternalServerError, Code: CodeExecFailed, Message: execFailedText(t.Error)}
	}
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, e)
}

func (s *Server) taskOutput(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	t, err := s.svc.GetTask(r.Context(), id)
	if err != nil {
		return err
	}
	if t.Type != types.TaskVMExecute {
		return fmt.Errorf("%w: task %s is a %s task; only exec tasks have output", types.ErrInvalid, id, t.Type)
	}
	s.pump(r, newEventWriter(w), id)
	return nil
}

// drainGrace is how long a stream waits for the exit chunk after its task
// ended (a worker that crashed publishes none) before it answers from the
// stored execution.
const drainGrace = 2 * time.Second

// pump copies a streamed task's output to ew until the command ends, the
// client leaves (the task runs on: it is never cancelled from here) or
// Shutdown begins (a last "unavailable" line says where the result will
// be).
func (s *Server) pump(r *http.Request, ew *eventWriter, id uuid.UUID) {
	defer ew.close()
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	type outcome struct {
		exit *queue.ExitInfo
		err  error
	}
	done := make(chan outcome, 1)
	go func() {
		ei, err := s.svc.StreamOutput(ctx, id, ew.sink("stdout"), ew.sink("stderr"))
		done <- outcome{ei, err}
	}()
	ended := make(chan *types.Task, 1)
	go func() {
		if t, err := s.svc.WaitTask(ctx, id); err == nil {
			ended <- t
		}
	}()
	// finish stops the output goroutine without waiting for it: it may sit
	// in a blocking Redis read for a while, and once the output is stopped
	// it can no longer write anything.
	finish := func() {
		ew.stopOutput()
		cancel()
	}
	var task *types.Task
	var grace <-chan time.Time
	streamDead := false
	for {
		select {
		case o := <-done:
			switch {
			case o.err != nil && r.Context().Err() != nil:
			case o.err != nil && ew.failed() == nil:
				// The stream broke (Redis down or restarted), not the
				// client: PostgreSQL still records how the command ends,
				// and what the stream did not deliver.
				s.log.Warn("output stream lost; waiting for the task in storage", "task_id", id, "error", o.err)
				streamDead = true
				if task != nil {
					s.finishFromStore(r, ew, id, task)
					return
				}
				continue
			case o.err != nil:
				_, body := httpError(o.err, infoOf(r.Context()).id)
				s.log.Warn("streaming output failed", "task_id", id, "error", o.err)
				ew.send(Event{Type: "error", Error: &body})
			case o.exit.Error != "":
				ew.send(execFailed(o.exit.Error))
			default:
				ew.send(exitEvent(o.exit.ExitCode, o.exit.TimedOut))
			}
			return
		case task = <-ended:
			if streamDead {
				s.finishFromStore(r, ew, id, task)
				return
			}
			grace = time.After(drainGrace)
		case <-grace:
			finish()
			s.finishFromStore(r, ew, id, task)
			return
		case <-s.closing.Done():
			ew.stopOutput()
			ew.send(Event{Type: "error", Error: &errorBody{CodeUnavailable,
				"the server is shutting down; the command goes on and its result is recorded at GET /v1/executions/" + id.String()}})
			finish()
			return
		case <-r.Context().Done():
			finish()
			return
		}
	}
}

// finishFromStore ends a stream whose task ended without the stream's
// exit chunk (its worker crashed, or Redis lost the stream) from what
// PostgreSQL recorded: the output the stream did not deliver, then the
// exit, or why there is none.
func (s *Server) finishFromStore(r *http.Request, ew *eventWriter, id uuid.UUID, task *types.Task) {
	ew.stopOutput()
	bg := context.WithoutCancel(r.Context())
	e, err := s.svc.GetExecution(bg, id)
	switch {
	case err == nil:
		ew.sendRest("stdout", e.Stdout)
		ew.sendRest("stderr", e.Stderr)
		if e.Error == "" {
			ew.send(exitEvent(e.ExitCode, e.TimedOut))
		} else {
			ew.send(execFailed(e.Error))
		}
	default:
		ew.send(execFailed(cmp.Or(task.Error, "the command's task ended without a result")))
	}
}

// execFailedText says why a command has no exit code: it could not run,
// or it started and its outcome is unknown (types.OutcomeUnknown: the text
// is kept as is, so that clients can tell the two apart).
func execFailedText(msg string) string {
	if types.OutcomeUnknown(msg) {
		return msg
	}
	return "the command could not run: " + msg
}

// execFailed is the error line of a command without an exit code.
func execFailed(msg string) Event {
	return Event{Type: "error", Error: &errorBody{CodeExecFailed, execFailedText(msg)}}
}

func exitEvent(code int, timedOut bool) Event {
	return Event{Type: "exit", ExitCode: &code, TimedOut: &timedOut}
}

// eventWriter writes events as NDJSON lines, each flushed at once. The
// output goroutine and the handler share it, so lines are whole and
// nothing is written once it is closed.
type eventWriter struct {
	mu     sync.Mutex
	w      http.ResponseWriter
	rc     *http.ResponseController
	closed bool
	// outputStopped refuses output chunks but not the handler's last line.
	outputStopped bool
	err           error
	// sent counts the output bytes delivered per kind ("stdout",
	// "stderr"), so that sendRest writes only what the client lacks.
	sent map[string]int
}

// failed returns the error that ended writing to the client, if any.
func (e *eventWriter) failed() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.err
}

// restChunk bounds the output of one line sendRest writes.
const restChunk = 64 << 10

// sendRest writes, as the handler's own lines, the part of a stream's
// whole stored output (stored) not yet delivered.
func (e *eventWriter) sendRest(kind, stored string) {
	e.mu.Lock()
	n := e.sent[kind]
	e.mu.Unlock()
	for n < len(stored) {
		end := min(n+restChunk, len(stored))
		if e.writeCounted(Event{Type: kind, DataB64: base64.StdEncoding.EncodeToString([]byte(stored[n:end]))}, false, end-n) != nil {
			return
		}
		n = end
	}
}

// writeTimeout bounds each line's write, so a client that stops reading
// cannot hold a handler (or the shutdown) forever.
const writeTimeout = 30 * time.Second

func newEventWriter(w http.ResponseWriter) *eventWriter {
	w.Header().Set("Content-Type", NDJSON)
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	return &eventWriter{w: w, rc: rc, sent: map[string]int{}}
}

func (e *eventWriter) send(ev Event) error { return e.write(ev, false) }

// write writes one line unless the writer is closed (or, for output
// chunks, the output stopped).
func (e *eventWriter) write(ev Event, output bool) error {
	return e.writeCounted(ev, output, 0)
}

// writeCounted is write that, once the line is out, counts n output bytes
// of ev.Type as delivered, under the same lock (see sendRest).
func (e *eventWriter) writeCounted(ev Event, output bool, n int) error {
	b, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.writeLocked(b, output); err != nil {
		return err
	}
	e.sent[ev.Type] += n
	return nil
}

func (e *eventWriter) writeLocked(b []byte, output bool) error {
	if e.closed || (output && e.outputStopped) {
		return errStreamClosed
	}
	if e.err != nil {
		return e.err
	}
	_ = e.rc.SetWriteDeadline(time.Now().Add(writeTimeout))
	if _, err := e.w.Write(append(b, '\n')); err != nil {
		e.err = err
		return err
	}
	e.err = e.rc.Flush()
	return e.err
}

var errStreamClosed = errors.New("output stream closed")

// stopOutput makes every later output chunk fail, so the handler's last
// line is the last; a line being written is finished first.
func (e *eventWriter) stopOutput() {
	e.mu.Lock()
	e.outputStopped = true
	e.mu.Unlock()
}

// close stops every later write.
func (e *eventWriter) close() {
	e.mu.Lock()
	e.closed = true
	e.mu.Unlock()
}

// sink is an io.Writer turning each chunk into one event of kind.
func (e *eventWriter) sink(kind string) sinkWriter { return sinkWriter{e, kind} }

type sinkWriter struct {
	e    *eventWriter
	kind string
}

func (s sinkWriter) Write(p []byte) (int, error) {
	if err := s.e.writeCounted(Event{Type: s.kind, DataB64: base64.StdEncoding.EncodeToString(p)}, true, len(p)); err != nil {
		return 0, err
	}
	return len(p), nil
}
