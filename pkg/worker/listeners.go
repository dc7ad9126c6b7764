package worker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/aetherium/aetherium-core/pkg/dataplane"
)

// Off is the listen address that disables a listener (as does "").
const Off = "off"

func disabled(addr string) bool { return addr == "" || addr == Off }

// listener is one HTTP server of the worker.
type listener struct {
	name string
	srv  *http.Server
	addr string // the bound address
	done chan struct{}
}

// listen binds addr (port 0: a free port) and serves h in the background.
// Only the header read is bounded: bodies are file content streamed for as
// long as it takes.
func (w *Worker) listen(name, addr string, h http.Handler) (*listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listening for the %s on %s: %w; free the port or set another address", name, addr, err)
	}
	l := &listener{name: name, addr: ln.Addr().String(), done: make(chan struct{}),
		srv: &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute}}
	go func() {
		defer close(l.done)
		if err := l.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			w.log.Error(name+" stopped serving", "addr", l.addr, "err", err)
		}
	}()
	w.log.Info(name+" listening", "addr", l.addr)
	return l, nil
}

// shutdown lets requests in flight finish for up to timeout, then cuts
// them. nil is a no-op.
func (l *listener) shutdown(timeout time.Duration) {
	if l == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := l.srv.Shutdown(ctx); err != nil {
		l.srv.Close()
	}
	<-l.done
}

// startListeners starts the data plane and the metrics endpoint as
// configured. A data plane without a token is refused with a warning, not
// an error: the worker still does its tasks, only files cannot reach it.
func (w *Worker) startListeners() error {
	if !disabled(w.cfg.DataListen) {
		if w.cfg.ClusterToken == "" {
			w.log.Warn("no cluster token: the data plane is off and files cannot be copied to or from this worker's VMs; set cluster.token (the same on the API and every worker)")
		} else {
			h, err := dataplane.NewHandler(dataplane.HandlerConfig{WorkerID: w.cfg.ID, Token: w.cfg.ClusterToken,
				VMM: w.vmm, Store: w.store, Logger: w.log.With("component", "dataplane")})
			if err != nil {
				return err
			}
			if w.data, err = w.listen("data plane", w.cfg.DataListen, h); err != nil {
				return err
			}
			w.dataAddr = w.cfg.DataAdvertise
			if w.dataAddr == "" {
				w.dataAddr = w.data.addr
				if host, _, _ := net.SplitHostPort(w.dataAddr); net.ParseIP(host).IsUnspecified() {
					w.log.Warn("the data plane listens on every address but advertises "+w.dataAddr+"; set worker.data_advertise to an address the API can reach", "addr", w.dataAddr)
				}
			}
		}
	}
	if !disabled(w.cfg.MetricsListen) {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", w.MetricsHandler())
		var err error
		if w.metricsLn, err = w.listen("metrics endpoint", w.cfg.MetricsListen, mux); err != nil {
			w.stopListeners()
			return err
		}
	}
	return nil
}

func (w *Worker) stopListeners() {
	w.data.shutdown(w.cfg.ShutdownTimeout)
	w.metricsLn.shutdown(w.cfg.ShutdownTimeout)
	w.data, w.metricsLn, w.dataAddr = nil, nil, ""
}

// DataAddr returns the address the data plane advertises, "" when it is
// off.
func (w *Worker) DataAddr() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.dataAddr
}

// MetricsAddr returns the bound address of the metrics endpoint, "" when
// it is off.
func (w *Worker) MetricsAddr() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.metricsLn == nil {
		return ""
	}
	return w.metricsLn.addr
}
