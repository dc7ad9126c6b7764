// Command migrate applies Aetherium Core's database schema:
// `migrate up`, `migrate down [N]` and `migrate status`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/aetherium/aetherium-core/pkg/config"
	"github.com/aetherium/aetherium-core/pkg/storage/postgres"
	"github.com/aetherium/aetherium-core/pkg/types"
)

const usage = `usage: migrate [--config FILE] up | down [N] | status | force V

  up       apply every pending migration
  down N   revert the last N migrations (default: all)
  status   print the applied version and whether it is dirty
  force V  mark version V as applied and clean, after repairing a
           migration that failed halfway`

func main() {
	err := run()
	switch {
	case err == nil:
	case errors.Is(err, types.ErrInvalid):
		fmt.Fprintln(os.Stderr, "migrate:", err)
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "migrate:", err)
		os.Exit(1)
	}
}

func run() error {
	cfgPath := flag.String("config", "", "configuration file")
	flag.Usage = func() { fmt.Fprintln(os.Stderr, usage) }
	flag.Parse()
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dsn := cfg.Storage.DSN()
	switch flag.Arg(0) {
	case "up":
		if err := postgres.MigrateUp(ctx, dsn); err != nil {
			return err
		}
	case "down":
		steps := 0
		if a := flag.Arg(1); a != "" {
			if steps, err = strconv.Atoi(a); err != nil || steps < 1 {
				return fmt.Errorf("%w: down takes a positive number of steps, got %q", types.ErrInvalid, a)
			}
		}
		if err := postgres.MigrateDown(ctx, dsn, steps); err != nil {
			return err
		}
	case "force":
		v, err := strconv.ParseUint(flag.Arg(1), 10, 32)
		if err != nil {
			return fmt.Errorf("%w: force takes the version to mark as applied, got %q", types.ErrInvalid, flag.Arg(1))
		}
		if err := postgres.MigrateForce(ctx, dsn, uint(v)); err != nil {
			return err
		}
	case "status":
	default:
		return fmt.Errorf("%w: unknown command %q\n%s", types.ErrInvalid, flag.Arg(0), usage)
	}
	v, dirty, err := postgres.MigrateStatus(ctx, dsn)
	if err != nil {
		return err
	}
	fmt.Printf("version %d of %d, dirty=%t\n", v, postgres.LatestVersion(), dirty)
	return nil
}
