package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/network"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Network gives nat VMs their network (see network.VMNetwork);
// *network.Manager implements it.
type Network = network.VMNetwork

// netFile is a nat VM's attachment as recorded in vm.json, so a restarted
// worker boots it with the same TAP, MAC and address.
type netFile struct {
	TAP       string `json:"tap"`
	MAC       string `json:"mac"`
	IP        string `json:"ip"`
	KernelArg string `json:"kernel_arg"`
}

func newNetFile(a *network.Attachment) *netFile {
	return &netFile{TAP: a.TAP, MAC: a.MAC.String(), IP: a.IP.String(), KernelArg: a.KernelArg}
}

// attach gives a nat VM its network (idempotent) and returns what vm.json
// records of it.
func (o *Orchestrator) attach(ctx context.Context, id string) (*netFile, error) {
	a, err := o.net.Attach(ctx, id)
	if err != nil {
		return nil, err
	}
	return newNetFile(a), nil
}

// detach removes a VM's network. Without a network manager there is none.
func (o *Orchestrator) detach(ctx context.Context, id string) error {
	return o.net.Detach(ctx, id)
}

// netArgs are QEMU's network device arguments for a nat VM.
func netArgs(n *netFile) []string {
	if n == nil {
		return nil
	}
	return []string{
		"-netdev", "tap,id=n0,ifname=" + n.TAP + ",script=no,downscript=no",
		"-device", "virtio-net-device,netdev=n0,mac=" + n.MAC,
	}
}

// inNetns runs fn where the VM's processes must run: in the network's
// namespace for a nat VM, here otherwise.
func (o *Orchestrator) inNetns(n *netFile, fn func() error) error {
	if n == nil {
		return fn()
	}
	return o.net.Do(fn)
}

// Reconcile removes what a killed worker left half-made: temporary
// directories of CreateVM calls that never finished, and the network
// (TAPs, rules, leases) of every VM that has no vm.json in the run
// directory. The worker runs it at start, before it takes tasks. It is
// idempotent; creates in progress in this process are left alone.
//
// The network's Reconcile is given only this backend's VMs; it removes
// only what its own manager (network.Config.Owner, the worker's id)
// attached, so workers with distinct ids may share a bridge and pool.
func (o *Orchestrator) Reconcile(ctx context.Context) error {
	ents, err := os.ReadDir(o.cfg.RunDir)
	if err != nil {
		return fmt.Errorf("reconciling vms in %s: %w", o.cfg.RunDir, err)
	}
	o.mu.Lock()
	creating := map[string]bool{}
	live := []string{}
	for id, tmp := range o.creating {
		creating[tmp] = true
		live = append(live, id)
	}
	o.mu.Unlock()
	var errs []error
	for _, e := range ents {
		name := e.Name()
		path := filepath.Join(o.cfg.RunDir, name)
		if strings.HasPrefix(name, createPrefix) {
			if creating[path] {
				continue
			}
			if err := os.RemoveAll(path); err != nil {
				errs = append(errs, fmt.Errorf("removing a half-made vm directory: %w", err))
				continue
			}
			o.log.Info("reconcile removed a half-made vm directory", "dir", path)
			continue
		}
		if !e.IsDir() || types.ValidateID(name) != nil {
			continue
		}
		if _, err := o.readVM(name); errors.Is(err, types.ErrNotFound) {
			continue
		}
		// An unreadable vm.json still counts as live: its network is
		// kept rather than pulled from under a VM that may run.
		live = append(live, name)
	}
	if err := o.net.Reconcile(ctx, o.log, live); err != nil {
		errs = append(errs, err)
	}
	ids := map[string]bool{}
	for _, id := range live {
		ids[id] = true
	}
	if err := o.reconcileJail(ids); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Agent returns the agent client of a running VM (for tests and tools that
// copy files into the guest). The client belongs to the Orchestrator: do
// not close it.
func (o *Orchestrator) Agent(id string) (*agent.Client, error) {
	if types.ValidateID(id) != nil {
		return nil, notFound(id)
	}
	if p := o.procs(id); p == nil || !p.qemu.Alive() {
		return nil, fmt.Errorf("%w: vm %s is not running; start it first", types.ErrConflict, id)
	}
	return o.client(id)
}
