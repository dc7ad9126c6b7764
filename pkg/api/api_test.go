package api_test

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/api"
	"github.com/aetherium/aetherium-core/pkg/apikey"
	"github.com/aetherium/aetherium-core/pkg/dataplane"
	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

func TestAuthAndTenants(t *testing.T) {
	t.Parallel()
	s := stack.Start(t, stack.Options{Workers: []string{"auth"}})
	a := s.StartAPI(t, stack.APIOptions{})
	keyA := a.Key(t, apikey.Options{Tenant: "tenant-a"})
	keyB := a.Key(t, apikey.Options{Tenant: "tenant-b"})
	admin := a.Key(t, apikey.Options{Tenant: "ops", Admin: true})
	revokedRow, revoked, err := apikey.Create(context.Background(), s.Store, apikey.Options{Name: "gone", Tenant: "tenant-a"})
	require.NoError(t, err)
	_, err = s.Store.RevokeAPIKey(context.Background(), revokedRow.ID)
	require.NoError(t, err)
	// The right id with another secret.
	wrongSecret := keyA[:len(keyA)-4] + "AAAA"
	if wrongSecret == keyA {
		wrongSecret = keyA[:len(keyA)-4] + "BBBB"
	}

	c := newClient(t, a, keyA)
	for _, tc := range []struct {
		name   string
		header func(*http.Request)
		want   int
	}{
		{"no key", func(r *http.Request) {}, http.StatusUnauthorized},
		{"malformed key", func(r *http.Request) { r.Header.Set("Authorization", "Bearer nope") }, http.StatusUnauthorized},
		{"wrong secret", func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+wrongSecret) }, http.StatusUnauthorized},
		{"unknown id", func(r *http.Request) {
			r.Header.Set("X-API-Key", "aek_0123456789abcdef_"+strings.Repeat("x", 43))
		}, http.StatusUnauthorized},
		{"revoked key", func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+revoked) }, http.StatusUnauthorized},
		{"basic scheme", func(r *http.Request) { r.Header.Set("Authorization", "Basic "+keyA) }, http.StatusUnauthorized},
		{"bearer", func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+keyA) }, http.StatusOK},
		{"x-api-key", func(r *http.Request) { r.Header.Set("X-API-Key", keyA) }, http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := c.on(t)
			req := c.as("").request("GET", "/v1/vms", nil)
			tc.header(req)
			if tc.want == http.StatusOK {
				c.check(req, tc.want, nil)
				return
			}
			e := c.fail(req, tc.want, api.CodeUnauthenticated)
			for _, k := range []string{keyA, revoked, wrongSecret} {
				require.NotContains(t, e.Error.Message, k[len(k)-43:], "an error must never echo a key")
			}
		})
	}

	// A VM of tenant a is invisible to tenant b, exactly like a missing one.
	var vm types.VM
	c.call("POST", "/v1/vms", api.CreateVMRequest{Name: "mine"}, http.StatusAccepted, &vm)
	require.Equal(t, "tenant-a", vm.Tenant)
	b := c.as(keyB)
	missing := b.fail(b.request("GET", "/v1/vms/"+uuid.NewString(), nil), http.StatusNotFound, api.CodeNotFound)
	other := b.fail(b.request("GET", "/v1/vms/"+vm.ID, nil), http.StatusNotFound, api.CodeNotFound)
	require.Equal(t, strings.ReplaceAll(missing.Error.Message, missing.Error.Message[strings.Index(missing.Error.Message, "vm "):][3:39], vm.ID), other.Error.Message)
	b.fail(b.request("DELETE", "/v1/vms/"+vm.ID, nil), http.StatusNotFound, api.CodeNotFound)
	b.fail(b.request("GET", "/v1/tasks/"+vm.ID, nil), http.StatusNotFound, api.CodeNotFound)
	b.fail(b.request("GET", "/v1/vms/"+vm.ID+"/executions", nil), http.StatusNotFound, api.CodeNotFound)
	var list api.VMList
	b.call("GET", "/v1/vms", nil, http.StatusOK, &list)
	require.Empty(t, list.VMs)
	b.fail(b.request("GET", "/v1/workers", nil), http.StatusNotFound, api.CodeNotFound)

	// An admin sees every tenant.
	ad := c.as(admin)
	var got types.VM
	ad.call("GET", "/v1/vms/"+vm.ID, nil, http.StatusOK, &got)
	require.Equal(t, vm.ID, got.ID)
	ad.call("GET", "/v1/vms", nil, http.StatusOK, &list)
	require.Len(t, list.VMs, 1)
	var workers struct{ Workers []*types.Worker }
	ad.call("GET", "/v1/workers", nil, http.StatusOK, &workers)
	require.Len(t, workers.Workers, 1)
	require.Equal(t, "auth", workers.Workers[0].ID)

	var task types.Task
	ad.call("GET", "/v1/tasks/"+vm.ID+"?wait=60s", nil, http.StatusOK, &task)
	require.Equal(t, types.TaskSucceeded, task.State, task.Error)
}

