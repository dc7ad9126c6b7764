package network

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Setup creates the bridge with the gateway address, enables forwarding,
// and writes the nftables tables (isolation, and NAT when Config.Uplink is
// set). It is idempotent: run again, it brings everything back to Config
// (a changed uplink or egress list is applied) and keeps the VMs' ports and
// their rules. `aether-cli network setup` runs it up front.
func (m *Manager) Setup(ctx context.Context) error {
	m.setupMu.Lock()
	defer m.setupMu.Unlock()
	if err := ctxErr(ctx, "setting up the network"); err != nil {
		return err
	}
	// Rules first: the bridge never exists without its isolation.
	if err := m.writeRuleset(); err != nil {
		return err
	}
	if _, err := m.ensureBridge(); err != nil {
		return err
	}
	if err := m.enableForwarding(); err != nil {
		return err
	}
	m.setupDone = true
	m.log.Info("network ready", "bridge", m.cfg.Bridge, "subnet", m.subnet, "uplink", m.cfg.Uplink, "table", m.cfg.Table)
	return nil
}

// ensureSetup runs Setup once per Manager, and again when its nftables
// tables have gone since (an `nft flush ruleset`, a firewall restart):
// without them no VM would be isolated.
func (m *Manager) ensureSetup(ctx context.Context) error {
	m.setupMu.Lock()
	done := m.setupDone
	m.setupMu.Unlock()
	if done {
		ts, err := m.tables()
		if err != nil {
			return err
		}
		if len(ts) == 2 {
			return nil
		}
		m.log.Warn("our nftables tables are gone; setting the network up again (rules of VMs not re-attached stay missing until they start again or `aether-cli network setup` runs)", "found", ts)
	}
	return m.Setup(ctx)
}

// Attach gives vmID its network: an address leased from the pool, the
// per-VM anti-spoofing rules, then its port (a persistent TAP named
// PortName(vmID)) on the bridge, up. The rules exist before the port does,
// so no frame of the VM ever passes unchecked. It runs Setup first when
// this Manager has not yet.
//
// Attach is idempotent: called again for the same VM it returns the same
// Attachment and repairs whatever is missing. A link that already carries
// the port's name is adopted instead of creating a TAP (how tests stand a
// veth in for a TAP). Cancelling ctx stops between steps; what was made
// stays, for a retried Attach, Detach or Reconcile to finish.
func (m *Manager) Attach(ctx context.Context, vmID string) (*Attachment, error) {
	if vmID == "" {
		return nil, fmt.Errorf("%w: attaching a vm to the network: no vm id", types.ErrInvalid)
	}
	if m.leases == nil {
		return nil, fmt.Errorf("%w: attaching vm %s: the network manager has no lease store", types.ErrInvalid, vmID)
	}
	if err := m.ensureSetup(ctx); err != nil {
		return nil, err
	}
	// The claim comes first, so no other Manager's Reconcile ever sees a
	// lease, rule or port of this VM without knowing whose it is.
	previous, err := m.setClaim(vmID, m.cfg.Owner)
	if err != nil {
		return nil, err
	}
	if previous != "" {
		m.log.Warn("took over the network of a vm another owner attached", "vm_id", vmID, "owner", m.cfg.Owner, "previous_owner", previous)
	}
	lease, err := m.leases.AllocateLease(ctx, LeaseRequest{
		Pool: m.cfg.Pool, VMID: vmID, Subnet: m.subnet, First: m.first, Last: m.last,
	})
	if err != nil {
		return nil, fmt.Errorf("leasing an address for vm %s in %s: %w", vmID, m.subnet, err)
	}
	if !m.subnet.Contains(lease.Addr) {
		return nil, fmt.Errorf("%w: vm %s holds %s, outside %s (the subnet was changed?); delete the vm or run `aether-cli network teardown`", types.ErrConflict, vmID, lease.Addr, m.subnet)
	}
	a := m.attachment(vmID, lease.Addr)
	if err := ctxErr(ctx, "attaching vm "+vmID); err != nil {
		return nil, err
	}
	if err := m.setVMRules(vmID, m.vmRules(a)); err != nil {
		return nil, err
	}
	if err := ctxErr(ctx, "attaching vm "+vmID); err != nil {
		return nil, err
	}
	br, err := m.ensureBridge()
	if err != nil {
		return nil, err
	}
	if err := m.ensurePort(br, vmID); err != nil {
		return nil, err
	}
	m.log.Debug("attached vm", "vm_id", vmID, "tap", a.TAP, "ip", a.IP, "mac", a.MAC.String())
	return a, nil
}

