package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/aetherium/aetherium-core/pkg/agent/agentpb"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Identity is what makes a guest distinct from the other clones of its
// snapshot. A zero field leaves that part of the guest as it is.
type Identity struct {
	// Hostname is the guest's host name (an RFC 1123 label); it is set in
	// the kernel and written to /etc/hostname.
	Hostname string
	// MachineID is written to /etc/machine-id (and a regular
	// /var/lib/dbus/machine-id): 32 lowercase hex digits, not all zero
	// (NewMachineID makes one).
	MachineID string
	// Entropy is mixed into the guest kernel's pool, credited, and the
	// guest's CRNG reseeded from it; at most MaxIdentityEntropy bytes from
	// the host's CSPRNG.
	Entropy []byte
	// Time is the host's time; the guest's clock is stepped to it. The
	// guest ends behind the host by the call's one-way latency (the
	// request is built just before it is sent).
	Time time.Time
	// Net moves the guest's NIC to a new identity; nil keeps it.
	Net *NetIdentity
}

// NetIdentity is a guest NIC's new identity on its network.
type NetIdentity struct {
	// Interface names the NIC in the guest; empty: the guest's eth0.
	Interface string
	// MAC is the NIC's new unicast MAC; nil keeps it.
	MAC net.HardwareAddr
	// Addr is the NIC's IPv4 address with the subnet's length (required);
	// every other IPv4 address of the NIC is removed, and so are its
	// neighbour (ARP) entries.
	Addr netip.Prefix
	// Gateway is the default route, inside Addr's subnet; invalid (zero)
	// sets none.
	Gateway netip.Addr
	// DNS are written to the guest's /etc/resolv.conf; none leaves it.
	DNS []netip.Addr
}

// SetIdentity gives the guest id: in this order it steps the clock, mixes
// in the entropy and reseeds the CRNG, sets the hostname, writes the
// machine id and moves the NIC (then announces it with a gratuitous ARP).
// Zero fields are left as they are, so an Identity with only Time is a
// clock sync (see SyncClock).
//
// The agent checks the whole request before it changes anything: a bad
// field fails with types.ErrInvalid and no effect. It is idempotent: the
// same Identity again changes nothing more (the clock is stepped again, to
// the new Time). A system call that fails leaves the effects before it
// in place. An agent older than protocol 6 fails with
// types.ErrNotSupported. If ctx ends, the agent may have applied part of
// id; call again.
func (c *Client) SetIdentity(ctx context.Context, id Identity) error {
	op := "setting the guest's identity"
	req := &agentpb.SetIdentityRequest{
		Hostname:  id.Hostname,
		MachineId: id.MachineID,
		Entropy:   id.Entropy,
	}
	if n := id.Net; n != nil {
		if !n.Addr.IsValid() {
			return fmt.Errorf("%s: %w: the network identity has no address", op, types.ErrInvalid)
		}
		req.Network = &agentpb.NetworkIdentity{Interface: n.Interface, Address: n.Addr.String()}
		if n.MAC != nil {
			req.Network.Mac = n.MAC.String()
		}
		if n.Gateway.IsValid() {
			req.Network.Gateway = n.Gateway.String()
		}
		for _, d := range n.DNS {
			req.Network.Dns = append(req.Network.Dns, d.String())
		}
	}
	if !id.Time.IsZero() {
		req.UnixNano = id.Time.UnixNano()
	}
	if _, err := c.api.SetIdentity(ctx, req); err != nil {
		return c.revisionError(ctx, op, err, protocolIdentity)
	}
	return nil
}

// NewMachineID returns a random machine id in machine-id(5)'s format: a
// version 4 UUID as 32 lowercase hex digits, as systemd-machine-id-setup
// makes one.
func NewMachineID() string {
	var b [16]byte
	rand.Read(b[:]) // never fails (crypto/rand)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return hex.EncodeToString(b[:])
}

// SyncClock steps the guest's clock to the host's time now, as after
// resuming a suspended guest. It is SetIdentity with only Time.
func (c *Client) SyncClock(ctx context.Context) error {
	return c.SetIdentity(ctx, Identity{Time: time.Now()})
}
