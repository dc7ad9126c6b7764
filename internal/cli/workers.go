package cli

import (
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
)

func (a *app) workersCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "workers",
		Short: "List the workers that have reported themselves (one silent for worker.dead_after is not healthy)",
		Args:  args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			svc, err := a.service(cmd.Context())
			if err != nil {
				return err
			}
			ws, err := svc.ListWorkers(cmd.Context())
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(ws)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tHOST\tPROVIDER\tHEALTHY\tLAST SEEN\tDETAIL")
			for _, w := range ws {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%t\t%s ago\t%s\n", w.ID, w.Hostname, w.Provider, w.Healthy, time.Since(w.LastSeen).Round(time.Second), w.Detail)
			}
			return tw.Flush()
		},
	}
}
