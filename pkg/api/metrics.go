package api

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// initMetrics builds the server's own registry: nothing is registered in
// the global one, so two servers in a process (tests) do not clash.
func (s *Server) initMetrics() {
	s.registry = prometheus.NewRegistry()
	s.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "aetherium_api_request_duration_seconds",
		Help:    "Time to answer an API request, by method, route pattern and status code.",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
	}, []string{"method", "route", "code"})
	s.registry.MustRegister(s.duration,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if s.store != nil {
		s.registry.MustRegister(&vmCollector{store: s.store})
	}
}

func (s *Server) metrics(w http.ResponseWriter, r *http.Request) error {
	if !s.cfg.MetricsEnabled {
		return fmt.Errorf("%w: metrics are disabled on this server (api.metrics_disabled)", types.ErrNotFound)
	}
	promhttp.HandlerFor(s.registry, promhttp.HandlerOpts{ErrorLog: slogPrinter{s}}).ServeHTTP(w, r)
	return nil
}

type slogPrinter struct{ s *Server }

func (p slogPrinter) Println(v ...any) { p.s.log.Warn("serving metrics", "error", fmt.Sprint(v...)) }

// vmCollector exports aetherium_vms at scrape time from the store, so the
// gauge is never stale and nothing has to keep it up to date.
type vmCollector struct{ store Store }

var vmsDesc = prometheus.NewDesc("aetherium_vms", "VMs that are not deleted, by state and provider.", []string{"state", "provider"}, nil)

// scrapeTimeout bounds the store query of one scrape.
const scrapeTimeout = 5 * time.Second

func (c *vmCollector) Describe(ch chan<- *prometheus.Desc) { ch <- vmsDesc }

func (c *vmCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	counts, err := countVMs(ctx, c.store)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(vmsDesc, err)
		return
	}
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(vmsDesc, prometheus.GaugeValue, float64(n), string(k.state), k.provider)
	}
}

type vmKey struct {
	state    types.VMState
	provider string
}

// countVMs counts live VMs by state and provider, with a zero for every
// live state of every provider seen so that series do not vanish.
func countVMs(ctx context.Context, st Store) (map[vmKey]int, error) {
	rows, err := st.CountVMs(ctx)
	if err != nil {
		return nil, fmt.Errorf("counting vms: %w", err)
	}
	counts := map[vmKey]int{}
	providers := map[string]bool{}
	for _, r := range rows {
		counts[vmKey{r.State, r.Provider}] += r.N
		providers[r.Provider] = true
	}
	for p := range providers {
		for _, state := range types.AllVMStates {
			if state != types.VMDeleted {
				counts[vmKey{state, p}] += 0
			}
		}
	}
	return counts, nil
}

func (s *Server) healthz(w http.ResponseWriter, r *http.Request) error {
	if s.store != nil {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		if err := s.store.Ping(ctx); err != nil {
			s.log.Warn("health check: the store does not answer", "error", err)
			return fmt.Errorf("%w: the state store (PostgreSQL) does not answer: %v", types.ErrUnavailable, err)
		}
	}
	return writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}
