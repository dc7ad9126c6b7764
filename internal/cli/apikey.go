package cli

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/aetherium/aetherium-core/internal/wiring"
	"github.com/aetherium/aetherium-core/pkg/apikey"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// apikeyView is the --json view of a stored key; it never holds a secret.
type apikeyView struct {
	ID        string       `json:"id"`
	Name      string       `json:"name"`
	Tenant    string       `json:"tenant"`
	Admin     bool         `json:"admin"`
	Limits    types.Limits `json:"limits"`
	CreatedAt time.Time    `json:"created_at"`
	RevokedAt *time.Time   `json:"revoked_at"`
}

func newAPIKeyView(k *types.APIKey) apikeyView {
	return apikeyView{ID: k.ID, Name: k.Name, Tenant: k.Tenant, Admin: k.Admin, Limits: k.Limits, CreatedAt: k.CreatedAt, RevokedAt: k.RevokedAt}
}

// apikeyCmd manages the keys of aether-api. It works on PostgreSQL
// directly, whatever api_url says: whoever can reach the database is
// already trusted with every key.
func (a *app) apikeyCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "apikey", Short: "Create, list and revoke aether-api keys (talks to PostgreSQL directly)"}

	var (
		o      apikey.Options
		create = &cobra.Command{
			Use:   "create NAME [--tenant T] [--admin] [--max-vms N] [--max-vcpus N] [--max-memory MiB]",
			Short: "Create a key and print it; it is shown this once only",
			Args:  args(cobra.ExactArgs(1)),
		}
	)
	create.RunE = func(cmd *cobra.Command, argv []string) error {
		o.Name = argv[0]
		return a.withStore(cmd.Context(), func(ctx context.Context, st storage.Store) error {
			k, key, err := apikey.Create(ctx, st, o)
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(map[string]any{"id": k.ID, "name": k.Name, "tenant": k.Tenant, "admin": k.Admin, "key": key, "created_at": k.CreatedAt})
			}
			fmt.Fprintln(a.stdout, key)
			return nil
		})
	}
	f := create.Flags()
	f.StringVar(&o.Tenant, "tenant", "", "tenant whose VMs the key sees and creates (default "+apikey.DefaultTenant+")")
	f.BoolVar(&o.Admin, "admin", false, "the key sees and acts on every tenant's VMs and the workers")
	f.IntVar(&o.Limits.MaxVMs, "max-vms", 0, "most live VMs of the tenant (default: api.limits)")
	f.IntVar(&o.Limits.MaxVCPUs, "max-vcpus", 0, "most vCPUs of the tenant's live VMs (default: api.limits)")
	f.IntVar(&o.Limits.MaxMemoryMB, "max-memory", 0, "most MiB of memory of the tenant's live VMs (default: api.limits)")

	list := &cobra.Command{
		Use:   "list",
		Short: "List keys, revoked ones included (never their secrets)",
		Args:  args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withStore(cmd.Context(), func(ctx context.Context, st storage.Store) error {
				keys, err := st.ListAPIKeys(ctx)
				if err != nil {
					return err
				}
				if a.json {
					out := make([]apikeyView, 0, len(keys))
					for _, k := range keys {
						out = append(out, newAPIKeyView(k))
					}
					return a.printJSON(out)
				}
				tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tNAME\tTENANT\tADMIN\tCREATED\tREVOKED")
				for _, k := range keys {
					revoked := "-"
					if k.RevokedAt != nil {
						revoked = k.RevokedAt.Format(time.RFC3339)
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%t\t%s\t%s\n", k.ID, k.Name, k.Tenant, k.Admin, k.CreatedAt.Format(time.RFC3339), revoked)
				}
				return tw.Flush()
			})
		},
	}

	revoke := &cobra.Command{
		Use:   "revoke ID",
		Short: "Revoke a key: aether-api refuses it from now on (revoking twice is fine)",
		Args:  args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			return a.withStore(cmd.Context(), func(ctx context.Context, st storage.Store) error {
				k, err := st.RevokeAPIKey(ctx, argv[0])
				if err != nil {
					return err
				}
				if a.json {
					return a.printJSON(newAPIKeyView(k))
				}
				fmt.Fprintln(a.stdout, k.ID)
				return nil
			})
		},
	}
	cmd.AddCommand(create, list, revoke)
	return cmd
}

// withStore runs fn with a connection to PostgreSQL.
func (a *app) withStore(ctx context.Context, fn func(context.Context, storage.Store) error) error {
	c, err := a.config()
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	st, err := wiring.OpenStore(cctx, c)
	cancel()
	if err != nil {
		return err
	}
	defer st.Close()
	return fn(ctx, st)
}
