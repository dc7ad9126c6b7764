package worker

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Task outcomes, the values of aetherium_tasks_total's outcome label.
const (
	outcomeSucceeded = "succeeded"
	outcomeFailed    = "failed"
	outcomeRetried   = "retried"
)

// metrics are one worker's Prometheus series, on a registry of its own so
// that several workers in one process (tests, embedding) do not collide.
type metrics struct {
	reg          *prometheus.Registry
	vmCreate     *prometheus.HistogramVec
	exec         *prometheus.HistogramVec
	tasks        *prometheus.CounterVec
	queueLatency *prometheus.HistogramVec
	recovered    *prometheus.CounterVec
}

func newMetrics() *metrics {
	// Boots take from under a second (docker) to a minute (emulated
	// microVMs); commands and queueing are usually far shorter.
	slow := []float64{0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300}
	fast := []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}
	m := &metrics{
		reg: prometheus.NewRegistry(),
		vmCreate: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "aetherium_vm_create_duration_seconds",
			Help:    "Time from a VM's creation request (its row) until it runs.",
			Buckets: slow,
		}, []string{"provider"}),
		exec: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "aetherium_exec_duration_seconds",
			Help:    "Run time of commands in VMs, as the guest agent measured it.",
			Buckets: fast,
		}, []string{"provider"}),
		tasks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "aetherium_tasks_total",
			Help: "Task attempts that ended, by task type and outcome (succeeded, failed, retried).",
		}, []string{"type", "outcome"}),
		queueLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "aetherium_task_queue_latency_seconds",
			Help:    "Time from a task's submission (its row) until its first attempt starts.",
			Buckets: fast,
		}, []string{"type"}),
		recovered: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "aetherium_tasks_recovered_total",
			Help: "Tasks recovered after a fault: requeued (Asynq had lost them) or reclaimed (from this worker's killed previous run).",
		}, []string{"how"}),
	}
	m.reg.MustRegister(m.vmCreate, m.exec, m.tasks, m.queueLatency, m.recovered,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// taskEnded counts one finished attempt of a task.
func (m *metrics) taskEnded(typ string, state types.TaskState) {
	outcome := outcomeFailed
	switch state {
	case types.TaskSucceeded:
		outcome = outcomeSucceeded
	case types.TaskRetrying:
		outcome = outcomeRetried
	}
	m.tasks.WithLabelValues(typ, outcome).Inc()
}

// since is a duration in seconds, never negative (clocks of different
// hosts may disagree).
func since(t time.Time) float64 {
	return max(time.Since(t).Seconds(), 0)
}

// MetricsHandler serves this worker's metrics in the Prometheus format; it
// is what MetricsListen serves on /metrics.
func (w *Worker) MetricsHandler() http.Handler { return w.metrics.handler() }
