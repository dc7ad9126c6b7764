package cli

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/aetherium/aetherium-core/pkg/e2b"
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
		tpl    storage.Template
		env    []string
		create = &cobra.Command{
			Use:   "create NAME [--vcpus N] [--memory MiB] [--env K=V]...",
			Short: "Register a template: Sandbox.create(NAME) then makes VMs of this size and environment",
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
		return a.withStore(cmd.Context(), func(ctx context.Context, st storage.Store) error {
			if err := st.CreateTemplate(ctx, &tpl); err != nil {
				return err
			}
			if a.json {
				return a.printJSON(newTemplateView(&tpl))
			}
			fmt.Fprintln(a.stdout, tpl.Name)
			return nil
		})
	}
	f := create.Flags()
	f.IntVar(&tpl.VCPUs, "vcpus", e2b.BaseVCPUs, "vCPUs of each sandbox")
	f.IntVar(&tpl.MemoryMB, "memory", e2b.BaseMemoryMB, "memory of each sandbox in MiB")
	f.StringArrayVar(&env, "env", nil, "environment variable of every command, KEY=VALUE (repeatable; a sandbox's envs override it)")

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
				fmt.Fprintln(tw, "NAME\tVCPUS\tMEMORY_MB\tENV\tCREATED")
				for _, t := range tpls {
					keys := slices.Sorted(maps.Keys(t.Env))
					envs := "-"
					if len(keys) > 0 {
						envs = strings.Join(keys, ",")
					}
					fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\n", t.Name, t.VCPUs, t.MemoryMB, envs, t.CreatedAt.Format(time.RFC3339))
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
