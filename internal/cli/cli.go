// Package cli is aether-cli: a docker-like, scriptable command line over
// the public TaskService API. Exit codes: 0 success, the command's own code
// for exec, 2 bad usage or invalid input, 3 (exec) the command started but
// its outcome is unknown (its worker was lost; it was not run again), 1
// anything else (for exec: the command could not run).
//
// The commands on VMs, executions, files, tasks and jobs see only
// service.TaskService: with api_url set (AETHERIUM_API_URL) it is a
// pkg/client talking to aether-api, else the service on PostgreSQL and
// Redis. Output and exit codes are the same either way. Commands that need
// the host (doctor, image, network, apikey) use wiring.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/aetherium/aetherium-core/internal/wiring"
	"github.com/aetherium/aetherium-core/pkg/client"
	"github.com/aetherium/aetherium-core/pkg/config"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// exitError carries an exit code without printing anything more.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// usageError marks bad command-line usage.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// ExitCode maps an error to the process exit code, in one place.
func ExitCode(err error) int {
	var ee exitError
	var ue usageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.code
	case errors.As(err, &ue), errors.Is(err, types.ErrInvalid):
		return 2
	default:
		return 1
	}
}

type app struct {
	cfgPath string
	json    bool
	stdin   io.Reader
	stdout  io.Writer
	stderr  io.Writer

	cfg      *config.Config
	svc      service.TaskService
	closeSvc func()
}

// Main runs the CLI with args and returns the exit code.
func Main(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	a := &app{stdin: stdin, stdout: stdout, stderr: stderr}
	root := a.rootCmd()
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.Execute()
	if a.closeSvc != nil {
		a.closeSvc()
	}
	if err != nil {
		var ee exitError
		if !errors.As(err, &ee) {
			fmt.Fprintln(stderr, "aether-cli:", err)
		}
	}
	return ExitCode(err)
}

func (a *app) rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "aether-cli",
		Short: "Create VMs and run commands in them through Aetherium Core",
		Long: `Create VMs and run commands in them through Aetherium Core.

Exit codes: 0 success; for exec, the command's own code (124 when its
--timeout expired, 130 when interrupted); 2 bad usage or invalid input;
3 the command started but its outcome is unknown (its worker was lost);
it was not run again; 1 anything else (for exec: the command could not run).`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&a.cfgPath, "config", "", "configuration file (default: $AETHERIUM_CONFIG, ./aetherium.yaml, ~/.config/aetherium/config.yaml)")
	root.PersistentFlags().BoolVar(&a.json, "json", false, "print JSON with stable fields")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(a.vmCmd(), a.execCmd(), a.executionsCmd(), a.taskCmd(), a.jobCmd(), a.doctorCmd(), a.workersCmd(),
		a.newImageCmd(), a.networkCmd(wiring.NetworkConfig), a.cpCmd(), a.apikeyCmd(), a.templateCmd(), a.toolsCmd(), a.snapshotCmd())
	return root
}

// args wraps cobra's positional-argument checks as usage errors.
func args(check cobra.PositionalArgs) cobra.PositionalArgs {
	return func(cmd *cobra.Command, a []string) error {
		if err := check(cmd, a); err != nil {
			return usageError{fmt.Errorf("%s: %w; see `%s --help`", cmd.CommandPath(), err, cmd.CommandPath())}
		}
		return nil
	}
}

func (a *app) config() (*config.Config, error) {
	if a.cfg == nil {
		c, err := config.Load(a.cfgPath)
		if err != nil {
			return nil, err
		}
		a.cfg = c
	}
	return a.cfg, nil
}

// service returns the TaskService, connecting on first use: aether-api
// when the config names one (remote mode), else PostgreSQL and Redis.
func (a *app) service(ctx context.Context) (service.TaskService, error) {
	if a.svc != nil {
		return a.svc, nil
	}
	c, err := a.config()
	if err != nil {
		return nil, err
	}
	if c.APIURL != "" {
		cl, err := client.New(c.APIURL, c.APIKey, client.WithUserAgent("aether-cli"))
		if err != nil {
			return nil, err
		}
		a.svc, a.closeSvc = cl, cl.Close
		return cl, nil
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	svc, err := wiring.OpenService(cctx, c, wiring.Logger(config.Log{Level: "error"}, os.Stderr))
	if err != nil {
		return nil, err
	}
	a.svc, a.closeSvc = svc, svc.Close
	return svc, nil
}

func (a *app) printJSON(v any) error {
	enc := json.NewEncoder(a.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// parseKV parses repeated K=V flags.
func parseKV(flag string, items []string) (map[string]string, error) {
	if len(items) == 0 {
		return nil, nil
	}
	m := make(map[string]string, len(items))
	for _, it := range items {
		k, v, ok := strings.Cut(it, "=")
		if !ok || k == "" {
			return nil, usageError{fmt.Errorf("--%s %q must look like KEY=VALUE", flag, it)}
		}
		m[k] = v
	}
	return m, nil
}
