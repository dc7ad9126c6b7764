package cli

import (
	"context"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/aetherium/aetherium-core/internal/wiring"
	"github.com/aetherium/aetherium-core/pkg/config"
	"github.com/aetherium/aetherium-core/pkg/network"
)

// networkCmd is `aether-cli network setup|teardown|status|list`, which
// prepares, inspects and removes VM networking on this host. fromConfig
// maps the loaded configuration to the manager's (the network: section).
// It acts on this host only and needs root or CAP_NET_ADMIN; leases are
// read and released in storage when it can be reached.
func (a *app) networkCmd(fromConfig func(*config.Config) network.Config) *cobra.Command {
	var over network.Config
	cmd := &cobra.Command{
		Use:   "network",
		Short: "Set up, inspect or remove the VM network (bridge, TAPs, NAT, isolation rules) on this host",
		Long: `Manage the network that qemu and firecracker VMs get: a bridge with a
gateway address, one TAP per VM, NAT out of the uplink and isolation rules
in nftables tables that Aetherium owns. Run "setup" once as root so that the
worker can run without root (it still needs CAP_NET_ADMIN for TAPs), and
"teardown" to remove everything of ours.`,
	}
	cmd.PersistentFlags().StringVar(&over.Bridge, "bridge", "", "bridge name (overrides network.bridge)")
	cmd.PersistentFlags().StringVar(&over.Subnet, "subnet", "", "VM subnet, e.g. 10.88.0.0/16 (overrides network.subnet)")
	cmd.PersistentFlags().StringVar(&over.Uplink, "uplink", "", "interface to masquerade out of (overrides network.uplink)")
	cmd.PersistentFlags().StringVar(&over.Netns, "netns", "", "network namespace path (overrides network.netns)")
	cmd.PersistentFlags().StringVar(&over.Table, "table", "", "nftables table name (overrides network.table)")

	// manager builds the Manager; withLeases also connects to storage,
	// warning and going on without it when it cannot be reached. done
	// releases both.
	manager := func(ctx context.Context, withLeases bool) (m *network.Manager, done func(), err error) {
		c, err := a.config()
		if err != nil {
			return nil, nil, err
		}
		nc := fromConfig(c)
		for _, o := range []struct {
			dst *string
			v   string
		}{
			{&nc.Bridge, over.Bridge}, {&nc.Subnet, over.Subnet}, {&nc.Uplink, over.Uplink}, {&nc.Netns, over.Netns}, {&nc.Table, over.Table},
		} {
			if o.v != "" {
				*o.dst = o.v
			}
		}
		nc.Logger = wiring.Logger(c.Log, os.Stderr)
		var (
			leases network.LeaseStore
			closer = func() {}
		)
		if withLeases {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			st, err := wiring.OpenStore(cctx, c)
			switch ls, ok := st.(network.LeaseStore); {
			case err != nil:
				fmt.Fprintf(a.stderr, "aether-cli: warning: leases are not shown or released: %v\n", err)
			case !ok:
				st.Close()
				fmt.Fprintln(a.stderr, "aether-cli: warning: the store keeps no network leases")
			default:
				closer = st.Close
				leases = ls
			}
		}
		m, err = network.New(nc, leases)
		if err != nil {
			closer()
			return nil, nil, err
		}
		return m, func() { m.Close(); closer() }, nil
	}

	// sub is one subcommand that opens the manager (with the lease store
	// when withLeases), runs do and closes it again.
	sub := func(use, short string, withLeases bool, do func(ctx context.Context, m *network.Manager) error) *cobra.Command {
		return &cobra.Command{
			Use: use, Short: short, Args: args(cobra.NoArgs),
			RunE: func(cmd *cobra.Command, _ []string) error {
				m, done, err := manager(cmd.Context(), withLeases)
				if err != nil {
					return err
				}
				defer done()
				return do(cmd.Context(), m)
			},
		}
	}
	cmd.AddCommand(
		sub("setup", "Create the bridge, NAT and isolation rules (idempotent; needs root or CAP_NET_ADMIN)", false,
			func(ctx context.Context, m *network.Manager) error {
				if err := m.Setup(ctx); err != nil {
					return err
				}
				return a.printNetworkState(ctx, m)
			}),
		sub("teardown", "Remove every TAP, rule, lease and the bridge of ours; running VMs lose their network", true,
			func(ctx context.Context, m *network.Manager) error {
				if err := m.Teardown(ctx); err != nil {
					return err
				}
				return a.printNetworkState(ctx, m)
			}),
		sub("status", "Show whether the bridge and tables exist and count ports, rules and leases", true, a.printNetworkState),
		sub("list", "List VM ports with their VM, address and rules", true, a.printNetworkPorts),
	)
	return cmd
}

// printNetworkPorts lists the VM ports with their VM, address and rules.
func (a *app) printNetworkPorts(ctx context.Context, m *network.Manager) error {
	st, err := m.List(ctx)
	if err != nil {
		return err
	}
	if a.json {
		return a.printJSON(st)
	}
	ips := map[string]string{}
	for _, l := range st.Leases {
		ips[l.VMID] = l.Addr.String()
	}
	tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TAP\tVM\tIP\tON BRIDGE\tUP\tRULES")
	listed := map[string]bool{}
	for _, p := range st.Ports {
		listed[p.VMID] = true
		fmt.Fprintf(tw, "%s\t%s\t%s\t%t\t%t\t%d\n", p.Name, dash(p.VMID), dash(ips[p.VMID]), p.OnBridge, p.Up, st.VMRules[p.VMID])
	}
	for _, l := range st.Leases { // leases whose port is gone
		if !listed[l.VMID] {
			fmt.Fprintf(tw, "-\t%s\t%s\t-\t-\t%d\n", l.VMID, l.Addr, st.VMRules[l.VMID])
		}
	}
	return tw.Flush()
}

// printNetworkState prints the manager's State, as JSON with --json.
func (a *app) printNetworkState(ctx context.Context, m *network.Manager) error {
	st, err := m.List(ctx)
	if err != nil {
		return err
	}
	if a.json {
		return a.printJSON(st)
	}
	bridge := "absent"
	if st.BridgeExists {
		bridge = "present, gateway " + st.Gateway
	}
	tables := "none"
	if len(st.Tables) > 0 {
		tables = strings.Join(st.Tables, ", ")
	}
	rules := 0
	for _, n := range st.VMRules {
		rules += n
	}
	fmt.Fprintf(a.stdout, "bridge:  %s (%s)\nsubnet:  %s\ntables:  %s\nports:   %d\nrules:   %d per-vm\nleases:  %d\n",
		st.Bridge, bridge, st.Subnet, tables, len(st.Ports), rules, len(st.Leases))
	return nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
