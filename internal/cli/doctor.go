package cli

import (
	"context"
	"fmt"
	"net"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/aetherium/aetherium-core/internal/wiring"
	"github.com/aetherium/aetherium-core/pkg/client"
	"github.com/aetherium/aetherium-core/pkg/config"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
)

// check is one line of the doctor's report.
type check struct {
	Name   string `json:"check"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
	// Warning marks a check whose failure does not fail doctor: something
	// that may simply not be meant to run here.
	Warning bool `json:"warning,omitempty"`
}

// workerStale is how old a heartbeat may be before its worker counts as down.
const workerStale = 30 * time.Second

func (a *app) doctorCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "doctor",
		Short: "Check PostgreSQL, Redis, the schema, the workers and the VM backend, with a fix for each failure",
		Args:  args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			checks := a.diagnose(cmd.Context())
			failed := 0
			for _, c := range checks {
				if !c.OK && !c.Warning {
					failed++
				}
			}
			if a.json {
				if err := a.printJSON(checks); err != nil {
					return err
				}
			} else {
				tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				for _, c := range checks {
					status := "ok"
					switch {
					case !c.OK && c.Warning:
						status = "warn"
					case !c.OK:
						status = "FAIL"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\n", status, c.Name, c.Detail)
					if c.Fix != "" {
						fmt.Fprintf(tw, "\t\tfix: %s\n", c.Fix)
					}
				}
				tw.Flush()
			}
			if failed > 0 {
				return exitError{1}
			}
			return nil
		},
	}
}

func (a *app) diagnose(ctx context.Context) []check {
	var out []check
	add := func(name string, err error, ok, fix string) bool {
		if err != nil {
			out = append(out, check{Name: name, Detail: err.Error(), Fix: fix})
			return false
		}
		out = append(out, check{Name: name, OK: true, Detail: ok})
		return true
	}
	cfg, err := a.config()
	if !add("config", err, "loaded "+orDefaults(config.Path(a.cfgPath)), "fix the file named above; every key is documented in aetherium.example.yaml") {
		return out
	}
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()

	store, err := wiring.OpenStore(ctx, cfg)
	pgAt := fmt.Sprintf("%s:%d", cfg.Storage.Host, cfg.Storage.Port)
	if add("postgresql", err, "reachable at "+pgAt, "start it with `make services-up`, or point storage.host/storage.port at a running server") {
		defer store.Close()
		v, dirty, err := store.SchemaVersion(ctx)
		latest := postgres.LatestVersion()
		switch {
		case err != nil:
			add("schema", err, "", "apply the schema with `make migrate-up`")
		case dirty:
			add("schema", fmt.Errorf("migration %d failed halfway (dirty)", v), "", fmt.Sprintf("repair what migration %d half-did, then `./bin/migrate force %d` and `./bin/migrate up`", v, v-1))
		case v < latest:
			add("schema", fmt.Errorf("version %d, but this build needs %d", v, latest), "", "apply the schema with `make migrate-up`")
		default:
			add("schema", nil, fmt.Sprintf("version %d (latest)", v), "")
		}
		a.checkWorkers(ctx, store, cfg, add)
	}
	q, err := wiring.OpenQueue(ctx, cfg)
	if add("redis", err, "reachable at "+cfg.Queue.RedisAddr, "start it with `make services-up`, or set queue.redis_addr") {
		q.Close()
	}
	for _, ch := range wiring.DiagnoseVMM(ctx, cfg) {
		out = append(out, check{Name: cfg.VMM.Provider + " " + ch.Name, OK: ch.OK, Detail: ch.Detail, Fix: ch.Fix})
	}
	out = append(out, checkJail(cfg)...)
	add("vmm "+cfg.VMM.Provider, wiring.CheckVMM(ctx, cfg), "usable from this host",
		"Worker can't create VMs: "+vmmFix(cfg.VMM.Provider))
	out = append(out, a.checkAPI(ctx, cfg)...)
	out = append(out, a.checkTools(ctx, cfg)...)
	return out
}

// apiHealthTimeout bounds doctor's GET /healthz.
const apiHealthTimeout = 3 * time.Second

// checkAPI asks aether-api for /healthz: at api_url when the CLI is in
// remote mode (then a failure fails doctor: no command would work), else at
// api.listen, where it only warns, as the API need not run for the local
// CLI.
func (a *app) checkAPI(ctx context.Context, cfg *config.Config) []check {
	u, remote := cfg.APIURL, cfg.APIURL != ""
	if !remote {
		if cfg.API.Listen == "" || cfg.API.Listen == "off" {
			return []check{{Name: "aether-api", OK: true, Detail: "api.listen is off"}}
		}
		host, port, err := net.SplitHostPort(cfg.API.Listen)
		if err != nil {
			return []check{{Name: "aether-api", Detail: err.Error(), Fix: "set api.listen to host:port, e.g. 127.0.0.1:8080", Warning: true}}
		}
		if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
			host = "127.0.0.1"
		}
		scheme := "http"
		if cfg.API.TLSCertFile != "" {
			scheme = "https"
		}
		u = scheme + "://" + net.JoinHostPort(host, port)
	}
	c := check{Name: "aether-api", Warning: !remote}
	cl, err := client.New(u, cfg.APIKey)
	if err != nil {
		c.Detail, c.Fix = err.Error(), "set AETHERIUM_API_URL (api_url) to the API's base URL"
		return []check{c}
	}
	defer cl.Close()
	hctx, cancel := context.WithTimeout(ctx, apiHealthTimeout)
	defer cancel()
	if err := cl.Health(hctx); err != nil {
		c.Detail = fmt.Sprintf("no answer at %s/healthz: %v", u, err)
		c.Fix = "start it with `make up` (or `aether-api`)"
		if remote {
			c.Fix += ", or point AETHERIUM_API_URL (api_url) at a running one"
		}
		return []check{c}
	}
	c.OK, c.Detail = true, "answers at "+u
	if !remote {
		return []check{c}
	}
	// In remote mode every command needs the key: try it.
	k := check{Name: "aether-api key", OK: true, Detail: "accepted"}
	if _, err := cl.ListVMsWithOptions(hctx, service.ListVMsOptions{Limit: 1}); err != nil {
		k.OK, k.Detail = false, err.Error()
		k.Fix = "set AETHERIUM_API_KEY (api_key) to a key from `aether-cli apikey create NAME`, run where PostgreSQL is reachable"
	}
	return []check{c, k}
}

func (a *app) checkWorkers(ctx context.Context, store storage.Store, cfg *config.Config, add func(string, error, string, string) bool) {
	workers, err := store.ListWorkers(ctx)
	if err != nil {
		add("workers", err, "", "apply the schema with `make migrate-up`")
		return
	}
	alive := 0
	for _, w := range workers {
		if time.Since(w.LastSeen) > workerStale {
			continue
		}
		alive++
		var werr error
		if !w.Healthy {
			werr = fmt.Errorf("%s (%s on %s): %s", w.ID, w.Provider, w.Hostname, w.Detail)
		}
		add("worker "+w.ID, werr, fmt.Sprintf("%s on %s, seen %s ago", w.Provider, w.Hostname, time.Since(w.LastSeen).Round(time.Second)),
			"Worker can't create VMs: "+vmmFix(w.Provider))
	}
	if alive == 0 {
		add("workers", fmt.Errorf("no worker has reported in the last %s, so tasks will wait in the queue", workerStale), "",
			"start one with `make up` (background) or `make run-worker`")
	}
}

func vmmFix(provider string) string {
	switch provider {
	case "docker":
		return "start a Docker engine (`make up` starts a private dockerd) or set vmm.docker.host"
	case "qemu":
		return "fix the qemu checks above (`./scripts/setup.sh` installs QEMU; `make guest-image` builds the guest image)"
	default:
		return "set vmm.provider to docker, or see docs/ for the " + provider + " prerequisites"
	}
}

func orDefaults(p string) string {
	if p == "" {
		return "(no file: defaults and AETHERIUM_* variables)"
	}
	return p
}