// Detach removes vmID's port, its rules, its lease and its claim, in that
// order, so its address goes back to the pool only once nothing uses it.
// It removes them whichever Manager attached the VM. It is idempotent: a
// VM with nothing left returns nil.
func (m *Manager) Detach(ctx context.Context, vmID string) error {
	if err := ctxErr(ctx, "detaching vm "+vmID); err != nil {
		return err
	}
	if err := m.deleteLink(PortName(vmID)); err != nil {
		return err
	}
	if err := m.setVMRules(vmID, nil); err != nil {
		return err
	}
	if m.leases != nil {
		if err := m.leases.ReleaseLease(ctx, vmID); err != nil {
			return fmt.Errorf("releasing the address of vm %s: %w", vmID, err)
		}
	}
	if _, err := m.setClaim(vmID, ""); err != nil {
		return err
	}
	m.log.Debug("detached vm", "vm_id", vmID)
	return nil
}

// Reconcile removes the ports, rules, leases (of this pool) and claims of
// every VM this Manager's owner claimed that is not in live, such as what
// a worker killed half-way through Attach left, and of leftovers nobody
// claimed (made before claims existed, or after the tables were flushed).
// VMs another owner claimed are never touched: workers sharing the bridge
// and pool each reconcile their own, and live needs only the VMs of this
// owner. It returns the ids (or, for ports a crash left without an alias,
// the port names) it cleaned. It goes on past failures and returns them
// joined; a VM that could not be cleaned keeps its claim, for next time.
func (m *Manager) Reconcile(ctx context.Context, live []string) ([]string, error) {
	return m.reconcile(ctx, live, false)
}

// reconcile is Reconcile; everyOwner removes what other owners claimed too
// (Teardown).
func (m *Manager) reconcile(ctx context.Context, live []string, everyOwner bool) ([]string, error) {
	liveIDs := map[string]bool{}
	livePorts := map[string]bool{}
	for _, id := range live {
		liveIDs[id] = true
		livePorts[PortName(id)] = true
	}
	var (
		errs    []error
		cleaned []string
		failed  = map[string]bool{}
	)
	note := func(what string) {
		if !slices.Contains(cleaned, what) {
			cleaned = append(cleaned, what)
		}
	}
	brIndex, err := m.bridgeIndex()
	if err != nil {
		return nil, err
	}
	ports, err := m.ports(brIndex)
	if err != nil {
		return nil, err
	}
	counts, err := m.vmRuleCounts()
	if err != nil {
		errs = append(errs, err)
	}
	var leases []Lease
	if m.leases != nil {
		if leases, err = m.leases.ListLeases(ctx, m.cfg.Pool); err != nil {
			errs = append(errs, fmt.Errorf("listing the leases of pool %s: %w", m.cfg.Pool, err))
		}
	}
	// Claims are read after everything else: Attach claims a VM before it
	// makes anything of it, so whatever was seen above was claimed by now.
	// Without them nothing can be told apart, so nothing is removed.
	claims, err := m.claims()
	if err != nil {
		return nil, errors.Join(append(errs, err)...)
	}
	portOwners := map[string]string{}
	for id, o := range claims {
		portOwners[PortName(id)] = o
	}
	// others reports whether a VM (by id, or by port name when the port
	// lost its alias) belongs to another owner.
	others := func(id, port string) bool {
		if everyOwner {
			return false
		}
		if o, ok := claims[id]; ok && id != "" {
			return o != m.cfg.Owner
		}
		if o, ok := portOwners[port]; ok && port != "" {
			return o != m.cfg.Owner
		}
		return false
	}
	for _, p := range ports {
		if livePorts[p.Name] || liveIDs[p.VMID] || others(p.VMID, p.Name) {
			continue
		}
		if err := ctxErr(ctx, "reconciling the network"); err != nil {
			return cleaned, err
		}
		if err := m.deleteLink(p.Name); err != nil {
			errs = append(errs, err)
			failed[p.VMID], failed[p.Name] = true, true
			continue
		}
		m.log.Info("reconcile removed port", "tap", p.Name, "vm_id", p.VMID)
		note(cmp.Or(p.VMID, p.Name))
	}
	for id := range counts {
		if liveIDs[id] || others(id, "") {
			continue
		}
		if err := m.setVMRules(id, nil); err != nil {
			errs = append(errs, err)
			failed[id] = true
			continue
		}
		m.log.Info("reconcile removed rules", "vm_id", id)
		note(id)
	}
	for _, l := range leases {
		if liveIDs[l.VMID] || others(l.VMID, "") {
			continue
		}
		if err := m.leases.ReleaseLease(ctx, l.VMID); err != nil {
			errs = append(errs, fmt.Errorf("releasing the address of vm %s: %w", l.VMID, err))
			failed[l.VMID] = true
			continue
		}
		m.log.Info("reconcile released lease", "vm_id", l.VMID, "ip", l.Addr)
		note(l.VMID)
	}
	for id := range claims {
		if liveIDs[id] || others(id, "") || failed[id] || failed[PortName(id)] {
			continue
		}
		if _, err := m.setClaim(id, ""); err != nil {
			errs = append(errs, err)
			continue
		}
		m.log.Info("reconcile removed claim", "vm_id", id)
		note(id)
	}
	slices.Sort(cleaned)
	return cleaned, errors.Join(errs...)
}

