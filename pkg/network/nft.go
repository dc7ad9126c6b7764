package network

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// The chains of the Manager's tables. The rules are written out in the
// package comment; ruleset and vmRules build them.
const (
	chainInput       = "input"       // inet: VMs -> the host itself
	chainForward     = "forward"     // inet: VMs -> elsewhere, and into the VM subnet
	chainPostrouting = "postrouting" // inet nat: masquerade out of the uplink
	chainPrerouting  = "prerouting"  // bridge: every frame from a VM port
	chainBrForward   = "forward"     // bridge: port-to-port frames, per VM
	chainPorts       = "ports"       // bridge: the per-VM anti-spoofing rules, from prerouting
	chainOwners      = "owners"      // bridge: one claim per VM naming its owner; never jumped to
)

// vmCommentPrefix starts the comment of every per-VM rule; the VM id
// follows, which is how Detach and Reconcile find them.
const vmCommentPrefix = "aetherium vm="

// linkLocal is never reachable from VMs: it is where clouds serve metadata.
var linkLocal = netip.MustParsePrefix("169.254.0.0/16")

func (m *Manager) inetTable() *nftables.Table {
	return &nftables.Table{Name: m.cfg.Table, Family: nftables.TableFamilyINet}
}

func (m *Manager) bridgeTable() *nftables.Table {
	return &nftables.Table{Name: m.cfg.Table, Family: nftables.TableFamilyBridge}
}

// nft opens an nftables connection in the Manager's namespace. Each
// operation uses its own, since a Conn collects one batch for all callers.
func (m *Manager) nft() (*nftables.Conn, error) {
	var opts []nftables.ConnOption
	if m.ns >= 0 {
		opts = append(opts, nftables.WithNetNSFd(int(m.ns)))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, m.opError(err, "opening nftables")
	}
	return c, nil
}

