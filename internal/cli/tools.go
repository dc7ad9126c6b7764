package cli

import (
	"context"
	"fmt"
	"os"
	"slices"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/aetherium/aetherium-core/internal/wiring"
	"github.com/aetherium/aetherium-core/pkg/config"
	"github.com/aetherium/aetherium-core/pkg/tools"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// minPruneAge is the least --older-than prune accepts: a worker records a
// VM's tools a moment after its install touched them, so an entry used
// within the last minute may be about to be recorded.
const minPruneAge = time.Minute

func (a *app) toolsCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "tools", Short: "Install tools (mise specs) into VMs and maintain the host's tool cache"}
	cache := &cobra.Command{Use: "cache", Short: "List or prune this host's tool cache (needs tools.cache_dir)"}
	cache.AddCommand(a.toolsCacheListCmd(), a.toolsCachePruneCmd())
	cmd.AddCommand(a.toolsInstallCmd(), a.toolsListCmd(), cache)
	return cmd
}

// splitSpecs turns --tools values into specs: each value may hold several
// specs separated by commas, except inside [options], whose values may
// hold commas themselves.
func splitSpecs(values []string) []string {
	var out []string
	for _, v := range values {
		depth, start := 0, 0
		for i, r := range v {
			switch r {
			case '[':
				depth++
			case ']':
				depth--
			case ',':
				if depth == 0 {
					out = append(out, v[start:i])
					start = i + 1
				}
			}
		}
		out = append(out, v[start:])
	}
	return slices.DeleteFunc(out, func(s string) bool { return s == "" })
}

func (a *app) toolsInstallCmd() *cobra.Command {
	var wait bool
	cmd := &cobra.Command{
		Use:   "install ID SPEC... [--wait]",
		Short: "Install tools into a running VM, e.g. `tools install ID node@22 npm:prettier@3`; print the task id",
		Args:  args(cobra.MinimumNArgs(2)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			if _, err := parseUUID("vm", argv[0]); err != nil {
				return err
			}
			specs := splitSpecs(argv[1:])
			if _, err := tools.ParseSpecs(specs); err != nil {
				return err
			}
			svc, err := a.service(cmd.Context())
			if err != nil {
				return err
			}
			id, err := svc.InstallToolsTask(cmd.Context(), argv[0], specs)
			if err != nil {
				return err
			}
			return a.finishTask(cmd.Context(), svc, id, wait)
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", false, "return only once the tools are in the VM")
	return cmd
}

func (a *app) toolsListCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "list ID",
		Short: "List the tool versions a VM was given (mise itself has no spec)",
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
			ts, err := svc.ListVMTools(cmd.Context(), id)
			if err != nil {
				return err
			}
			if a.json {
				if ts == nil {
					ts = []types.VMTool{}
				}
				return a.printJSON(ts)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "TOOL\tVERSION\tSPEC\tKEY\tADDED")
			for _, t := range ts {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", t.Tool, t.Version, orDash(t.Spec), t.Key, t.AddedAt.Format(time.RFC3339))
			}
			return tw.Flush()
		},
	}
}

// openToolCache opens the configured cache for maintenance (mise is not
// needed) and PostgreSQL, whose rows say which entries VMs use.
func (a *app) openToolCache(ctx context.Context) (*tools.Mise, *config.Config, error) {
	cfg, err := a.config()
	if err != nil {
		return nil, nil, err
	}
	if cfg.APIURL != "" {
		return nil, nil, fmt.Errorf("%w: tools cache works on this host's cache (tools.cache_dir %s), not through api_url; run it on the worker's host with a config that reaches PostgreSQL", types.ErrNotSupported, cfg.Tools.CacheDir)
	}
	m, err := tools.OpenCache(cfg.Tools.CacheDir, wiring.Logger(config.Log{Level: "error"}, os.Stderr))
	if err != nil {
		return nil, nil, err
	}
	return m, cfg, nil
}

// toolKeysInUse asks PostgreSQL which entries VMs that are not deleted use.
func (a *app) toolKeysInUse(ctx context.Context, cfg *config.Config) (map[string]bool, error) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	store, err := wiring.OpenStore(cctx, cfg)
	if err != nil {
		return nil, err
	}
	defer store.Close()
	keys, err := store.ToolKeysInUse(cctx)
	if err != nil {
		return nil, err
	}
	inUse := map[string]bool{}
	for _, k := range keys {
		inUse[k] = true
	}
	return inUse, nil
}

// toolEntryView is one cache entry as `tools cache list --json` prints it.
type toolEntryView struct {
	tools.Entry
	LastUsed time.Time `json:"last_used"`
	InUse    bool      `json:"in_use"`
}

func (a *app) toolsCacheListCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the tool versions in this host's cache, and whether a VM uses them",
		Args:  args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, cfg, err := a.openToolCache(cmd.Context())
			if err != nil {
				return err
			}
			entries, err := m.List(cmd.Context())
			if err != nil {
				return err
			}
			inUse, err := a.toolKeysInUse(cmd.Context(), cfg)
			if err != nil {
				return fmt.Errorf("asking PostgreSQL which tools VMs use: %w", err)
			}
			views := make([]toolEntryView, 0, len(entries))
			for _, e := range entries {
				views = append(views, toolEntryView{Entry: e, LastUsed: e.LastUsed, InUse: inUse[e.Key]})
			}
			if a.json {
				return a.printJSON(views)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "KEY\tTOOL\tVERSION\tSIZE\tLAST USED\tIN USE")
			for _, v := range views {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%t\n", v.Key, v.Tool, v.Version, sizeText(v.Size), v.LastUsed.UTC().Format(time.RFC3339), v.InUse)
			}
			return tw.Flush()
		},
	}
}

func (a *app) toolsCachePruneCmd() *cobra.Command {
	var olderThan time.Duration
	cmd := &cobra.Command{
		Use:   "prune [--older-than 168h]",
		Short: "Remove cached tool versions unused for a while that no VM uses, with their images; print their keys",
		Args:  args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if olderThan < minPruneAge {
				return fmt.Errorf("%w: --older-than %s is below %s: an entry used that recently may be about to be recorded as a VM's", types.ErrInvalid, olderThan, minPruneAge)
			}
			m, cfg, err := a.openToolCache(cmd.Context())
			if err != nil {
				return err
			}
			// Without PostgreSQL there is no knowing what VMs use: refuse.
			inUse, err := a.toolKeysInUse(cmd.Context(), cfg)
			if err != nil {
				return fmt.Errorf("refusing to prune without knowing which tools VMs use: %w", err)
			}
			pruned, err := m.Prune(cmd.Context(), olderThan, func(key string) bool { return inUse[key] })
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(pruned)
			}
			for _, e := range pruned {
				fmt.Fprintln(a.stdout, e.Key)
			}
			return nil
		},
	}
	cmd.Flags().DurationVar(&olderThan, "older-than", 7*24*time.Hour, "remove entries not used for this long (at least 1m)")
	return cmd
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// sizeText prints a byte count in binary units.
func sizeText(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := int64(unit), 0
	for v := n / unit; v >= unit; v /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// toolSpecsFlag turns the --tools values of vm create (repeatable, each a
// comma-separated list) into checked specs.
func toolSpecsFlag(values []string) ([]string, error) {
	specs := splitSpecs(values)
	if _, err := tools.ParseSpecs(specs); err != nil {
		return nil, err
	}
	return specs, nil
}
