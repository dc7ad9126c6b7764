package client

import (
	"cmp"
	"context"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/api/wire"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

var _ service.TaskService = (*Client)(nil)

// vmPath is the path of VM id, plus sub-resources.
func vmPath(id string, sub ...string) string {
	p := "/v1/vms/" + url.PathEscape(id)
	for _, s := range sub {
		p += "/" + s
	}
	return p
}

// parseUUID reads an id the server returned.
func parseUUID(kind, s string) (uuid.UUID, error) {
	id, err := uuid.Parse(s)
	if err != nil {
		return uuid.Nil, fmt.Errorf("the API answered a %s id %q that is not a UUID", kind, s)
	}
	return id, nil
}

func (c *Client) CreateVMTask(ctx context.Context, name string, vcpus, memoryMB int) (uuid.UUID, error) {
	return c.CreateVMTaskWithOptions(ctx, service.CreateVMOptions{Name: name, VCPUs: vcpus, MemoryMB: memoryMB})
}

// CreateVMTaskWithOptions: a TTL is sent in whole seconds, rounded up.
func (c *Client) CreateVMTaskWithOptions(ctx context.Context, o service.CreateVMOptions) (uuid.UUID, error) {
	// The API fills in vcpus and memory left out; the TaskService
	// contract, as the local service keeps it, refuses them instead.
	spec := types.VMSpec{Name: o.Name, VCPUs: o.VCPUs, MemoryMB: o.MemoryMB, Labels: o.Labels, Env: o.Env, Network: cmp.Or(o.Network, types.NetworkNone)}
	if o.FromSnapshot != "" || o.Template != "" {
		// A clone takes its snapshot's size, which only the server
		// knows: check the rest here.
		spec.VCPUs, spec.MemoryMB = cmp.Or(spec.VCPUs, 1), cmp.Or(spec.MemoryMB, types.MinMemoryMB)
	}
	if err := spec.Validate(0); err != nil { // the host's CPU bound is the server's to check
		return uuid.Nil, err
	}
	if o.TTL < 0 {
		return uuid.Nil, fmt.Errorf("%w: ttl %s is negative", types.ErrInvalid, o.TTL)
	}
	var vm types.VM
	err := c.doJSON(ctx, http.MethodPost, "/v1/vms", nil, wire.CreateVMRequest{Name: o.Name, VCPUs: o.VCPUs, MemoryMB: o.MemoryMB,
		Network: o.Network, Labels: o.Labels, Env: o.Env, TTLSeconds: wire.Seconds(o.TTL), OnExpiry: o.OnExpiry, Tools: o.Tools,
		FromSnapshot: o.FromSnapshot, Template: o.Template}, &vm)
	if err != nil {
		return uuid.Nil, err
	}
	return parseUUID("vm", vm.ID)
}

func (c *Client) ExecuteCommandTask(ctx context.Context, vmID, command string, args []string) (uuid.UUID, error) {
	return c.ExecuteCommandTaskWithOptions(ctx, vmID, types.Command{Cmd: command, Args: args}, service.ExecOptions{})
}

func (c *Client) RunJobTask(ctx context.Context, vmID string, cmds []types.Command, stopOnFailure bool) (uuid.UUID, error) {
	body := struct {
		Commands      []wire.ExecRequest `json:"commands"`
		StopOnFailure bool               `json:"stop_on_failure"`
	}{Commands: make([]wire.ExecRequest, 0, len(cmds)), StopOnFailure: stopOnFailure}
	for _, cmd := range cmds {
		body.Commands = append(body.Commands, wire.NewExecRequest(cmd))
	}
	return c.taskCall(ctx, http.MethodPost, vmPath(vmID, "jobs"), body)
}

func (c *Client) DeleteVMTask(ctx context.Context, vmID string) (uuid.UUID, error) {
	return c.taskCall(ctx, http.MethodDelete, vmPath(vmID), nil)
}

func (c *Client) StopVMTask(ctx context.Context, vmID string) (uuid.UUID, error) {
	return c.taskCall(ctx, http.MethodPost, vmPath(vmID, "stop"), nil)
}

func (c *Client) StartVMTask(ctx context.Context, vmID string) (uuid.UUID, error) {
	return c.taskCall(ctx, http.MethodPost, vmPath(vmID, "start"), nil)
}

// taskCall makes a call answered by a task and returns the task's id.
func (c *Client) taskCall(ctx context.Context, method, path string, in any) (uuid.UUID, error) {
	var t types.Task
	if err := c.doJSON(ctx, method, path, nil, in, &t); err != nil {
		return uuid.Nil, err
	}
	return parseUUID("task", t.ID)
}

func (c *Client) GetVM(ctx context.Context, vmID uuid.UUID) (*types.VM, error) {
	var vm types.VM
	if err := c.doJSON(ctx, http.MethodGet, vmPath(vmID.String()), nil, nil, &vm); err != nil {
		return nil, err
	}
	return &vm, nil
}

func (c *Client) GetVMStatus(ctx context.Context, vmID uuid.UUID) (types.VMState, error) {
	vm, err := c.GetVM(ctx, vmID)
	if err != nil {
		return "", err
	}
	return vm.State, nil
}

func (c *Client) ListVMs(ctx context.Context) ([]*types.VM, error) {
	return c.ListVMsWithOptions(ctx, service.ListVMsOptions{})
}

// ListVMsWithOptions: without a Limit it follows the server's pages to the
// end, so that the answer is every VM, as from the local service.
func (c *Client) ListVMsWithOptions(ctx context.Context, o service.ListVMsOptions) ([]*types.VM, error) {
	if o.Limit < 0 {
		return nil, fmt.Errorf("%w: limit %d is negative", types.ErrInvalid, o.Limit)
	}
	var all []*types.VM
	after := o.After
	for {
		q := url.Values{}
		for k, v := range o.Labels {
			q.Add("label", k+"="+v)
		}
		if o.Limit > 0 {
			q.Set("limit", fmt.Sprint(o.Limit-len(all)))
		}
		if after != "" {
			q.Set("after", after)
		}
		var page struct {
			VMs  []*types.VM `json:"vms"`
			Next string      `json:"next"`
		}
		if err := c.doJSON(ctx, http.MethodGet, "/v1/vms", q, nil, &page); err != nil {
			return nil, err
		}
		all = append(all, page.VMs...)
		if page.Next == "" || page.Next == after || len(page.VMs) == 0 || (o.Limit > 0 && len(all) >= o.Limit) {
			return all, nil
		}
		after = page.Next
	}
}

// SetVMTTL: the TTL is sent in whole seconds, rounded up.
func (c *Client) SetVMTTL(ctx context.Context, vmID uuid.UUID, ttl time.Duration) (*types.VM, error) {
	if ttl <= 0 {
		return nil, fmt.Errorf("%w: ttl %s must be positive, e.g. 10m", types.ErrInvalid, ttl)
	}
	var vm types.VM
	body := struct {
		TTLSeconds int64 `json:"ttl_seconds"`
	}{wire.Seconds(ttl)}
	if err := c.doJSON(ctx, http.MethodPost, vmPath(vmID.String(), "ttl"), nil, body, &vm); err != nil {
		return nil, err
	}
	return &vm, nil
}

func (c *Client) GetExecutions(ctx context.Context, vmID uuid.UUID) ([]*types.Execution, error) {
	var out struct {
		Executions []*types.Execution `json:"executions"`
	}
	if err := c.doJSON(ctx, http.MethodGet, vmPath(vmID.String(), "executions"), nil, nil, &out); err != nil {
		return nil, err
	}
	return out.Executions, nil
}

func (c *Client) GetExecution(ctx context.Context, id uuid.UUID) (*types.Execution, error) {
	var e types.Execution
	if err := c.doJSON(ctx, http.MethodGet, "/v1/executions/"+id.String(), nil, nil, &e); err != nil {
		return nil, err
	}
	return &e, nil
}

func (c *Client) GetTask(ctx context.Context, id uuid.UUID) (*types.Task, error) {
	var t types.Task
	if err := c.doJSON(ctx, http.MethodGet, "/v1/tasks/"+id.String(), nil, nil, &t); err != nil {
		return nil, err
	}
	return &t, nil
}

// WaitTask long-polls the server (WaitPoll at a time) until the task ends.
func (c *Client) WaitTask(ctx context.Context, id uuid.UUID) (*types.Task, error) {
	q := url.Values{"wait": {WaitPoll.String()}}
	var last *types.Task
	for {
		var t types.Task
		err := c.doJSON(ctx, http.MethodGet, "/v1/tasks/"+id.String(), q, nil, &t)
		if err != nil {
			if ctx.Err() != nil {
				state := types.TaskState("unknown")
				if last != nil {
					state = last.State
				}
				return last, fmt.Errorf("waiting for task %s (still %s): %w", id, state, ctx.Err())
			}
			return nil, err
		}
		last = &t
		if t.State.Terminal() {
			return &t, nil
		}
		if err := ctx.Err(); err != nil {
			return &t, fmt.Errorf("waiting for task %s (still %s): %w", id, t.State, err)
		}
	}
}

func (c *Client) CancelTask(ctx context.Context, id uuid.UUID) error {
	return c.doJSON(ctx, http.MethodPost, "/v1/tasks/"+id.String()+"/cancel", nil, nil, nil)
}

func (c *Client) GetJob(ctx context.Context, id uuid.UUID) (*types.Job, error) {
	var j types.Job
	if err := c.doJSON(ctx, http.MethodGet, "/v1/jobs/"+id.String(), nil, nil, &j); err != nil {
		return nil, err
	}
	return &j, nil
}

func (c *Client) ListWorkers(ctx context.Context) ([]*types.Worker, error) {
	var out struct {
		Workers []*types.Worker `json:"workers"`
	}
	if err := c.doJSON(ctx, http.MethodGet, "/v1/workers", nil, nil, &out); err != nil {
		return nil, err
	}
	return out.Workers, nil
}

func (c *Client) InstallToolsTask(ctx context.Context, vmID string, specs []string) (uuid.UUID, error) {
	if len(specs) == 0 {
		return uuid.Nil, fmt.Errorf("%w: no tool spec given; name at least one, e.g. node@22", types.ErrInvalid)
	}
	return c.taskCall(ctx, http.MethodPost, vmPath(vmID, "tools"), wire.ToolsInstallRequest{Specs: specs})
}

func (c *Client) ListVMTools(ctx context.Context, vmID uuid.UUID) ([]types.VMTool, error) {
	var out wire.VMToolList
	if err := c.doJSON(ctx, http.MethodGet, vmPath(vmID.String(), "tools"), nil, nil, &out); err != nil {
		return nil, err
	}
	return out.Tools, nil
}