func TestLimits(t *testing.T) {
	t.Parallel()
	s := stack.Start(t, stack.Options{Workers: []string{"limits"}})
	a := s.StartAPI(t, stack.APIOptions{Limits: types.Limits{MaxMemoryMB: 300}})
	c := newClient(t, a, "")
	for _, tc := range []struct {
		name    string
		key     apikey.Options
		first   *api.CreateVMRequest
		second  api.CreateVMRequest
		message []string
	}{
		{"vms", apikey.Options{Tenant: "vms", Limits: types.Limits{MaxVMs: 1}}, &api.CreateVMRequest{Name: "one"},
			api.CreateVMRequest{Name: "two"}, []string{"at most 1 live VMs", "has 1"}},
		{"vcpus", apikey.Options{Tenant: "cpus", Limits: types.Limits{MaxVCPUs: 1}}, nil,
			api.CreateVMRequest{Name: "big", VCPUs: 2}, []string{"at most 1 vCPUs", "uses 0", "asks for 2"}},
		{"memory from the server's defaults", apikey.Options{Tenant: "mem"}, &api.CreateVMRequest{Name: "small", MemoryMB: 200},
			api.CreateVMRequest{Name: "more", MemoryMB: 128}, []string{"at most 300 MiB", "uses 200 MiB", "128 MiB more"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := c.on(t).as(a.Key(t, tc.key))
			if tc.first != nil {
				k.call("POST", "/v1/vms", tc.first, http.StatusAccepted, nil)
			}
			e := k.fail(k.request("POST", "/v1/vms", tc.second), http.StatusTooManyRequests, api.CodeLimitExceeded)
			for _, m := range tc.message {
				require.Contains(t, e.Error.Message, m)
			}
		})
	}
}

