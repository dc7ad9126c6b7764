package worker

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// usageCollector exports each running VM's host usage, read from its
// cgroup at scrape time, for backends that confine VMs in cgroups of their
// own (vmm.UsageReporter). Reading at scrape time keeps no state and
// never reports a deleted VM.
type usageCollector struct {
	orch     vmm.VMOrchestrator
	usage    vmm.UsageReporter
	cpu, mem *prometheus.Desc
}

// usageScrapeTimeout bounds one scrape's walk over the worker's VMs.
const usageScrapeTimeout = 5 * time.Second

func newUsageCollector(o vmm.VMOrchestrator, u vmm.UsageReporter) *usageCollector {
	return &usageCollector{
		orch:  o,
		usage: u,
		cpu: prometheus.NewDesc("aetherium_vm_cpu_seconds_total",
			"CPU time the VM's VMM processes used since it booted, from its cgroup.", []string{"vm_id"}, nil),
		mem: prometheus.NewDesc("aetherium_vm_memory_bytes",
			"Host memory charged to the VM's cgroup now (guest memory the VMM touched included).", []string{"vm_id"}, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *usageCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.cpu
	ch <- c.mem
}

// Collect implements prometheus.Collector. VMs that stop or go while it
// runs are left out, as are VMs without a cgroup (confinement off).
func (c *usageCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), usageScrapeTimeout)
	defer cancel()
	vms, err := c.orch.ListVMs(ctx)
	if err != nil {
		return
	}
	for _, vm := range vms {
		if vm.State != types.VMRunning {
			continue
		}
		u, err := c.usage.Usage(ctx, vm.ID)
		if err != nil {
			continue
		}
		ch <- prometheus.MustNewConstMetric(c.cpu, prometheus.CounterValue, float64(u.CPUNanos)/1e9, vm.ID)
		ch <- prometheus.MustNewConstMetric(c.mem, prometheus.GaugeValue, float64(u.MemoryBytes), vm.ID)
	}
}

// watchUsage registers the per-VM usage series when the backend reports
// them.
func (m *metrics) watchUsage(o vmm.VMOrchestrator) {
	if u, ok := o.(vmm.UsageReporter); ok {
		m.reg.MustRegister(newUsageCollector(o, u))
	}
}
