package cli

import (
	"bytes"
	"context"
	"io"
	"testing"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// execFake answers Exec with a fixed result; every other method is nil
// and panics if called.
type execFake struct {
	service.TaskService
	res *service.ExecResult
}

func (f execFake) Exec(_ context.Context, _ string, _ types.Command, stdout, _ io.Writer) (*service.ExecResult, error) {
	_, _ = io.WriteString(stdout, "partial\n")
	return f.res, nil
}

// TestExecExitCodes: how an interactive command ended maps to the exit
// code and the message: its own code, 124 on timeout, 1 when it could not
// run, 3 when it started but its outcome is unknown.
func TestExecExitCodes(t *testing.T) {
	task := uuid.New()
	unknown := types.ErrOutcomeUnknown.Error() + ": the worker stopped while the command ran"
	cases := []struct {
		name    string
		res     service.ExecResult
		code    int
		wantErr string
	}{
		{"success", service.ExecResult{}, 0, ""},
		{"own code", service.ExecResult{ExitCode: 42}, 42, ""},
		{"timed out", service.ExecResult{TimedOut: true, ExitCode: -1}, exitTimedOut, "timed out"},
		{"could not run", service.ExecResult{Err: "vm is gone"}, 1, "the command could not run: vm is gone"},
		{"outcome unknown", service.ExecResult{Err: unknown, OutcomeUnknown: true}, 3,
			"aether-cli: the worker stopped while the command ran; its result is unknown (task " + task.String() + ")"},
		{"outcome unknown from the text", service.ExecResult{Err: unknown}, 3, "its result is unknown"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			res := tc.res
			res.TaskID = task
			a := &app{stdout: &out, stderr: &errb, svc: execFake{res: &res}}
			err := a.execInteractive(context.Background(), a.svc, uuid.NewString(), types.Command{Cmd: "true"})
			require.Equal(t, tc.code, ExitCode(err))
			require.Equal(t, "partial\n", out.String())
			if tc.wantErr != "" {
				msg := errb.String()
				if err != nil && ExitCode(err) == 1 {
					msg = err.Error()
				}
				require.Contains(t, msg, tc.wantErr)
			}
		})
	}
}
