package cli

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"

	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// snapshots returns the service's snapshot operations: the local service
// and the aether-api client (api_url) both have them. A service without
// them is refused with a hint.
func (a *app) snapshots(ctx context.Context) (service.TaskService, service.Snapshots, error) {
	svc, err := a.service(ctx)
	if err != nil {
		return nil, nil, err
	}
	sn, err := asSnapshots(svc)
	return svc, sn, err
}

// asSnapshots is svc's snapshot operations, or the error saying it has none.
func asSnapshots(svc service.TaskService) (service.Snapshots, error) {
	sn, ok := svc.(service.Snapshots)
	if !ok {
		return nil, fmt.Errorf("%w: this service cannot pause, suspend, snapshot or build templates; unset api_url (AETHERIUM_API_URL) to use PostgreSQL and Redis directly", types.ErrNotSupported)
	}
	return sn, nil
}

// vmOp adapts a Snapshots operation on a VM to vmTaskCmd.
func vmOp(op func(service.Snapshots, context.Context, string) (uuid.UUID, error)) func(service.TaskService, context.Context, string) (uuid.UUID, error) {
	return func(svc service.TaskService, ctx context.Context, id string) (uuid.UUID, error) {
		sn, err := asSnapshots(svc)
		if err != nil {
			return uuid.Nil, err
		}
		return op(sn, ctx, id)
	}
}

// snapshotView is the --json view of a snapshot or template.
type snapshotView struct {
	ID        string            `json:"id"`
	Name      string            `json:"name"`
	Kind      string            `json:"kind"`
	State     string            `json:"state"`
	Error     string            `json:"error,omitempty"`
	VMID      string            `json:"vm_id,omitempty"`
	Owner     string            `json:"owner,omitempty"`
	VCPUs     int               `json:"vcpus"`
	MemoryMB  int               `json:"memory_mb"`
	Network   string            `json:"network,omitempty"`
	Tools     []string          `json:"tools,omitempty"`
	Setup     string            `json:"setup,omitempty"`
	Env       map[string]string `json:"env,omitempty"`
	SizeBytes int64             `json:"size_bytes"`
	CreatedAt time.Time         `json:"created_at"`
}

func newSnapshotView(s *types.Snapshot) snapshotView {
	return snapshotView{ID: s.ID, Name: s.Name, Kind: string(s.Kind), State: string(s.State), Error: s.Error, VMID: s.VMID,
		Owner: s.Owner, VCPUs: s.VCPUs, MemoryMB: s.MemoryMB, Network: s.Network, Tools: s.Tools, Setup: s.Setup, Env: s.Env,
		SizeBytes: s.SizeBytes, CreatedAt: s.CreatedAt}
}

// snapshotCmd is `aether-cli snapshot`: take, list and delete snapshots of
// VMs. `vm create --from-snapshot NAME` starts VMs from them.
func (a *app) snapshotCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "snapshot", Short: "Take, list and delete snapshots of VMs (vm create --from-snapshot starts VMs from them)"}
	var (
		name string
		wait bool
	)
	create := &cobra.Command{
		Use:   "create VM_ID --name NAME [--wait]",
		Short: "Snapshot a running or paused VM (memory, devices, disk); the VM goes on",
		Args:  args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			if _, err := parseUUID("vm", argv[0]); err != nil {
				return err
			}
			if err := types.ValidateSnapshotName(types.KindSnapshot, name); err != nil {
				return err
			}
			svc, sn, err := a.snapshots(cmd.Context())
			if err != nil {
				return err
			}
			id, err := sn.SnapshotVMTask(cmd.Context(), argv[0], name)
			if err != nil {
				return err
			}
			return a.finishTask(cmd.Context(), svc, id, wait)
		},
	}
	create.Flags().StringVar(&name, "name", "", "the snapshot's name (required)")
	create.Flags().BoolVar(&wait, "wait", false, "return only once the snapshot is ready")
	cmd.AddCommand(create, a.snapshotListCmd(types.KindSnapshot), a.snapshotDeleteCmd(types.KindSnapshot))
	return cmd
}

func (a *app) snapshotListCmd(kind types.SnapshotKind) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: fmt.Sprintf("List %ss", kind),
		Args:  args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, sn, err := a.snapshots(cmd.Context())
			if err != nil {
				return err
			}
			list, err := sn.ListSnapshots(cmd.Context(), kind)
			if err != nil {
				return err
			}
			if a.json {
				out := make([]snapshotView, 0, len(list))
				for _, s := range list {
					out = append(out, newSnapshotView(s))
				}
				return a.printJSON(out)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSTATE\tVCPUS\tMEMORY_MB\tSIZE_MB\tWORKER\tCREATED\tERROR")
			for _, s := range list {
				fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%s\t%s\t%s\n", s.Name, s.State, s.VCPUs, s.MemoryMB, s.SizeBytes>>20,
					orDash(s.Owner), s.CreatedAt.Format(time.RFC3339), orDash(s.Error))
			}
			return tw.Flush()
		},
	}
}

func (a *app) snapshotDeleteCmd(kind types.SnapshotKind) *cobra.Command {
	var wait bool
	cmd := &cobra.Command{
		Use:   "delete NAME [--wait]",
		Short: fmt.Sprintf("Delete a %s and its files (refused while VMs started from it live)", kind),
		Args:  args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			if err := types.ValidateSnapshotName(kind, argv[0]); err != nil {
				if _, perr := uuid.Parse(argv[0]); perr != nil {
					return err
				}
			}
			svc, sn, err := a.snapshots(cmd.Context())
			if err != nil {
				return err
			}
			id, err := sn.DeleteSnapshotTask(cmd.Context(), kind, argv[0])
			if err != nil {
				return err
			}
			return a.finishTask(cmd.Context(), svc, id, wait)
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", false, "return only once the files are gone")
	return cmd
}
