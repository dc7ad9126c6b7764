package api_test

import (
	"net/http"
	"os/exec"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/api"
	"github.com/aetherium/aetherium-core/pkg/apikey"
	"github.com/aetherium/aetherium-core/pkg/tools"
	"github.com/aetherium/aetherium-core/pkg/tools/toolstest"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// TestTools: tools on POST /v1/vms and the /v1/vms/{id}/tools routes,
// every request and answer checked against openapi.yaml.
func TestTools(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath(tools.MiseBinaryDefault); err != nil {
		testenv.Skip(t, "mise is not installed (%v); install it with `sudo scripts/setup.sh`", err)
	}
	srv := toolstest.NewServer(t)
	inst, err := tools.NewMise(tools.Config{Root: t.TempDir(), AllowPrivateURLs: true})
	require.NoError(t, err)
	s := stack.Start(t, stack.Options{Workers: []string{"tools"}, Tools: inst})
	a := s.StartAPI(t, stack.APIOptions{})
	c := newClient(t, a, a.Key(t, apikey.Options{Tenant: "tenant-a"}))
	other := c.as(a.Key(t, apikey.Options{Tenant: "tenant-b"}))
	spec := srv.Spec("1.0.0")

	var vm types.VM
	c.call("POST", "/v1/vms?wait=true", api.CreateVMRequest{Name: "tooled", Tools: []string{spec}}, http.StatusCreated, &vm)
	var list api.VMToolList
	c.call("GET", "/v1/vms/"+vm.ID+"/tools", nil, http.StatusOK, &list)
	require.Len(t, list.Tools, 2)
	require.Equal(t, spec, list.Tools[0].Spec)
	require.Equal(t, tools.MiseTool, list.Tools[1].Tool)

	e := c.fail(c.request("POST", "/v1/vms", api.CreateVMRequest{Name: "bad", Tools: []string{"node@22", "x y"}}), http.StatusUnprocessableEntity, api.CodeInvalid)
	require.Contains(t, e.Error.Message, `"x y"`)

	plain := c.createVM("plain")
	c.call("GET", "/v1/vms/"+plain.ID+"/tools", nil, http.StatusOK, &list)
	require.Empty(t, list.Tools)
	require.NotNil(t, list.Tools, "an empty list, not null")

	c.fail(c.request("POST", "/v1/vms/"+plain.ID+"/tools", `{"specs":[]}`), http.StatusUnprocessableEntity, api.CodeInvalid)
	c.fail(c.request("POST", "/v1/vms/"+plain.ID+"/tools", api.ToolsInstallRequest{Specs: []string{"$(reboot)@1"}}), http.StatusUnprocessableEntity, api.CodeInvalid)
	c.fail(offContract(c.request("POST", "/v1/vms/"+plain.ID+"/tools", `{"spec":["node@22"]}`)), http.StatusBadRequest, api.CodeInvalidRequest)
	other.fail(other.request("POST", "/v1/vms/"+plain.ID+"/tools", api.ToolsInstallRequest{Specs: []string{spec}}), http.StatusNotFound, api.CodeNotFound)
	other.fail(other.request("GET", "/v1/vms/"+plain.ID+"/tools", nil), http.StatusNotFound, api.CodeNotFound)

	var task types.Task
	c.call("POST", "/v1/vms/"+plain.ID+"/tools?wait=true", api.ToolsInstallRequest{Specs: []string{spec}}, http.StatusOK, &task)
	require.Equal(t, types.TaskToolsInstall, task.Type)
	require.Equal(t, types.TaskSucceeded, task.State, task.Error)
	c.call("GET", "/v1/vms/"+plain.ID+"/tools", nil, http.StatusOK, &list)
	require.Len(t, list.Tools, 1, "the tool; mise comes only with a create")
	require.Equal(t, 1, srv.Requests(), "one download for both VMs")

	c.call("POST", "/v1/vms/"+plain.ID+"/tools", api.ToolsInstallRequest{Specs: []string{srv.Spec("2.0.0")}}, http.StatusAccepted, &task)
	require.Equal(t, types.TaskPending, task.State)
}
