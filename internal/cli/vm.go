package cli

import (
	"cmp"
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"

	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

func (a *app) vmCmd() *cobra.Command {
	vm := &cobra.Command{Use: "vm", Short: "Create, inspect and delete VMs"}
	vm.AddCommand(a.vmCreateCmd(), a.vmListCmd(), a.vmGetCmd(), a.vmTTLCmd(),
		a.vmTaskCmd("delete", "Delete a VM and everything it holds", service.TaskService.DeleteVMTask),
		a.vmTaskCmd("stop", "Stop a running VM", service.TaskService.StopVMTask),
		a.vmTaskCmd("start", "Start a stopped VM", service.TaskService.StartVMTask),
		a.vmTaskCmd("pause", "Pause a running VM: its vCPUs freeze, its memory stays", vmOp(service.Snapshots.PauseVMTask)),
		a.vmTaskCmd("resume", "Resume a paused or suspended VM", vmOp(service.Snapshots.ResumeVMTask)),
		a.vmTaskCmd("suspend", "Save a running or paused VM's memory to disk and end its VMM; resume restores it", vmOp(service.Snapshots.SuspendVMTask)))
	return vm
}

func (a *app) vmCreateCmd() *cobra.Command {
	var (
		o                  service.CreateVMOptions
		labels, env, specs []string
		wait               bool
	)
	cmd := &cobra.Command{
		Use:   "create --name NAME [--vcpus N] [--memory MiB] [--ttl 10m] [--tools SPEC,...] [--template T | --from-snapshot S] [--wait]",
		Short: "Create a VM and print its id",
		Args:  args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			if o.Labels, err = parseKV("label", labels); err != nil {
				return err
			}
			if o.Env, err = parseKV("env", env); err != nil {
				return err
			}
			if o.Tools, err = toolSpecsFlag(specs); err != nil {
				return err
			}
			if o.FromSnapshot != "" || o.Template != "" {
				// The snapshot decides the size unless asked otherwise.
				if !cmd.Flags().Changed("vcpus") {
					o.VCPUs = 0
				}
				if !cmd.Flags().Changed("memory") {
					o.MemoryMB = 0
				}
			}
			svc, err := a.service(cmd.Context())
			if err != nil {
				return err
			}
			id, err := svc.CreateVMTaskWithOptions(cmd.Context(), o)
			if err != nil {
				return err
			}
			if wait {
				if err := a.waitOK(cmd.Context(), svc, id); err != nil {
					return err
				}
			}
			if a.json {
				v, err := svc.GetVM(cmd.Context(), id)
				if err != nil {
					return err
				}
				return a.printJSON(newVMView(v))
			}
			fmt.Fprintln(a.stdout, id)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Name, "name", "", "VM name: lowercase letters, digits and '-' (required)")
	f.IntVar(&o.VCPUs, "vcpus", 1, "virtual CPUs")
	f.IntVar(&o.MemoryMB, "memory", 256, "memory in MiB")
	f.StringArrayVar(&labels, "label", nil, "label KEY=VALUE (repeatable)")
	f.StringArrayVar(&env, "env", nil, "default environment KEY=VALUE of every command (repeatable)")
	f.BoolVar(&wait, "wait", false, "return only once the VM's agent answers")
	f.DurationVar(&o.TTL, "ttl", 0, "delete the VM this long after its creation, e.g. 10m (default: never); see --on-expiry")
	f.StringVar(&o.OnExpiry, "on-expiry", "", "what happens when the TTL runs out: delete (default) or pause (suspend to disk where the backend can, and clear the expiry)")
	f.StringArrayVar(&specs, "tools", nil, "mise tool specs to install, e.g. node@22,python@3.12 or 'http:NAME[url=URL]@1.0.0' (repeatable or comma-separated)")
	f.StringVar(&o.Network, "network", "", "none or nat (default: nat when network.enabled is set in the config, else none)")
	f.StringVar(&o.FromSnapshot, "from-snapshot", "", "start the VM by restoring this snapshot (a fork) instead of booting")
	f.StringVar(&o.Template, "template", "", "start the VM by restoring a clone of this template instead of booting")
	return cmd
}

// waitOK waits for a task and turns its failure into an error.
func (a *app) waitOK(ctx context.Context, svc service.TaskService, id uuid.UUID) error {
	t, err := svc.WaitTask(ctx, id)
	if err != nil {
		return err
	}
	if t.State == types.TaskFailed {
		return fmt.Errorf("task %s (%s) failed: %s", t.ID, t.Type, t.Error)
	}
	return nil
}

func (a *app) vmListCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List VMs that are not deleted",
		Args:  args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			svc, err := a.service(cmd.Context())
			if err != nil {
				return err
			}
			vms, err := svc.ListVMs(cmd.Context())
			if err != nil {
				return err
			}
			if a.json {
				out := make([]vmView, 0, len(vms))
				for _, v := range vms {
					out = append(out, newVMView(v))
				}
				return a.printJSON(out)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			// ERROR is last: it says why a VM is failed or lost, and is long.
			fmt.Fprintln(tw, "ID\tNAME\tSTATE\tVCPUS\tMEMORY\tPROVIDER\tWORKER\tERROR")
			for _, v := range vms {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%dMiB\t%s\t%s\t%s\n", v.ID, v.Name, v.State, v.VCPUs, v.MemoryMB, v.Provider, v.Owner, v.Error)
			}
			return tw.Flush()
		},
	}
}