func TestBadRequests(t *testing.T) {
	t.Parallel()
	s := stack.Start(t, stack.Options{Workers: []string{"bad"}})
	a := s.StartAPI(t, stack.APIOptions{MaxBodyBytes: 4096, MaxTTL: 3 * time.Hour})
	c := newClient(t, a, "")
	c = c.as(a.Key(t, apikey.Options{}))
	var vm types.VM
	c.call("POST", "/v1/vms", api.CreateVMRequest{Name: "taken", TTLSeconds: 3600}, http.StatusAccepted, &vm)
	vmPath := "/v1/vms/" + vm.ID
	for _, tc := range []struct {
		name, method, path string
		body               any
		status             int
		code               string
	}{
		{"malformed json", "POST", "/v1/vms", `{"name":`, http.StatusBadRequest, api.CodeInvalidRequest},
		{"not an object", "POST", "/v1/vms", `[1]`, http.StatusBadRequest, api.CodeInvalidRequest},
		{"two values", "POST", "/v1/vms", `{"name":"x"} {}`, http.StatusBadRequest, api.CodeInvalidRequest},
		{"empty body", "POST", "/v1/vms", ``, http.StatusBadRequest, api.CodeInvalidRequest},
		{"unknown field", "POST", "/v1/vms", `{"name":"x","cpus":2}`, http.StatusBadRequest, api.CodeInvalidRequest},
		{"wrong type", "POST", "/v1/vms", `{"name":"x","vcpus":"2"}`, http.StatusBadRequest, api.CodeInvalidRequest},
		{"too large", "POST", "/v1/vms", `{"name":"` + strings.Repeat("x", 5000) + `"}`, http.StatusRequestEntityTooLarge, api.CodeTooLarge},
		{"bad vm id", "GET", "/v1/vms/not-a-uuid", nil, http.StatusBadRequest, api.CodeInvalidRequest},
		{"bad task id", "GET", "/v1/tasks/42", nil, http.StatusBadRequest, api.CodeInvalidRequest},
		{"bad label", "GET", "/v1/vms?label=novalue", nil, http.StatusBadRequest, api.CodeInvalidRequest},
		{"bad limit", "GET", "/v1/vms?limit=-1", nil, http.StatusBadRequest, api.CodeInvalidRequest},
		{"bad after", "GET", "/v1/vms?after=x", nil, http.StatusBadRequest, api.CodeInvalidRequest},
		{"bad wait", "POST", "/v1/vms?wait=maybe", `{"name":"w"}`, http.StatusBadRequest, api.CodeInvalidRequest},
		{"bad task wait", "GET", "/v1/tasks/" + vm.ID + "?wait=soon", nil, http.StatusBadRequest, api.CodeInvalidRequest},
		{"bad stdin", "POST", vmPath + "/exec", `{"command":"cat","stdin_b64":"%%%"}`, http.StatusBadRequest, api.CodeInvalidRequest},
		{"negative vcpus", "POST", "/v1/vms", api.CreateVMRequest{Name: "neg", VCPUs: -1}, http.StatusUnprocessableEntity, api.CodeInvalid},
		{"bad name", "POST", "/v1/vms", api.CreateVMRequest{Name: "no spaces allowed"}, http.StatusUnprocessableEntity, api.CodeInvalid},
		{"bad network", "POST", "/v1/vms", api.CreateVMRequest{Name: "net", Network: "wifi"}, http.StatusUnprocessableEntity, api.CodeInvalid},
		{"negative ttl", "POST", "/v1/vms", api.CreateVMRequest{Name: "ttl", TTLSeconds: -5}, http.StatusUnprocessableEntity, api.CodeInvalid},
		{"ttl over the maximum", "POST", "/v1/vms", api.CreateVMRequest{Name: "ttl", TTLSeconds: 4 * 3600}, http.StatusUnprocessableEntity, api.CodeInvalid},
		{"zero ttl update", "POST", vmPath + "/ttl", api.TTLRequest{}, http.StatusUnprocessableEntity, api.CodeInvalid},
		{"empty command", "POST", vmPath + "/exec", api.ExecRequest{}, http.StatusUnprocessableEntity, api.CodeInvalid},
		{"negative timeout", "POST", vmPath + "/exec", api.ExecRequest{Command: "true", TimeoutSeconds: -1}, http.StatusUnprocessableEntity, api.CodeInvalid},
		{"name taken", "POST", "/v1/vms", api.CreateVMRequest{Name: "taken"}, http.StatusConflict, api.CodeConflict},
		{"missing vm", "GET", "/v1/vms/" + uuid.NewString(), nil, http.StatusNotFound, api.CodeNotFound},
		{"missing execution", "GET", "/v1/executions/" + uuid.NewString(), nil, http.StatusNotFound, api.CodeNotFound},
		{"missing job", "GET", "/v1/jobs/" + uuid.NewString(), nil, http.StatusNotFound, api.CodeNotFound},
		{"cancel missing task", "POST", "/v1/tasks/" + uuid.NewString() + "/cancel", nil, http.StatusNotFound, api.CodeNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := c.on(t)
			req := c.request(tc.method, tc.path, tc.body)
			if tc.status == http.StatusBadRequest || tc.status == http.StatusRequestEntityTooLarge {
				req = offContract(req)
			}
			if tc.name == "negative vcpus" || tc.name == "negative ttl" {
				req = offContract(req) // the schema allows them; the service says why not
			}
			c.fail(req, tc.status, tc.code)
		})
	}

	// TTL: ttl_seconds set expires_at; /ttl moves it.
	require.NotNil(t, vm.ExpiresAt)
	require.WithinDuration(t, time.Now().Add(time.Hour), *vm.ExpiresAt, time.Minute)
	var moved types.VM
	c.call("POST", vmPath+"/ttl", api.TTLRequest{TTLSeconds: 7200}, http.StatusOK, &moved)
	require.NotNil(t, moved.ExpiresAt)
	require.WithinDuration(t, time.Now().Add(2*time.Hour), *moved.ExpiresAt, time.Minute)
	var again types.VM
	c.call("GET", vmPath, nil, http.StatusOK, &again)
	require.Equal(t, moved.ExpiresAt.UTC(), again.ExpiresAt.UTC())
}

