package client_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/client"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

const testKey = "aek_0123456789abcdef_secret"

// serve starts an API stand-in that checks the key and hands the request
// to h.
func serve(t *testing.T, h http.HandlerFunc) *client.Client {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+testKey {
			writeError(w, http.StatusUnauthorized, "unauthenticated", "a valid API key is required")
			return
		}
		h(w, r)
	}))
	t.Cleanup(srv.Close)
	c, err := client.New(srv.URL, testKey)
	require.NoError(t, err)
	t.Cleanup(c.Close)
	return c
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"error":{"code":%q,"message":%q}}`, code, msg)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func TestNew(t *testing.T) {
	for _, u := range []string{"", "localhost:8080", "ftp://x", "http://", "http://h/?q=1", "::"} {
		_, err := client.New(u, "")
		require.ErrorIs(t, err, types.ErrInvalid, u)
	}
	c, err := client.New("https://api.example.com/base/", "k")
	require.NoError(t, err)
	require.Equal(t, "https://api.example.com/base", c.URL())
}

func TestErrorMapping(t *testing.T) {
	cases := []struct {
		status int
		code   string
		kind   error
	}{
		{400, "invalid_request", types.ErrInvalid},
		{422, "invalid", types.ErrInvalid},
		{413, "too_large", types.ErrInvalid},
		{404, "not_found", types.ErrNotFound},
		{409, "conflict", types.ErrConflict},
		{429, "limit_exceeded", types.ErrLimit},
		{503, "unavailable", types.ErrUnavailable},
		{501, "not_supported", types.ErrNotSupported},
		{401, "unauthenticated", client.ErrUnauthenticated},
	}
	for _, tc := range cases {
		t.Run(tc.code, func(t *testing.T) {
			c := serve(t, func(w http.ResponseWriter, r *http.Request) {
				writeError(w, tc.status, tc.code, "vm x: the server's own words")
			})
			_, err := c.GetVM(t.Context(), uuid.New())
			require.ErrorIs(t, err, tc.kind)
			require.Contains(t, err.Error(), "the server's own words")
			var ae *client.Error
			require.ErrorAs(t, err, &ae)
			require.Equal(t, tc.status, ae.Status)
		})
	}
	t.Run("internal keeps its message and has no kind", func(t *testing.T) {
		c := serve(t, func(w http.ResponseWriter, r *http.Request) { writeError(w, 500, "exec_failed", "agent died") })
		_, err := c.GetTask(t.Context(), uuid.New())
		require.EqualError(t, err, "agent died")
		for _, k := range []error{types.ErrInvalid, types.ErrNotFound, types.ErrUnavailable} {
			require.NotErrorIs(t, err, k)
		}
	})
	t.Run("a body that is not the API's still maps by status", func(t *testing.T) {
		c := serve(t, func(w http.ResponseWriter, r *http.Request) { http.Error(w, "bad gateway", http.StatusBadGateway) })
		_, err := c.ListWorkers(t.Context())
		require.ErrorIs(t, err, types.ErrUnavailable)
		require.Contains(t, err.Error(), "bad gateway")
	})
	t.Run("a wrong key says what to check", func(t *testing.T) {
		c := serve(t, nil)
		bad, err := client.New(c.URL(), "aek_wrong")
		require.NoError(t, err)
		_, err = bad.ListVMs(t.Context())
		require.ErrorIs(t, err, client.ErrUnauthenticated)
		require.Contains(t, err.Error(), "API key was refused; check AETHERIUM_API_KEY")

		none, err := client.New(c.URL(), "")
		require.NoError(t, err)
		_, err = none.ListVMs(t.Context())
		require.ErrorIs(t, err, client.ErrUnauthenticated)
		require.Contains(t, err.Error(), "no API key was given; set AETHERIUM_API_KEY")
	})
	t.Run("no server is unavailable with a hint", func(t *testing.T) {
		srv := httptest.NewServer(http.NotFoundHandler())
		srv.Close()
		c, err := client.New(srv.URL, testKey)
		require.NoError(t, err)
		_, err = c.ListVMs(t.Context())
		require.ErrorIs(t, err, types.ErrUnavailable)
		require.Contains(t, err.Error(), "cannot reach aether-api")
	})
}

func TestCreateAndList(t *testing.T) {
	id := uuid.NewString()
	var pages atomic.Int32
	c := serve(t, func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodPost && r.URL.Path == "/v1/vms":
			var body map[string]any
			require.NoError(t, json.NewDecoder(r.Body).Decode(&body))
			require.Equal(t, "demo", body["name"])
			require.EqualValues(t, 601, body["ttl_seconds"], "a TTL is rounded up to whole seconds")
			require.Equal(t, map[string]any{"a": "b"}, body["labels"])
			writeJSON(w, http.StatusAccepted, types.VM{ID: id, Name: "demo", State: types.VMPending})
		case r.Method == http.MethodGet && r.URL.Path == "/v1/vms":
			require.Equal(t, []string{"a=b"}, r.URL.Query()["label"])
			if pages.Add(1) == 1 {
				require.Empty(t, r.URL.Query().Get("after"))
				writeJSON(w, 200, map[string]any{"vms": []types.VM{{ID: "1"}, {ID: "2"}}, "next": "2"})
				return
			}
			require.Equal(t, "2", r.URL.Query().Get("after"))
			writeJSON(w, 200, map[string]any{"vms": []types.VM{{ID: "3"}}})
		default:
			writeError(w, 404, "not_found", "no route "+r.URL.Path)
		}
	})
	got, err := c.CreateVMTaskWithOptions(t.Context(), service.CreateVMOptions{Name: "demo", VCPUs: 1, MemoryMB: 256, Labels: map[string]string{"a": "b"}, TTL: 10*time.Minute + 500*time.Millisecond})
	require.NoError(t, err)
	require.Equal(t, id, got.String())
	_, err = c.CreateVMTask(t.Context(), "demo", 0, 256)
	require.ErrorIs(t, err, types.ErrInvalid, "zero vcpus are refused, as by the local service")
	vms, err := c.ListVMsWithOptions(t.Context(), service.ListVMsOptions{Labels: map[string]string{"a": "b"}})
	require.NoError(t, err)
	require.Len(t, vms, 3, "every page is followed")
}

func TestWaitTaskLongPolls(t *testing.T) {
	var polls atomic.Int32
	id := uuid.New()
	c := serve(t, func(w http.ResponseWriter, r *http.Request) {
		require.Equal(t, "/v1/tasks/"+id.String(), r.URL.Path)
		require.Equal(t, "30s", r.URL.Query().Get("wait"))
		st := types.TaskRunning
		if polls.Add(1) == 3 {
			st = types.TaskFailed
		}
		writeJSON(w, 200, types.Task{ID: id.String(), State: st, Error: "boom"})
	})
	task, err := c.WaitTask(t.Context(), id)
	require.NoError(t, err, "a failed task is an answer, not an error")
	require.Equal(t, types.TaskFailed, task.State)
	require.EqualValues(t, 3, polls.Load())
}

// streamLines writes NDJSON lines, flushing each so the client sees them
// as they come.
func streamLines(w http.ResponseWriter, lines ...string) {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(200)
	for _, l := range lines {
		fmt.Fprintln(w, l)
		w.(http.Flusher).Flush()
	}
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func TestExecStream(t *testing.T) {
	vm, execID := uuid.NewString(), uuid.NewString()
	cases := []struct {
		name            string
		lines           []string
		stdout, stderr  string
		code            int
		timedOut        bool
		errKind         error
		errText, resErr string
	}{
		{name: "output and exit code", lines: []string{
			`{"type":"start","execution_id":"` + execID + `"}`,
			`{"type":"stdout","data_b64":"` + b64("out\n") + `"}`,
			`{"type":"stderr","data_b64":"` + b64("err\n") + `"}`,
			``,
			`{"type":"stdout","data_b64":"` + b64("\x00\xff") + `"}`,
			`{"type":"exit","exit_code":3}`,
		}, stdout: "out\n\x00\xff", stderr: "err\n", code: 3},
		{name: "timeout", lines: []string{
			`{"type":"start","execution_id":"` + execID + `"}`,
			`{"type":"exit","exit_code":137,"timed_out":true}`,
		}, code: 137, timedOut: true},
		{name: "error line", lines: []string{
			`{"type":"start","execution_id":"` + execID + `"}`,
			`{"type":"stdout","data_b64":"` + b64("partial") + `"}`,
			`{"type":"error","error":{"code":"unavailable","message":"worker w1 is gone"}}`,
		}, stdout: "partial", errKind: types.ErrUnavailable, errText: "worker w1 is gone"},
		{name: "stream cut short", lines: []string{
			`{"type":"start","execution_id":"` + execID + `"}`,
		}, errKind: types.ErrUnavailable, errText: "ended before"},
		{name: "garbage", lines: []string{`{"type":"start","execution_id":"` + execID + `"}`, `not json`}, errText: "malformed"},
		{name: "outcome unknown", lines: []string{
			`{"type":"start","execution_id":"` + execID + `"}`,
			`{"type":"stdout","data_b64":"` + b64("s\n") + `"}`,
			`{"type":"error","error":{"code":"exec_failed","message":"outcome unknown: the worker stopped while the command ran"}}`,
		}, stdout: "s\n", resErr: "outcome unknown: the worker stopped while the command ran"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := serve(t, func(w http.ResponseWriter, r *http.Request) {
				require.Equal(t, "/v1/vms/"+vm+"/exec", r.URL.Path)
				require.Equal(t, "application/x-ndjson", r.Header.Get("Accept"))
				var body map[string]any
				require.NoError(t, json.NewDecoder(r.Body).Decode(&body))
				require.Equal(t, "sh", body["command"])
				require.Equal(t, b64("in"), body["stdin_b64"])
				require.EqualValues(t, 2, body["timeout_seconds"])
				streamLines(w, tc.lines...)
			})
			var out, errb bytes.Buffer
			res, err := c.Exec(t.Context(), vm, types.Command{Cmd: "sh", Args: []string{"-c", "x"}, Stdin: []byte("in"), Timeout: 1500 * time.Millisecond}, &out, &errb)
			require.Equal(t, tc.stdout, out.String())
			require.Equal(t, tc.stderr, errb.String())
			if tc.errText != "" {
				require.ErrorContains(t, err, tc.errText)
				if tc.errKind != nil {
					require.ErrorIs(t, err, tc.errKind)
				}
				return
			}
			require.NoError(t, err)
			require.Equal(t, execID, res.TaskID.String())
			require.Equal(t, tc.code, res.ExitCode)
			require.Equal(t, tc.timedOut, res.TimedOut)
			require.Equal(t, tc.resErr, res.Err)
			require.Equal(t, tc.resErr != "", res.OutcomeUnknown)
		})
	}
}

// TestExecCancel: cancelling ctx cancels the task on the server and reads
// on to the exit line.
func TestExecCancel(t *testing.T) {
	execID := uuid.NewString()
	cancelled := make(chan struct{})
	c := serve(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/tasks/" + execID + "/cancel":
			close(cancelled)
			writeJSON(w, 200, types.Task{ID: execID, State: types.TaskFailed, Error: "cancelled"})
		default:
			streamLines(w, `{"type":"start","execution_id":"`+execID+`"}`, `{"type":"stdout","data_b64":"`+b64("tick\n")+`"}`)
			select {
			case <-cancelled:
			case <-time.After(10 * time.Second):
			}
			fmt.Fprintln(w, `{"type":"exit","exit_code":137}`)
		}
	})
	ctx, cancel := context.WithCancel(t.Context())
	pr, pw := io.Pipe()
	go func() {
		buf := make([]byte, 5)
		_, _ = io.ReadFull(pr, buf)
		cancel() // once the first output arrived
		_, _ = io.Copy(io.Discard, pr)
	}()
	start := time.Now()
	res, err := c.Exec(ctx, uuid.NewString(), types.Command{Cmd: "sleep", Args: []string{"60"}}, pw, io.Discard)
	require.ErrorIs(t, err, context.Canceled)
	require.Equal(t, 137, res.ExitCode, "the exit line after the cancel is read")
	require.Less(t, time.Since(start), 5*time.Second)
	select {
	case <-cancelled:
	default:
		t.Fatal("the task was not cancelled")
	}
}

// TestExecCancelBeforeStart: a caller that gives up before the server named
// the command still gets it cancelled once the start line arrives.
func TestExecCancelBeforeStart(t *testing.T) {
	execID := uuid.NewString()
	release, cancelled := make(chan struct{}), make(chan struct{})
	c := serve(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/tasks/" + execID + "/cancel":
			close(cancelled)
			writeJSON(w, 200, types.Task{ID: execID, State: types.TaskFailed, Error: "cancelled"})
		default:
			<-release // the command is queued, but the start line is late
			streamLines(w, `{"type":"start","execution_id":"`+execID+`"}`)
			<-cancelled
		}
	})
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err := c.Exec(ctx, uuid.NewString(), types.Command{Cmd: "sleep", Args: []string{"60"}}, io.Discard, io.Discard)
	require.ErrorIs(t, err, context.Canceled)
	close(release)
	select {
	case <-cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("the late-started command was not cancelled")
	}
}

func TestStreamOutput(t *testing.T) {
	id := uuid.New()
	c := serve(t, func(w http.ResponseWriter, r *http.Request) {
		require.Equal(t, "/v1/tasks/"+id.String()+"/output", r.URL.Path)
		streamLines(w, `{"type":"stderr","data_b64":"`+b64("e")+`"}`, `{"type":"exit","exit_code":0,"error":"agent unreachable"}`)
	})
	var errb bytes.Buffer
	ei, err := c.StreamOutput(t.Context(), id, io.Discard, &errb)
	require.NoError(t, err)
	require.Equal(t, "e", errb.String())
	require.Equal(t, "agent unreachable", ei.Error)
}

func TestFiles(t *testing.T) {
	vm := uuid.NewString()
	content := bytes.Repeat([]byte{0, 1, 2, 0xff, '\n'}, 100_000)
	c := serve(t, func(w http.ResponseWriter, r *http.Request) {
		require.Equal(t, "/v1/vms/"+vm+"/files", r.URL.Path)
		q := r.URL.Query()
		switch r.Method {
		case http.MethodPut:
			require.Equal(t, "/tmp/x", q.Get("path"))
			require.Equal(t, "0755", q.Get("mode"))
			require.Equal(t, "nobody", q.Get("user"))
			require.Equal(t, "true", q.Get("mkdir"))
			require.EqualValues(t, -1, r.ContentLength, "the body is streamed, not measured first")
			n, err := io.Copy(io.Discard, r.Body)
			require.NoError(t, err)
			writeJSON(w, 200, map[string]any{"path": q.Get("path"), "size": n})
		case http.MethodGet:
			if q.Get("path") != "/tmp/x" {
				writeError(w, 404, "not_found", "file "+q.Get("path")+" does not exist")
				return
			}
			_, _ = w.Write(content)
		}
	})
	n, err := c.WriteFile(t.Context(), vm, "/tmp/x", bytes.NewReader(content), types.FileOptions{Mode: 0o755, User: "nobody", MakeParents: true})
	require.NoError(t, err)
	require.EqualValues(t, len(content), n)

	var got bytes.Buffer
	n, err = c.ReadFile(t.Context(), vm, "/tmp/x", &got)
	require.NoError(t, err)
	require.EqualValues(t, len(content), n)
	require.True(t, bytes.Equal(content, got.Bytes()))

	got.Reset()
	_, err = c.ReadFile(t.Context(), vm, "/nope", &got)
	require.ErrorIs(t, err, types.ErrNotFound)
	require.Zero(t, got.Len(), "nothing is written on error")

	_, err = c.WriteFile(t.Context(), vm, "relative", strings.NewReader(""), types.FileOptions{})
	require.ErrorIs(t, err, types.ErrInvalid)
	require.False(t, errors.Is(err, types.ErrNotFound))
}
