package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"

	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Exit codes of exec besides the command's own.
const (
	exitTimedOut    = bootparams.ExitTimedOut // as coreutils timeout
	exitInterrupted = 130                     // 128 + SIGINT
	// exitOutcomeUnknown: the command started but its outcome is unknown
	// (its worker was lost); it was not run again.
	exitOutcomeUnknown = 3
)

func (a *app) execCmd() *cobra.Command {
	var (
		env     []string
		cwd     string
		user    string
		timeout time.Duration
	)
	cmd := &cobra.Command{
		Use:   "exec [--env K=V]... [--cwd DIR] [--timeout 30s] ID -- CMD [ARGS...]",
		Short: "Run a command in a VM, streaming its output, and exit with its exit code",
		Long: `Run a command in a VM. Its stdout and stderr are streamed to this
process's stdout and stderr as they are produced; piped stdin is passed
through; Ctrl-C ends the remote command. The exit code is the command's
(124 when --timeout expired, 130 when interrupted); 1 when the command
could not run; 3 when the command started but its outcome is unknown
(the worker running it was lost); it was not run again.`,
		Args: args(cobra.MinimumNArgs(2)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			vmID, rest := argv[0], argv[1:]
			if rest[0] == "--" {
				rest = rest[1:]
			}
			if len(rest) == 0 {
				return usageError{fmt.Errorf("exec: no command given; use `aether-cli exec ID -- CMD [ARGS...]`")}
			}
			if _, err := parseUUID("vm", vmID); err != nil {
				return err
			}
			envMap, err := parseKV("env", env)
			if err != nil {
				return err
			}
			c := types.Command{Cmd: rest[0], Args: rest[1:], Env: envMap, Cwd: cwd, User: user, Timeout: timeout}
			if c.Stdin, err = readPipedStdin(a.stdin); err != nil {
				return err
			}
			svc, err := a.service(cmd.Context())
			if err != nil {
				return err
			}
			if a.json {
				return a.execJSON(cmd.Context(), svc, vmID, c)
			}
			return a.execInteractive(cmd.Context(), svc, vmID, c)
		},
	}
	f := cmd.Flags()
	f.SetInterspersed(false) // flags after ID belong to the command
	f.StringArrayVarP(&env, "env", "e", nil, "environment KEY=VALUE (repeatable)")
	f.StringVarP(&cwd, "cwd", "w", "", "working directory in the VM")
	f.StringVarP(&user, "user", "u", "", "user to run as in the VM")
	f.DurationVar(&timeout, "timeout", 0, "kill the command after this long, e.g. 30s (default: none)")
	return cmd
}

// readPipedStdin reads stdin when it is a pipe or file, not a terminal.
func readPipedStdin(r io.Reader) ([]byte, error) {
	f, ok := r.(*os.File)
	if !ok {
		if r == nil {
			return nil, nil
		}
		return readLimited(r)
	}
	st, err := f.Stat()
	if err != nil || st.Mode()&os.ModeCharDevice != 0 {
		return nil, nil // a terminal, /dev/null or closed: no stdin
	}
	return readLimited(f)
}

func readLimited(r io.Reader) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, types.MaxStdinBytes+1))
	if err != nil {
		return nil, fmt.Errorf("reading stdin: %w", err)
	}
	if len(b) > types.MaxStdinBytes {
		return nil, fmt.Errorf("%w: stdin is larger than %d bytes; copy large inputs into the VM instead", types.ErrInvalid, types.MaxStdinBytes)
	}
	if len(b) == 0 {
		return nil, nil
	}
	return b, nil
}

func (a *app) execInteractive(ctx context.Context, svc service.TaskService, vmID string, c types.Command) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := svc.Exec(ctx, vmID, c, a.stdout, a.stderr)
	interrupted := ctx.Err() != nil
	switch {
	case err != nil && !errors.Is(err, context.Canceled):
		return err
	case interrupted:
		return exitError{exitInterrupted}
	case res.OutcomeUnknown || types.OutcomeUnknown(res.Err):
		return a.outcomeUnknown(res.TaskID)
	case res.Err != "":
		return fmt.Errorf("the command could not run: %s", res.Err)
	case res.TimedOut:
		fmt.Fprintf(a.stderr, "aether-cli: command timed out after %s and was killed\n", c.Timeout)
		return exitError{exitTimedOut}
	case res.ExitCode != 0:
		return exitError{res.ExitCode}
	}
	return nil
}

func (a *app) execJSON(ctx context.Context, svc service.TaskService, vmID string, c types.Command) error {
	id, err := svc.ExecuteCommandTaskWithOptions(ctx, vmID, c, service.ExecOptions{})
	if err != nil {
		return err
	}
	t, err := svc.WaitTask(ctx, id)
	switch {
	case err != nil:
		return err
	case t.State == types.TaskFailed && types.OutcomeUnknown(t.Error):
		return a.outcomeUnknown(id)
	case t.State == types.TaskFailed:
		return fmt.Errorf("task %s (%s) failed: %s", t.ID, t.Type, t.Error)
	}
	e, err := svc.GetExecution(ctx, id)
	if err != nil {
		return err
	}
	if err := a.printJSON(newExecutionView(e)); err != nil {
		return err
	}
	if e.TimedOut {
		return exitError{exitTimedOut}
	}
	if e.ExitCode != 0 {
		return exitError{e.ExitCode}
	}
	return nil
}

func (a *app) executionsCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "executions ID",
		Short: "List the commands run in a VM, oldest first",
		Args:  args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			id, err := parseUUID("vm", argv[0])
			if err != nil {
				return err
			}
			svc, err := a.service(cmd.Context())
			if err != nil {
				return err
			}
			execs, err := svc.GetExecutions(cmd.Context(), id)
			if err != nil {
				return err
			}
			if a.json {
				out := make([]executionView, 0, len(execs))
				for _, e := range execs {
					out = append(out, newExecutionView(e))
				}
				return a.printJSON(out)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tEXIT\tDURATION\tSTARTED\tCOMMAND")
			for _, e := range execs {
				code := fmt.Sprint(e.ExitCode)
				if e.TimedOut {
					code += " (timeout)"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", e.ID, code, e.Duration.Round(time.Millisecond),
					e.StartedAt.Format(time.RFC3339), shellJoin(e.Command, e.Args))
			}
			return tw.Flush()
		},
	}
}

func shellJoin(cmd string, args []string) string {
	s := cmd
	for _, a := range args {
		s += " " + fmt.Sprintf("%q", a)
	}
	return s
}

// outcomeUnknown tells the user that a command started but its result is
// lost, and exits 3 (a command that never ran exits 1).
func (a *app) outcomeUnknown(taskID uuid.UUID) error {
	fmt.Fprintf(a.stderr, "aether-cli: the worker stopped while the command ran; its result is unknown (task %s)\n", taskID)
	return exitError{exitOutcomeUnknown}
}