// writeRuleset creates or rewrites the tables' base chains and their rules
// in one atomic batch. The ports chain and its per-VM rules are kept.
func (m *Manager) writeRuleset() error {
	c, err := m.nft()
	if err != nil {
		return err
	}
	defer c.CloseLasting()
	accept := nftables.ChainPolicyAccept
	br := m.cfg.Bridge

	inet := c.AddTable(m.inetTable())
	input := c.AddChain(&nftables.Chain{Name: chainInput, Table: inet, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	forward := c.AddChain(&nftables.Chain{Name: chainForward, Table: inet, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	post := c.AddChain(&nftables.Chain{Name: chainPostrouting, Table: inet, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept})
	for _, ch := range []*nftables.Chain{input, forward, post} {
		c.FlushChain(ch)
	}
	add := func(ch *nftables.Chain, exprs ...[]expr.Any) {
		c.AddRule(&nftables.Rule{Table: ch.Table, Chain: ch, Exprs: join(exprs...)})
	}

	// The host itself: only replies to what the host opened.
	add(input, iif(br), ctEstablished(), verdict(expr.VerdictAccept))
	add(input, iif(br), verdict(expr.VerdictDrop))

	add(forward, ctEstablished(), verdict(expr.VerdictAccept))
	add(forward, oif(br), verdict(expr.VerdictDrop)) // nobody opens connections into the VM subnet, VMs included
	add(forward, iif(br), notIPv4(), verdict(expr.VerdictDrop))
	add(forward, iif(br), ipDaddrIn(linkLocal), verdict(expr.VerdictDrop))
	for _, p := range m.deny {
		add(forward, iif(br), ipDaddrIn(p), verdict(expr.VerdictDrop))
	}
	if !m.cfg.AllowPrivate {
		// What the configuration names explicitly inside the private
		// ranges stays reachable: the DNS servers on port 53, and
		// EgressAllow entries.
		for _, d := range m.dns {
			// A server EgressAllow leaves out stays out.
			if !inPrivate(netip.PrefixFrom(d, 32)) || len(m.allow) > 0 && !slices.ContainsFunc(m.allow, func(p netip.Prefix) bool { return p.Contains(d) }) {
				continue
			}
			for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
				add(forward, iif(br), ipDaddrIn(netip.PrefixFrom(d, 32)), dport(proto, 53), verdict(expr.VerdictAccept))
			}
		}
		for _, p := range m.allow {
			if inPrivate(p) {
				add(forward, iif(br), ipDaddrIn(p), verdict(expr.VerdictAccept))
			}
		}
		for _, p := range PrivateRanges {
			add(forward, iif(br), ipDaddrIn(p), verdict(expr.VerdictDrop))
		}
	}
	if len(m.allow) > 0 {
		for _, p := range m.allow {
			add(forward, iif(br), ipDaddrIn(p), verdict(expr.VerdictAccept))
		}
		add(forward, iif(br), verdict(expr.VerdictDrop))
	}
	if m.cfg.Uplink != "" {
		add(post, isIPv4(), ipSaddrIn(m.subnet), oif(m.cfg.Uplink), []expr.Any{&expr.Masq{}})
	}

	// The bridge family: this kernel (and others) lacks "meta ibrname", so
	// frames are matched by their port's name, in per-VM rules.
	bridge := c.AddTable(m.bridgeTable())
	ports := c.AddChain(&nftables.Chain{Name: chainPorts, Table: bridge})
	pre := c.AddChain(&nftables.Chain{Name: chainPrerouting, Table: bridge, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityConntrack /* -200: bridge "filter" */, Policy: &accept})
	c.AddChain(&nftables.Chain{Name: chainBrForward, Table: bridge, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityConntrack, Policy: &accept})
	c.AddChain(&nftables.Chain{Name: chainOwners, Table: bridge})
	c.FlushChain(pre)
	add(pre, []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: ports.Name}})

	if err := c.Flush(); err != nil {
		return m.opError(err, "writing nftables tables %q (inet and bridge)", m.cfg.Table)
	}
	return nil
}

// vmRule is one per-VM rule and the bridge chain it goes in.
type vmRule struct {
	chain string
	exprs []expr.Any
}

// vmRules are the rules of a's port. In the ports chain (every frame from
// a VM port): its frames must carry its MAC, and its IPv4 and ARP packets
// its address; only IPv4 and ARP pass. In the bridge forward chain: none
// of its frames goes to another port (the port is also flagged isolated on
// the bridge, which enforces the same).
func (m *Manager) vmRules(a *Attachment) []vmRule {
	p := iif(a.TAP)
	drop, accept := verdict(expr.VerdictDrop), verdict(expr.VerdictAccept)
	ip := a.IP.Addr().AsSlice()
	rules := []vmRule{
		{chainPorts, join(p, payloadCmp(expr.PayloadBaseLLHeader, 6, expr.CmpOpNeq, a.MAC), drop)},
		{chainPorts, join(p, etherType(unix.ETH_P_ARP), payloadCmp(expr.PayloadBaseNetworkHeader, 8, expr.CmpOpNeq, a.MAC), drop)},
		{chainPorts, join(p, etherType(unix.ETH_P_ARP), payloadCmp(expr.PayloadBaseNetworkHeader, 14, expr.CmpOpNeq, ip), drop)},
		{chainPorts, join(p, etherType(unix.ETH_P_ARP), accept)},
		{chainPorts, join(p, etherType(unix.ETH_P_IP), payloadCmp(expr.PayloadBaseNetworkHeader, 12, expr.CmpOpNeq, ip), drop)},
		{chainPorts, join(p, etherType(unix.ETH_P_IP), accept)},
		{chainPorts, join(p, drop)},
		{chainBrForward, join(p, drop)},
	}
	return rules
}

// vmRuleChains are the bridge chains that hold per-VM rules.
var vmRuleChains = []string{chainPorts, chainBrForward}

// setVMRules replaces vmID's per-VM rules with rules (none to delete them)
// in one atomic batch.
func (m *Manager) setVMRules(vmID string, rules []vmRule) error {
	c, err := m.nft()
	if err != nil {
		return err
	}
	defer c.CloseLasting()
	table := m.bridgeTable()
	n := 0
	for _, name := range vmRuleChains {
		old, err := c.GetRules(table, &nftables.Chain{Name: name, Table: table})
		if err != nil {
			if isNoEnt(err) && len(rules) == 0 {
				return nil // no table, so no rules
			}
			return m.opError(err, "listing the rules of vm %s", vmID)
		}
		for _, r := range old {
			if id, ok := ruleVM(r); ok && id == vmID {
				if err := c.DelRule(r); err != nil {
					return m.opError(err, "deleting a rule of vm %s", vmID)
				}
				n++
			}
		}
	}
	if n == 0 && len(rules) == 0 {
		return nil
	}
	comment := userdata.AppendString(nil, userdata.TypeComment, vmCommentPrefix+vmID)
	for _, r := range rules {
		c.AddRule(&nftables.Rule{Table: table, Chain: &nftables.Chain{Name: r.chain, Table: table}, Exprs: r.exprs, UserData: comment})
	}
	if err := c.Flush(); err != nil {
		return m.opError(err, "writing the rules of vm %s", vmID)
	}
	return nil
}

// vmRuleCounts returns how many per-VM rules each VM has.
func (m *Manager) vmRuleCounts() (map[string]int, error) {
	c, err := m.nft()
	if err != nil {
		return nil, err
	}
	defer c.CloseLasting()
	table := m.bridgeTable()
	out := map[string]int{}
	for _, name := range vmRuleChains {
		rules, err := c.GetRules(table, &nftables.Chain{Name: name, Table: table})
		if isNoEnt(err) {
			return map[string]int{}, nil
		}
		if err != nil {
			return nil, m.opError(err, "listing the per-vm rules")
		}
		for _, r := range rules {
			if id, ok := ruleVM(r); ok {
				out[id]++
			}
		}
	}
	return out, nil
}

// tables returns which of the Manager's tables exist, as "inet NAME" and
// "bridge NAME".
func (m *Manager) tables() ([]string, error) {
	c, err := m.nft()
	if err != nil {
		return nil, err
	}
	defer c.CloseLasting()
	all, err := c.ListTables()
	if err != nil {
		return nil, m.opError(err, "listing nftables tables")
	}
	var out []string
	for _, t := range all {
		if t.Name != m.cfg.Table {
			continue
		}
		switch t.Family {
		case nftables.TableFamilyINet:
			out = append(out, "inet "+t.Name)
		case nftables.TableFamilyBridge:
			out = append(out, "bridge "+t.Name)
		}
	}
	return out, nil
}

// deleteTables removes the Manager's tables, with every chain and rule in
// them. Missing tables are fine.
func (m *Manager) deleteTables() error {
	for _, t := range []*nftables.Table{m.inetTable(), m.bridgeTable()} {
		c, err := m.nft()
		if err != nil {
			return err
		}
		c.DelTable(t)
		err = c.Flush()
		c.CloseLasting()
		if err != nil && !isNoEnt(err) {
			return m.opError(err, "deleting nftables table %s", t.Name)
		}
	}
	return nil
}

func ruleVM(r *nftables.Rule) (string, bool) {
	s, ok := userdata.GetString(r.UserData, userdata.TypeComment)
	if !ok || !strings.HasPrefix(s, vmCommentPrefix) {
		return "", false
	}
	return strings.TrimPrefix(s, vmCommentPrefix), true
}

// inPrivate reports whether p lies wholly inside one of PrivateRanges.
func inPrivate(p netip.Prefix) bool {
	for _, r := range PrivateRanges {
		if r.Bits() <= p.Bits() && r.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

// Claims: a rule in the owners chain, which nothing jumps to, whose
// comment names a VM and its owner. Attach writes it before anything else
// of the VM exists and Detach removes it last, so whatever of a VM a
// Manager sees, its claim is there too (read after the rest, see
// reconcile). Keeping it in the namespace's own tables means it lives and
// dies with the TAPs it describes, with no file or database of its own.
const claimPrefix = "aetherium owner="

func claimComment(owner, vmID string) string { return claimPrefix + owner + " vm=" + vmID }

// ruleClaim parses a claim's comment into its owner and VM.
func ruleClaim(r *nftables.Rule) (owner, vmID string, ok bool) {
	s, ok := userdata.GetString(r.UserData, userdata.TypeComment)
	if !ok || !strings.HasPrefix(s, claimPrefix) {
		return "", "", false
	}
	owner, vmID, ok = strings.Cut(strings.TrimPrefix(s, claimPrefix), " vm=")
	return owner, vmID, ok && vmID != ""
}

// claims returns the owner of every claimed VM.
func (m *Manager) claims() (map[string]string, error) {
	c, err := m.nft()
	if err != nil {
		return nil, err
	}
	defer c.CloseLasting()
	table := m.bridgeTable()
	rules, err := c.GetRules(table, &nftables.Chain{Name: chainOwners, Table: table})
	if isNoEnt(err) {
		return map[string]string{}, nil
	}
	if err != nil {
		return nil, m.opError(err, "listing the owners of vms")
	}
	out := map[string]string{}
	for _, r := range rules {
		if owner, id, ok := ruleClaim(r); ok {
			out[id] = owner
		}
	}
	return out, nil
}

// setClaim makes owner the only claim on vmID ("" removes every claim on
// it) in one atomic batch, and returns the owner it replaced, if another.
func (m *Manager) setClaim(vmID, owner string) (string, error) {
	c, err := m.nft()
	if err != nil {
		return "", err
	}
	defer c.CloseLasting()
	table := m.bridgeTable()
	chain := &nftables.Chain{Name: chainOwners, Table: table}
	old, err := c.GetRules(table, chain)
	if err != nil {
		if isNoEnt(err) && owner == "" {
			return "", nil
		}
		return "", m.opError(err, "reading the owner of vm %s", vmID)
	}
	var previous string
	have, changed := false, false
	for _, r := range old {
		o, id, ok := ruleClaim(r)
		if !ok || id != vmID {
			continue
		}
		if o == owner && !have {
			have = true
			continue
		}
		if o != owner {
			previous = o
		}
		if err := c.DelRule(r); err != nil {
			return "", m.opError(err, "deleting the claim of %s on vm %s", o, vmID)
		}
		changed = true
	}
	if owner != "" && !have {
		c.AddRule(&nftables.Rule{Table: table, Chain: chain,
			UserData: userdata.AppendString(nil, userdata.TypeComment, claimComment(owner, vmID))})
		changed = true
	}
	if !changed {
		return "", nil
	}
	if err := c.Flush(); err != nil {
		return "", m.opError(err, "writing the owner of vm %s", vmID)
	}
	return previous, nil
}

func isNoEnt(err error) bool {
	return err != nil && (errors.Is(err, unix.ENOENT) || strings.Contains(err.Error(), "no such file or directory"))
}

// The expression builders below each load into register 1 and compare.

func join(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func verdict(k expr.VerdictKind) []expr.Any { return []expr.Any{&expr.Verdict{Kind: k}} }

func metaName(key expr.MetaKey, name string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(name)},
	}
}

func iif(name string) []expr.Any { return metaName(expr.MetaKeyIIFNAME, name) }
func oif(name string) []expr.Any { return metaName(expr.MetaKeyOIFNAME, name) }

func nfproto(op expr.CmpOp) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
	}
}

