package cli

import (
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/aetherium/aetherium-core/pkg/types"
)

func (a *app) taskCmd() *cobra.Command {
	task := &cobra.Command{Use: "task", Short: "Inspect, wait for and cancel tasks"}
	for _, wait := range []bool{false, true} {
		name, short := "get", "Show a task"
		if wait {
			name, short = "wait", "Wait until a task succeeds or fails, then show it (exit 1 if it failed)"
		}
		task.AddCommand(&cobra.Command{
			Use:   name + " TASK_ID",
			Short: short,
			Args:  args(cobra.ExactArgs(1)),
			RunE: func(cmd *cobra.Command, argv []string) error {
				id, err := parseUUID("task", argv[0])
				if err != nil {
					return err
				}
				svc, err := a.service(cmd.Context())
				if err != nil {
					return err
				}
				t, err := svc.GetTask(cmd.Context(), id)
				if wait && err == nil {
					t, err = svc.WaitTask(cmd.Context(), id)
				}
				if err != nil {
					return err
				}
				if a.json {
					err = a.printJSON(newTaskView(t))
				} else {
					tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
					fmt.Fprintf(tw, "id\t%s\ntype\t%s\nstate\t%s\nattempts\t%d\n", t.ID, t.Type, t.State, t.Attempts)
					if t.VMID != "" {
						fmt.Fprintf(tw, "vm\t%s\n", t.VMID)
					}
					if t.Error != "" {
						fmt.Fprintf(tw, "error\t%s\n", t.Error)
					}
					if len(t.Result) > 0 {
						fmt.Fprintf(tw, "result\t%s\n", t.Result)
					}
					err = tw.Flush()
				}
				if err == nil && wait && t.State == types.TaskFailed {
					return exitError{1}
				}
				return err
			},
		})
	}
	task.AddCommand(a.taskCancelCmd())
	return task
}

// taskCancelCmd cancels a task and prints its state afterwards.
func (a *app) taskCancelCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "cancel TASK_ID",
		Short: "Cancel a task: dequeued if it has not started, its command killed if it runs; print its new state",
		Long: `Cancel a task. One that has not started is removed from its queue; one
that runs is asked to stop (a command is killed in the guest). The task
ends failed with "cancelled", and its new state is printed. Cancelling a
task that already ended changes nothing and says so (exit 0). A task id
that is not a UUID exits 2, an unknown task 1.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			id, err := parseUUID("task", argv[0])
			if err != nil {
				return err
			}
			svc, err := a.service(cmd.Context())
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			t, err := svc.GetTask(ctx, id)
			if err != nil {
				return err
			}
			ended := t.State.Terminal()
			if !ended {
				if err := svc.CancelTask(ctx, id); err != nil {
					return err
				}
				if t, err = svc.GetTask(ctx, id); err != nil {
					return err
				}
			}
			if a.json {
				return a.printJSON(newTaskView(t))
			}
			switch {
			case ended:
				fmt.Fprintf(a.stdout, "task %s had already ended: %s", t.ID, t.State)
			default:
				fmt.Fprintf(a.stdout, "task %s cancelled: %s", t.ID, t.State)
			}
			if t.Error != "" {
				fmt.Fprintf(a.stdout, " (%s)", t.Error)
			}
			fmt.Fprintln(a.stdout)
			return nil
		},
	}
}

func (a *app) jobCmd() *cobra.Command {
	job := &cobra.Command{Use: "job", Short: "Run ordered lists of commands"}
	var (
		cmds     []string
		keepGoin bool
		wait     bool
	)
	run := &cobra.Command{
		Use:   "run VM_ID --cmd 'SHELL LINE' [--cmd ...] [--keep-going] [--wait]",
		Short: "Run shell lines in order in a VM (stops at the first failure unless --keep-going)",
		Args:  args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			if len(cmds) == 0 {
				return usageError{fmt.Errorf("job run: give at least one --cmd")}
			}
			list := make([]types.Command, 0, len(cmds))
			for _, c := range cmds {
				list = append(list, types.Command{Cmd: "sh", Args: []string{"-c", c}})
			}
			if _, err := parseUUID("vm", argv[0]); err != nil {
				return err
			}
			svc, err := a.service(cmd.Context())
			if err != nil {
				return err
			}
			id, err := svc.RunJobTask(cmd.Context(), argv[0], list, !keepGoin)
			if err != nil {
				return err
			}
			if wait {
				if _, err := svc.WaitTask(cmd.Context(), id); err != nil {
					return err
				}
				return a.showJob(cmd, id.String())
			}
			fmt.Fprintln(a.stdout, id)
			return nil
		},
	}
	run.Flags().StringArrayVar(&cmds, "cmd", nil, "a shell line to run with sh -c (repeatable, in order)")
	run.Flags().BoolVar(&keepGoin, "keep-going", false, "run every command even after one fails")
	run.Flags().BoolVar(&wait, "wait", false, "wait for the job and show it")
	get := &cobra.Command{
		Use:   "get JOB_ID",
		Short: "Show a job and its executions",
		Args:  args(cobra.ExactArgs(1)),
		RunE:  func(cmd *cobra.Command, argv []string) error { return a.showJob(cmd, argv[0]) },
	}
	job.AddCommand(run, get)
	return job
}

func (a *app) showJob(cmd *cobra.Command, jobID string) error {
	id, err := parseUUID("job", jobID)
	if err != nil {
		return err
	}
	svc, err := a.service(cmd.Context())
	if err != nil {
		return err
	}
	j, err := svc.GetJob(cmd.Context(), id)
	if err != nil {
		return err
	}
	if a.json {
		execs := make([]executionView, 0, len(j.Executions))
		for _, e := range j.Executions {
			execs = append(execs, newExecutionView(e))
		}
		return a.printJSON(map[string]any{"id": j.ID, "vm_id": j.VMID, "state": j.State, "error": j.Error, "executions": execs})
	}
	fmt.Fprintf(a.stdout, "job %s: %s %s\n", j.ID, j.State, j.Error)
	for _, e := range j.Executions {
		fmt.Fprintf(a.stdout, "  exit %d  %s\n", e.ExitCode, strings.TrimSpace(shellJoin(e.Command, e.Args)))
	}
	if j.State == types.JobFailed {
		return exitError{1}
	}
	return nil
}