func TestVMsAndExec(t *testing.T) {
	t.Parallel()
	s := stack.Start(t, stack.Options{Workers: []string{"exec"}})
	a := s.StartAPI(t, stack.APIOptions{})
	c := newClient(t, a, "")
	c = c.as(a.Key(t, apikey.Options{}))
	vm := c.createVM("exec")
	vmPath := "/v1/vms/" + vm.ID

	t.Run("buffered", func(t *testing.T) {
		c := c.on(t)
		var e types.Execution
		c.call("POST", vmPath+"/exec", api.ExecRequest{Command: "sh", Args: []string{"-c", "echo hi; echo oops >&2; cat; exit 3"},
			StdinB64: base64.StdEncoding.EncodeToString([]byte("in\n")), Env: map[string]string{"A": "b"}}, http.StatusOK, &e)
		require.Equal(t, 3, e.ExitCode)
		require.Equal(t, "hi\nin\n", e.Stdout)
		require.Equal(t, "oops\n", e.Stderr)
		var got types.Execution
		c.call("GET", "/v1/executions/"+e.ID, nil, http.StatusOK, &got)
		require.Equal(t, e.Stdout, got.Stdout)
		var list struct{ Executions []*types.Execution }
		c.call("GET", vmPath+"/executions", nil, http.StatusOK, &list)
		require.NotEmpty(t, list.Executions)
	})

	t.Run("async", func(t *testing.T) {
		c := c.on(t)
		var task types.Task
		c.call("POST", vmPath+"/exec?async=true&stream=true", api.ExecRequest{Command: "sh", Args: []string{"-c", "echo later; exit 2"}}, http.StatusAccepted, &task)
		require.Equal(t, types.TaskVMExecute, task.Type)
		var done types.Task
		c.call("GET", "/v1/tasks/"+task.ID+"?wait=30s", nil, http.StatusOK, &done)
		require.Equal(t, types.TaskSucceeded, done.State)
		var e types.Execution
		c.call("GET", "/v1/executions/"+task.ID, nil, http.StatusOK, &e)
		require.Equal(t, 2, e.ExitCode)
		require.Equal(t, "later\n", e.Stdout)
		// stream=true kept the output for the output route.
		resp := c.send(c.request("GET", "/v1/tasks/"+task.ID+"/output", nil))
		defer resp.Body.Close()
		evs := &events{t: t, sc: newScanner(resp)}
		all := evs.all()
		require.Equal(t, "stdout", all[0].Type, fmtEvents(all))
		require.Equal(t, "exit", all[len(all)-1].Type, fmtEvents(all))
	})

	t.Run("timeout", func(t *testing.T) {
		c := c.on(t)
		var e types.Execution
		c.call("POST", vmPath+"/exec", api.ExecRequest{Command: "sleep", Args: []string{"10"}, TimeoutSeconds: 1}, http.StatusOK, &e)
		require.True(t, e.TimedOut)
	})

	t.Run("streamed", func(t *testing.T) {
		c := c.on(t)
		start := time.Now()
		resp, evs := c.stream(vm.ID, api.ExecRequest{Command: "sh", Args: []string{"-c", "echo hi; sleep 2; echo err >&2; exit 4"}})
		defer resp.Body.Close()
		first := evs.next()
		firstAt := time.Since(start)
		require.Equal(t, "start", first.Type)
		require.NotEmpty(t, first.ExecutionID)
		out := evs.next()
		outAt := time.Since(start)
		require.Equal(t, "stdout", out.Type)
		b, err := base64.StdEncoding.DecodeString(out.DataB64)
		require.NoError(t, err)
		require.Equal(t, "hi\n", string(b))
		rest := evs.all()
		endAt := time.Since(start)
		t.Logf("start line after %s, first stdout after %s, end after %s", firstAt, outAt, endAt)
		require.Less(t, outAt, 1500*time.Millisecond, "the first line must arrive before the command ends")
		require.GreaterOrEqual(t, endAt, 2*time.Second)
		require.Len(t, rest, 2, fmtEvents(rest))
		require.Equal(t, "stderr", rest[0].Type)
		require.Equal(t, "exit", rest[1].Type)
		require.Equal(t, 4, *rest[1].ExitCode)
		require.False(t, *rest[1].TimedOut)

		// The same stream again, from its start, at /v1/tasks/{id}/output.
		r := c.request("GET", "/v1/tasks/"+first.ExecutionID+"/output", nil)
		resp2 := c.send(r)
		defer resp2.Body.Close()
		require.Equal(t, http.StatusOK, resp2.StatusCode)
		replay := (&events{t: t, sc: newScanner(resp2)}).all()
		require.Len(t, replay, 3, fmtEvents(replay))
		require.Equal(t, []string{"stdout", "stderr", "exit"}, []string{replay[0].Type, replay[1].Type, replay[2].Type})

		var e types.Execution
		c.call("GET", "/v1/executions/"+first.ExecutionID, nil, http.StatusOK, &e)
		require.Equal(t, 4, e.ExitCode)
		c.fail(c.request("GET", "/v1/tasks/"+vm.ID+"/output", nil), http.StatusUnprocessableEntity, api.CodeInvalid)
	})

	t.Run("client leaves, command goes on", func(t *testing.T) {
		c := c.on(t)
		resp, evs := c.stream(vm.ID, api.ExecRequest{Command: "sh", Args: []string{"-c", "sleep 1; echo still here"}})
		start := evs.next()
		require.Equal(t, "start", start.Type)
		require.NoError(t, resp.Body.Close())
		var task types.Task
		c.call("GET", "/v1/tasks/"+start.ExecutionID+"?wait=30s", nil, http.StatusOK, &task)
		require.Equal(t, types.TaskSucceeded, task.State, task.Error)
		var e types.Execution
		c.call("GET", "/v1/executions/"+start.ExecutionID, nil, http.StatusOK, &e)
		require.Equal(t, "still here\n", e.Stdout)
	})

	t.Run("job and cancel", func(t *testing.T) {
		c := c.on(t)
		var task types.Task
		c.call("POST", vmPath+"/jobs", api.JobRequest{Commands: []api.ExecRequest{{Command: "echo", Args: []string{"one"}}, {Command: "false"}, {Command: "echo", Args: []string{"never"}}},
			StopOnFailure: true}, http.StatusAccepted, &task)
		c.call("GET", "/v1/tasks/"+task.ID+"?wait=60s", nil, http.StatusOK, &task)
		require.True(t, task.State.Terminal())
		var job types.Job
		c.call("GET", "/v1/jobs/"+task.ID, nil, http.StatusOK, &job)
		require.Equal(t, types.JobFailed, job.State)
		require.Len(t, job.Executions, 2)

		c.call("POST", vmPath+"/jobs", api.JobRequest{Commands: []api.ExecRequest{{Command: "sleep", Args: []string{"30"}}}}, http.StatusAccepted, &task)
		// Cancel once the command runs: a cancel that lands while the
		// worker is still starting the job is retried by the worker
		// (a worker-side race, not the API's).
		require.Eventually(t, func() bool {
			c.call("GET", "/v1/jobs/"+task.ID, nil, http.StatusOK, &job)
			return job.State == types.JobRunning
		}, 30*time.Second, 20*time.Millisecond)
		time.Sleep(100 * time.Millisecond)
		c.call("POST", "/v1/tasks/"+task.ID+"/cancel", nil, http.StatusOK, &task)
		require.Equal(t, types.TaskFailed, task.State)
		require.Equal(t, "cancelled", task.Error)
	})

	t.Run("stop, start and delete", func(t *testing.T) {
		c := c.on(t)
		var task types.Task
		c.call("POST", vmPath+"/stop?wait=true", nil, http.StatusOK, &task)
		require.Equal(t, types.TaskSucceeded, task.State, task.Error)
		e := c.fail(c.request("POST", vmPath+"/exec", api.ExecRequest{Command: "true"}), http.StatusConflict, api.CodeConflict)
		require.Contains(t, e.Error.Message, "stopped")
		c.call("POST", vmPath+"/start", nil, http.StatusAccepted, &task)
		c.call("GET", "/v1/tasks/"+task.ID+"?wait=60", nil, http.StatusOK, &task)
		require.Equal(t, types.TaskSucceeded, task.State, task.Error)
		c.call("DELETE", vmPath+"?wait=true", nil, http.StatusNoContent, nil)
		var gone types.VM
		c.call("GET", vmPath, nil, http.StatusOK, &gone)
		require.Equal(t, types.VMDeleted, gone.State)
		var list api.VMList
		c.call("GET", "/v1/vms", nil, http.StatusOK, &list)
		require.Empty(t, list.VMs)
	})
}