func (a *app) vmGetCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "get ID",
		Short: "Show one VM",
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
			v, err := svc.GetVM(cmd.Context(), id)
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(newVMView(v))
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "id\t%s\nname\t%s\nstate\t%s\nvcpus\t%d\nmemory\t%d MiB\nprovider\t%s\nworker\t%s\ncreated\t%s\n",
				v.ID, v.Name, v.State, v.VCPUs, v.MemoryMB, v.Provider, v.Owner, v.CreatedAt.Format("2006-01-02 15:04:05Z07:00"))
			if v.Tenant != "" {
				fmt.Fprintf(tw, "tenant\t%s\n", v.Tenant)
			}
			if v.ExpiresAt != nil {
				fmt.Fprintf(tw, "expires\t%s (then %s)\n", v.ExpiresAt.Format("2006-01-02 15:04:05Z07:00"), cmp.Or(v.OnExpiry, types.ExpiryDelete))
			}
			if v.Error != "" {
				fmt.Fprintf(tw, "error\t%s\n", v.Error)
			}
			return tw.Flush()
		},
	}
}

func (a *app) vmTTLCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "ttl ID DURATION",
		Short: "Make a VM expire DURATION from now (e.g. 30m), replacing any earlier expiry; print when",
		Args:  args(cobra.ExactArgs(2)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			id, err := parseUUID("vm", argv[0])
			if err != nil {
				return err
			}
			ttl, err := time.ParseDuration(argv[1])
			if err != nil {
				return fmt.Errorf("%w: ttl %q is not a duration; write it like 30m or 2h", types.ErrInvalid, argv[1])
			}
			svc, err := a.service(cmd.Context())
			if err != nil {
				return err
			}
			v, err := svc.SetVMTTL(cmd.Context(), id, ttl)
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(newVMView(v))
			}
			if v.ExpiresAt != nil {
				fmt.Fprintln(a.stdout, v.ExpiresAt.UTC().Format(time.RFC3339))
			}
			return nil
		},
	}
}

// vmTaskCmd builds delete, stop and start: submit, optionally wait, print
// the task id.
func (a *app) vmTaskCmd(name, short string, submit func(service.TaskService, context.Context, string) (uuid.UUID, error)) *cobra.Command {
	var wait bool
	cmd := &cobra.Command{
		Use:   name + " ID [--wait]",
		Short: short,
		Args:  args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			if _, err := parseUUID("vm", argv[0]); err != nil {
				return err
			}
			svc, err := a.service(cmd.Context())
			if err != nil {
				return err
			}
			id, err := submit(svc, cmd.Context(), argv[0])
			if err != nil {
				return err
			}
			return a.finishTask(cmd.Context(), svc, id, wait)
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", false, "return only once the task has finished")
	return cmd
}

// finishTask waits for a submitted task when asked (its failure is the
// command's error), then prints it.
func (a *app) finishTask(ctx context.Context, svc service.TaskService, id uuid.UUID, wait bool) error {
	if wait {
		if err := a.waitOK(ctx, svc, id); err != nil {
			return err
		}
	}
	return a.printTask(ctx, svc, id)
}

func (a *app) printTask(ctx context.Context, svc service.TaskService, id uuid.UUID) error {
	if !a.json {
		fmt.Fprintln(a.stdout, id)
		return nil
	}
	t, err := svc.GetTask(ctx, id)
	if err != nil {
		return err
	}
	return a.printJSON(newTaskView(t))
}

// parseUUID checks an id typed on the command line. Commands call it
// before they connect to anything, so that a mistyped id is reported as
// such (exit 2) even when PostgreSQL, Redis or aether-api is down.
func parseUUID(kind, s string) (uuid.UUID, error) {
	id, err := uuid.Parse(s)
	if err != nil {
		return uuid.Nil, fmt.Errorf("%w: %s id %q is not a UUID; ids are printed by `aether-cli %s list`", types.ErrInvalid, kind, s, kind)
	}
	return id, nil
}
