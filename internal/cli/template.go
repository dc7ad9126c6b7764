package cli

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/aetherium/aetherium-core/pkg/e2b"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// templateView is the --json view of a template.
type templateView struct {
	Name      string            `json:"name"`
	VCPUs     int               `json:"vcpus"`
	MemoryMB  int               `json:"memory_mb"`
	Env       map[string]string `json:"env,omitempty"`
	CreatedAt time.Time         `json:"created_at"`
}

func newTemplateView(t *storage.Template) templateView {
	return templateView{Name: t.Name, VCPUs: t.VCPUs, MemoryMB: t.MemoryMB, Env: t.Env, CreatedAt: t.CreatedAt}
}

// templateCmd manages the templates of the E2B-compatible API
// (docs/e2b.md): names an E2B templateID may give, each a VM size and
// environment. Like apikey, it works on PostgreSQL directly.
func (a *app) templateCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "template", Short: "Register, list and delete E2B templates (talks to PostgreSQL directly)"}

	var (
		tpl            storage.Template
		env, specs     []string
		setup, network string
		build, wait    bool
		create         = &cobra.Command{
			Use:   "create NAME [--vcpus N] [--memory MiB] [--env K=V]... [--tools SPEC,...] [--setup 'CMD'] [--wait]",
			Short: "Create a template: a VM of this size booted with the tools, set up by CMD and snapshotted; `vm create --template NAME` and Sandbox.create(NAME) then restore clones of it",
			Args:  args(cobra.ExactArgs(1)),
		}
	)
	create.RunE = func(cmd *cobra.Command, argv []string) error {
		tpl.Name = argv[0]
		tpl.Env = nil
		for _, kv := range env {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return fmt.Errorf("%w: --env %q must be KEY=VALUE", types.ErrInvalid, kv)
			}
			if tpl.Env == nil {
				tpl.Env = map[string]string{}
			}
			tpl.Env[k] = v
		}
		if err := e2b.ValidateTemplate(&tpl); err != nil {
			return err
		}
		tools, err := toolSpecsFlag(specs)
		if err != nil {
			return err
		}
		err = a.withStore(cmd.Context(), func(ctx context.Context, st storage.Store) error {
			return st.CreateTemplate(ctx, &tpl)
		})
		if err != nil {
			return err
		}
		if build {
			// Boot it, run the setup, snapshot it: VMs made from it are
			// then restored clones instead of boots.
			svc, sn, err := a.snapshots(cmd.Context())
			if err != nil {
				return err
			}
			id, err := sn.CreateTemplateTask(cmd.Context(), service.TemplateOptions{Name: tpl.Name, VCPUs: tpl.VCPUs,
				MemoryMB: tpl.MemoryMB, Env: tpl.Env, Tools: tools, Setup: setup, Network: network})
			if err != nil {
				return err
			}
			if wait {
				if err := a.waitOK(cmd.Context(), svc, id); err != nil {
					return err
				}
			}
		}
		if a.json {
			return a.printJSON(newTemplateView(&tpl))
		}
		fmt.Fprintln(a.stdout, tpl.Name)
		return nil
	}
	f := create.Flags()
	f.IntVar(&tpl.VCPUs, "vcpus", e2b.BaseVCPUs, "vCPUs of each sandbox")
	f.IntVar(&tpl.MemoryMB, "memory", e2b.BaseMemoryMB, "memory of each sandbox in MiB")
	f.StringArrayVar(&env, "env", nil, "environment variable of every command, KEY=VALUE (repeatable; a sandbox's envs override it)")
	f.StringArrayVar(&specs, "tools", nil, "mise tool specs installed in the template (repeatable or comma-separated)")
	f.StringVar(&setup, "setup", "", "shell command run in the template's VM before its snapshot; it must exit 0")
	f.StringVar(&network, "network", "", "none or nat: the network of the template and its clones")
	f.BoolVar(&build, "build", true, "build the template's snapshot (--build=false only registers its size and environment)")
	f.BoolVar(&wait, "wait", false, "return only once the template is built")

	list := &cobra.Command{
		Use:   "list",
		Short: "List registered templates (the built-in base is not listed)",
		Args:  args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withStore(cmd.Context(), func(ctx context.Context, st storage.Store) error {
				tpls, err := st.ListTemplates(ctx)
				if err != nil {
					return err
				}
				if a.json {
					out := make([]templateView, 0, len(tpls))
					for _, t := range tpls {
						out = append(out, newTemplateView(t))
					}
					return a.printJSON(out)
				}
				tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "NAME\tVCPUS\tMEMORY_MB\tENV\tCREATED\tSNAPSHOT")
				for _, t := range tpls {
					keys := slices.Sorted(maps.Keys(t.Env))
					envs := "-"
					if len(keys) > 0 {
						envs = strings.Join(keys, ",")
					}
					state := "-" // booted, not restored
					if sn, err := st.FindSnapshot(ctx, types.KindTemplate, t.Name); err == nil {
						state = string(sn.State)
						if sn.Error != "" {
							state += ": " + sn.Error
						}
					}
					fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\n", t.Name, t.VCPUs, t.MemoryMB, envs, t.CreatedAt.Format(time.RFC3339), state)
				}
				return tw.Flush()
			})
		},
	}

	del := &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a template; sandboxes made from it keep running",
		Args:  args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			return a.withStore(cmd.Context(), func(ctx context.Context, st storage.Store) error {
				// Its snapshot first: refused while VMs made from it live.
				if _, err := st.FindSnapshot(ctx, types.KindTemplate, argv[0]); err == nil {
					svc, sn, err := a.snapshots(ctx)
					if err != nil {
						return err
					}
					id, err := sn.DeleteSnapshotTask(ctx, types.KindTemplate, argv[0])
					if err != nil {
						return err
					}
					if err := a.waitOK(ctx, svc, id); err != nil {
						return err
					}
				} else if !errors.Is(err, types.ErrNotFound) {
					return err
				}
				if err := st.DeleteTemplate(ctx, argv[0]); err != nil {
					return err
				}
				if a.json {
					return a.printJSON(map[string]string{"name": argv[0]})
				}
				fmt.Fprintln(a.stdout, argv[0])
				return nil
			})
		},
	}
	cmd.AddCommand(create, list, del)
	return cmd
}