// breakingStream is a Redis queue whose output stream breaks after its
// first chunk, as when Redis restarts mid-command.
type breakingStream struct{ *queue.Redis }

func (b breakingStream) ReadOutput(ctx context.Context, taskID string, fn func(queue.OutputChunk) error) (*queue.ExitInfo, error) {
	errBroke := errors.New("read tcp: connection reset by peer")
	ei, err := b.Redis.ReadOutput(ctx, taskID, func(c queue.OutputChunk) error {
		if err := fn(c); err != nil {
			return err
		}
		return errBroke
	})
	if errors.Is(err, errBroke) {
		return nil, fmt.Errorf("reading output of task %s: %w", taskID, err)
	}
	return ei, err
}

// TestExecStreamBreaks: when Redis loses a streamed exec's output midway,
// the HTTP stream still ends with the real exit code and every byte of the
// output once, from what PostgreSQL recorded, not with an error line.
func TestExecStreamBreaks(t *testing.T) {
	t.Parallel()
	s := stack.Start(t, stack.Options{Workers: []string{"broken"}})
	a := s.StartAPI(t, stack.APIOptions{Service: service.NewTaskService(breakingStream{s.Queue}, s.Store,
		service.WithDataPlane(dataplane.NewClient(s.Token)))})
	c := newClient(t, a, "")
	c = c.as(a.Key(t, apikey.Options{}))
	vm := c.createVM("broken")
	resp, evs := c.stream(vm.ID, api.ExecRequest{Command: "sh", Args: []string{"-c", "echo one; sleep 1; echo two; echo err >&2; exit 7"}})
	defer resp.Body.Close()
	all := evs.all()
	var out, errOut strings.Builder
	for _, ev := range all {
		b, err := base64.StdEncoding.DecodeString(ev.DataB64)
		require.NoError(t, err)
		switch ev.Type {
		case "stdout":
			out.Write(b)
		case "stderr":
			errOut.Write(b)
		}
	}
	last := all[len(all)-1]
	require.Equal(t, "exit", last.Type, fmtEvents(all))
	require.Equal(t, 7, *last.ExitCode)
	require.Equal(t, "one\ntwo\n", out.String(), fmtEvents(all))
	require.Equal(t, "err\n", errOut.String())
}