// Teardown removes everything of the bridge and pool, whichever owner
// claimed it: every port of ours on the bridge (and half-made TAPs), the
// bridge if it made it, both nftables tables, and the pool's leases. Running VMs lose their network. It is idempotent. IPv4
// forwarding is left on, since other software may rely on it.
func (m *Manager) Teardown(ctx context.Context) error {
	m.setupMu.Lock()
	defer m.setupMu.Unlock()
	m.setupDone = false
	if _, err := m.reconcile(ctx, nil, true); err != nil {
		return err
	}
	switch br, err := m.nl.LinkByName(m.cfg.Bridge); {
	case isNotFound(err):
	case err != nil:
		return m.opError(err, "reading bridge %s", m.cfg.Bridge)
	case br.Attrs().Alias != bridgeAlias:
		m.log.Info("leaving a bridge this manager did not create", "bridge", m.cfg.Bridge)
	default:
		if err := m.deleteLink(m.cfg.Bridge); err != nil {
			return err
		}
	}
	if err := m.deleteTables(); err != nil {
		return err
	}
	m.log.Info("network torn down", "bridge", m.cfg.Bridge, "table", m.cfg.Table)
	return nil
}

// State is what a Manager finds of its own on the host.
type State struct {
	// Bridge is the bridge's name; BridgeExists whether it exists.
	Bridge       string `json:"bridge"`
	BridgeExists bool   `json:"bridge_exists"`
	// Subnet and Gateway are the configured ones.
	Subnet  string `json:"subnet"`
	Gateway string `json:"gateway"`
	// Tables are the nftables tables that exist, e.g. "inet aetherium".
	Tables []string `json:"tables"`
	// Ports are the VM ports.
	Ports []Port `json:"ports"`
	// VMRules counts the per-VM rules by VM id.
	VMRules map[string]int `json:"vm_rules"`
	// Leases are the pool's leases; nil without a lease store.
	Leases []Lease `json:"leases"`
	// Owners are the claimed VMs' owners, by VM id.
	Owners map[string]string `json:"owners"`
}

// Empty reports whether nothing of the Manager's is left.
func (s *State) Empty() bool {
	return !s.BridgeExists && len(s.Tables) == 0 && len(s.Ports) == 0 && len(s.VMRules) == 0 && len(s.Leases) == 0 && len(s.Owners) == 0
}

// List returns what exists of the Manager's: it only reads.
func (m *Manager) List(ctx context.Context) (*State, error) {
	s := &State{Bridge: m.cfg.Bridge, Subnet: m.subnet.String(), Gateway: m.gateway.String()}
	brIndex, err := m.bridgeIndex()
	if err != nil {
		return nil, err
	}
	s.BridgeExists = brIndex != 0
	if s.Ports, err = m.ports(brIndex); err != nil {
		return nil, err
	}
	if s.Tables, err = m.tables(); err != nil {
		return nil, err
	}
	if s.VMRules, err = m.vmRuleCounts(); err != nil {
		return nil, err
	}
	if s.Owners, err = m.claims(); err != nil {
		return nil, err
	}
	if m.leases != nil {
		if s.Leases, err = m.leases.ListLeases(ctx, m.cfg.Pool); err != nil {
			return nil, fmt.Errorf("listing the leases of pool %s: %w", m.cfg.Pool, err)
		}
	}
	return s, nil
}
