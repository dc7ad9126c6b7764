package client

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/api/wire"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// ndjson is the media type of the exec and output streams.
const ndjson = wire.NDJSON

// maxEventBytes bounds one line of a stream (a chunk of output, base64).
const maxEventBytes = 4 << 20

// cancelGrace is how long Exec keeps reading after cancelling its task for
// the command's exit line, before giving up on the stream.
const cancelGrace = 10 * time.Second

// event is one line of an NDJSON stream.
type event struct {
	Type        string     `json:"type"`
	ExecutionID string     `json:"execution_id,omitempty"`
	DataB64     []byte     `json:"data_b64,omitempty"` // encoding/json decodes base64 into []byte
	ExitCode    int        `json:"exit_code"`
	TimedOut    bool       `json:"timed_out"`
	Error       *wireError `json:"-"`
	// ExitError is the exit line's error, when the command could not run.
	ExitError string `json:"-"`
}

func (e *event) UnmarshalJSON(b []byte) error {
	type plain event
	var raw struct {
		plain
		Error json.RawMessage `json:"error"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return err
	}
	*e = event(raw.plain)
	if len(raw.Error) == 0 || string(raw.Error) == "null" {
		return nil
	}
	// {"type":"error","error":{code,message}}; an exit line may carry a
	// plain string saying why the command could not run.
	var we wireError
	if err := json.Unmarshal(raw.Error, &we); err == nil {
		e.Error = &we
		return nil
	}
	return json.Unmarshal(raw.Error, &e.ExitError)
}

// streamReader reads the events of one stream, writing output as it comes.
type streamReader struct {
	sc             *bufio.Scanner
	stdout, stderr io.Writer
	what           string
}

func newStreamReader(body io.Reader, stdout, stderr io.Writer, what string) *streamReader {
	sc := bufio.NewScanner(body)
	sc.Buffer(make([]byte, 0, 64<<10), maxEventBytes)
	return &streamReader{sc: sc, stdout: stdout, stderr: stderr, what: what}
}

// next returns the next event that is not output, having written every
// output event before it. io.ErrUnexpectedEOF: the stream ended early.
func (r *streamReader) next() (*event, error) {
	for r.sc.Scan() {
		line := r.sc.Bytes()
		if len(strings.TrimSpace(string(line))) == 0 {
			continue
		}
		var ev event
		if err := json.Unmarshal(line, &ev); err != nil {
			return nil, fmt.Errorf("%s: a malformed line in the stream: %w", r.what, err)
		}
		switch ev.Type {
		case "stdout", "stderr":
			w := r.stdout
			if ev.Type == "stderr" {
				w = r.stderr
			}
			if _, err := w.Write(ev.DataB64); err != nil {
				return nil, fmt.Errorf("%s: writing %s: %w", r.what, ev.Type, err)
			}
		case "error":
			if ev.Error == nil {
				return nil, fmt.Errorf("%s: the server ended the stream with an error it did not describe", r.what)
			}
			return nil, newError(http.StatusOK, *ev.Error)
		default:
			return &ev, nil
		}
	}
	if err := r.sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: reading the stream: %w", r.what, err)
	}
	return nil, fmt.Errorf("%s: the stream ended before the command did: %w", r.what, io.ErrUnexpectedEOF)
}

// untilExit reads to the exit line.
func (r *streamReader) untilExit() (*queue.ExitInfo, error) {
	for {
		ev, err := r.next()
		if err != nil {
			return nil, err
		}
		if ev.Type == "exit" {
			return &queue.ExitInfo{ExitCode: ev.ExitCode, TimedOut: ev.TimedOut, Error: ev.ExitError}, nil
		}
	}
}

// openStream sends a request answered by an NDJSON stream. The request
// lives as long as ctx: no timeout applies to a stream.
func (c *Client) openStream(ctx context.Context, method, path string, in any) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("%w: encoding the request: %v", types.ErrInvalid, err)
		}
		body = strings.NewReader(string(b))
	}
	req, err := c.request(ctx, method, path, nil, body)
	if err != nil {
		return nil, err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", ndjson)
	return c.do(req)
}

// StreamOutput reads GET /v1/tasks/{id}/output.
func (c *Client) StreamOutput(ctx context.Context, taskID uuid.UUID, stdout, stderr io.Writer) (*queue.ExitInfo, error) {
	resp, err := c.openStream(ctx, http.MethodGet, "/v1/tasks/"+taskID.String()+"/output", nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	ei, err := newStreamReader(resp.Body, stdout, stderr, "task "+taskID.String()).untilExit()
	if err != nil && ctx.Err() != nil {
		return nil, ctx.Err()
	}
	return ei, err
}

// ExecuteCommandTaskWithOptions submits the command with ?async=true and
// returns its task's id at once; o.Stream keeps its output for
// StreamOutput.
func (c *Client) ExecuteCommandTaskWithOptions(ctx context.Context, vmID string, cmd types.Command, o service.ExecOptions) (uuid.UUID, error) {
	if err := cmd.Validate(); err != nil {
		return uuid.Nil, err
	}
	q := url.Values{"async": {"true"}}
	if o.Stream {
		q.Set("stream", "true")
	}
	var t types.Task
	if err := c.doJSON(ctx, http.MethodPost, vmPath(vmID, "exec"), q, wire.NewExecRequest(cmd), &t); err != nil {
		return uuid.Nil, err
	}
	return parseUUID("task", t.ID)
}

// startExec opens an exec stream on sctx and reads it up to the start line
// (or until ctx ends). stopStream cancels sctx: when startExec fails it has
// been called, or will be once a late start line has been answered with a
// cancel; on success the caller calls it.
func (c *Client) startExec(ctx, sctx context.Context, stopStream context.CancelFunc, vmID string, cmd types.Command, stdout, stderr io.Writer) (*http.Response, *streamReader, uuid.UUID, error) {
	type started struct {
		resp *http.Response
		r    *streamReader
		id   uuid.UUID
		err  error
	}
	done := make(chan started, 1)
	go func() {
		resp, err := c.openStream(sctx, http.MethodPost, vmPath(vmID, "exec"), wire.NewExecRequest(cmd))
		if err != nil {
			done <- started{err: err}
			return
		}
		r := newStreamReader(resp.Body, stdout, stderr, "exec in vm "+vmID)
		ev, err := r.next()
		if err == nil && ev.Type != "start" {
			err = fmt.Errorf("exec in vm %s: the stream began with %q instead of its start line", vmID, ev.Type)
		}
		var id uuid.UUID
		if err == nil {
			id, err = parseUUID("execution", ev.ExecutionID)
		}
		if err != nil {
			resp.Body.Close()
			done <- started{err: err}
			return
		}
		done <- started{resp, r, id, nil}
	}()
	select {
	case s := <-done:
		if s.err != nil {
			stopStream()
		}
		return s.resp, s.r, s.id, s.err
	case <-ctx.Done():
		// The server may have submitted the command already: the stream is
		// left open until it says so, then the task is cancelled, so that
		// nothing runs that nobody asked for.
		go func() {
			defer stopStream()
			if s := <-done; s.err == nil {
				_ = c.CancelTask(context.Background(), s.id)
				s.resp.Body.Close()
			}
		}()
		return nil, nil, uuid.Nil, ctx.Err()
	}
}

// Exec runs cmd through the exec stream. Cancelling ctx cancels the task
// (killing the command) and reads on until its exit line, as the local
// service does, for at most cancelGrace.
func (c *Client) Exec(ctx context.Context, vmID string, cmd types.Command, stdout, stderr io.Writer) (*service.ExecResult, error) {
	if err := cmd.Validate(); err != nil {
		return nil, err
	}
	sctx, stopStream := context.WithCancel(context.WithoutCancel(ctx))
	resp, r, id, err := c.startExec(ctx, sctx, stopStream, vmID, cmd, stdout, stderr)
	if err != nil {
		return nil, err // startExec stops the stream, once it is safe to
	}
	defer stopStream()
	defer resp.Body.Close()
	res := &service.ExecResult{TaskID: id}

	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-done:
		case <-ctx.Done():
			select {
			case <-done: // Exec returned before ctx ended
				return
			default:
			}
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cancelGrace)
			defer cancel()
			_ = c.CancelTask(cctx, id)
			select {
			case <-done:
			case <-cctx.Done():
				stopStream()
			}
		}
	}()
	ei, err := r.untilExit()
	var apiErr *Error
	if errors.As(err, &apiErr) && apiErr.Code == wire.CodeExecFailed && types.OutcomeUnknown(apiErr.Message) {
		// The command started and its result is lost: not an error of
		// this call, but its outcome (service.ExecResult.OutcomeUnknown).
		ei, err = &queue.ExitInfo{Error: apiErr.Message}, nil
	}
	if err != nil {
		if ctx.Err() != nil {
			return res, ctx.Err()
		}
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return res, fmt.Errorf("%w: %v; see the execution with `aether-cli executions %s`", types.ErrUnavailable, err, vmID)
		}
		return res, err
	}
	res.ExitCode, res.TimedOut, res.Err = ei.ExitCode, ei.TimedOut, ei.Error
	res.OutcomeUnknown = types.OutcomeUnknown(res.Err)
	if ctx.Err() != nil {
		return res, ctx.Err()
	}
	return res, nil
}