func isIPv4() []expr.Any  { return nfproto(expr.CmpOpEq) }
func notIPv4() []expr.Any { return nfproto(expr.CmpOpNeq) }

func ctEstablished() []expr.Any {
	mask := binary.NativeEndian.AppendUint32(nil, expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED)
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

// ipAddrIn matches an IPv4 address at offset of the network header inside
// p; callers make sure the packet is IPv4.
func ipAddrIn(offset uint32, p netip.Prefix) []expr.Any {
	mask := net.CIDRMask(p.Bits(), 32)
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Masked().Addr().AsSlice()},
	}
}

func ipDaddrIn(p netip.Prefix) []expr.Any { return join(isIPv4(), ipAddrIn(16, p)) }
func ipSaddrIn(p netip.Prefix) []expr.Any { return ipAddrIn(12, p) }

func payloadCmp(base expr.PayloadBase, offset uint32, op expr.CmpOp, data []byte) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: base, Offset: offset, Len: uint32(len(data))},
		&expr.Cmp{Op: op, Register: 1, Data: data},
	}
}

// dport matches transport protocol proto with destination port port.
func dport(proto byte, port uint16) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, port)},
	}
}

func etherType(t uint16) []expr.Any {
	return payloadCmp(expr.PayloadBaseLLHeader, 12, expr.CmpOpEq, binary.BigEndian.AppendUint16(nil, t))
}
