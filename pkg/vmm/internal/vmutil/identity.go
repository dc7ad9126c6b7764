package vmutil

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/agent/bootparams"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// CloneEntropyBytes is how much of the host's randomness Reidentify gives
// a clone: 512 bits, twice the kernel's input pool, so that the clone's
// CRNG no longer depends on the state it shares with its siblings.
const CloneEntropyBytes = 64

// Reidentify gives a guest restored from a snapshot its own identity
// through its agent, before anything else talks to it: the hostname a cold
// boot of spec gets (bootparams.SanitizeHostname of its name, as the
// backends write aetherium.hostname=), a fresh random machine id,
// CloneEntropyBytes from the host's CSPRNG (the guest's CRNG is reseeded
// from them), the host's time (the guest ends behind by the call's one-way
// latency) and, when net is not nil, the clone's own MAC, address, gateway
// and name servers on its network.
//
// It is safe to call again: the agent's SetIdentity is idempotent, and a
// retry gives a new machine id and fresh entropy, which is what a clone
// needs. Errors are the agent client's (types.ErrNotSupported for a guest
// agent older than protocol 6, types.ErrInvalid for a bad net); if ctx
// ends, the guest may have part of its new identity, and the call should
// be retried or the clone deleted.
func Reidentify(ctx context.Context, c *agent.Client, spec types.VMSpec, net *agent.NetIdentity) error {
	entropy := make([]byte, CloneEntropyBytes)
	rand.Read(entropy) // never fails (crypto/rand)
	id := agent.Identity{
		Hostname:  bootparams.SanitizeHostname(spec.Name),
		MachineID: agent.NewMachineID(),
		Entropy:   entropy,
		Net:       net,
		Time:      time.Now(),
	}
	if err := c.SetIdentity(ctx, id); err != nil {
		return fmt.Errorf("giving clone %q its own identity: %w", spec.Name, err)
	}
	return nil
}

// SeedBoot gives a guest that has just booted CloneEntropyBytes of the
// host's randomness (credited, so the guest's CRNG is initialised at once)
// and the host's time (its RTC gave it whole seconds), through its agent,
// before the VM is reported ready.
//
// Without it, a guest kernel with no hardware RNG (the qemu microvm and
// Firecracker give none, and TCG's CPU model has no RDRAND) initialises its
// CRNG from timing jitter about a second after boot, and until then every
// getrandom(2) blocks: the first command of a freshly booted VM (and the
// agent's own start of it) waited for that second. A guest agent older
// than protocol 6 cannot take it; that is logged and the boot goes on.
func SeedBoot(ctx context.Context, c *agent.Client, log *slog.Logger, id string) error {
	entropy := make([]byte, CloneEntropyBytes)
	rand.Read(entropy) // never fails (crypto/rand)
	err := c.SetIdentity(ctx, agent.Identity{Entropy: entropy, Time: time.Now()})
	if errors.Is(err, types.ErrNotSupported) {
		log.Warn("the guest agent cannot take the host's entropy; its first commands may wait for its RNG", "vm_id", id, "err", err)
		return nil
	}
	if err != nil {
		return fmt.Errorf("seeding the guest's RNG from the host: %w", err)
	}
	return nil
}

// SyncClock steps the guest's clock to the host's time, as a resumed
// guest needs after time passed while it was suspended. Calling it again is
// harmless; errors are the agent client's.
func SyncClock(ctx context.Context, c *agent.Client) error {
	if err := c.SyncClock(ctx); err != nil {
		return fmt.Errorf("stepping the guest's clock to the host's: %w", err)
	}
	return nil
}
