package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// cpEnd is one side of a copy: a path in a VM (vm set) or on this host
// ("-": stdin or stdout).
type cpEnd struct {
	vm, path string
}

// parseCpEnd reads docker cp's form: ID:/path names a file in VM ID,
// anything else a local path.
func parseCpEnd(s string) cpEnd {
	if id, p, ok := strings.Cut(s, ":"); ok {
		if _, err := parseUUID("vm", id); err == nil {
			return cpEnd{vm: id, path: p}
		}
	}
	return cpEnd{path: s}
}

func (a *app) cpCmd() *cobra.Command {
	var (
		mode  string
		mkdir bool
		user  string
	)
	cmd := &cobra.Command{
		Use:   "cp SRC DST",
		Short: "Copy a file into or out of a VM: cp ./local ID:/path, cp ID:/path ./local (- for stdin/stdout)",
		Long: `Copy one file between this host and a running VM, in docker cp's form:
ID:/absolute/path names a file in a VM. Either SRC or DST is in a VM, never
both. "-" as SRC reads stdin, as DST writes to stdout. A DST that is a
directory (or, in a VM, ends with /) receives the file under SRC's name.
The file is streamed, whatever its size; a local DST appears only once the
whole file has arrived. --mode, --mkdir and --user apply to a file written
into a VM (--mode also to a local one).`,
		Args: args(cobra.ExactArgs(2)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			src, dst := parseCpEnd(argv[0]), parseCpEnd(argv[1])
			var o types.FileOptions
			if mode != "" {
				m, err := strconv.ParseUint(mode, 8, 32)
				if err != nil || m&^0o7777 != 0 {
					return usageError{fmt.Errorf("cp: --mode %q must be octal permission bits such as 0644", mode)}
				}
				o.Mode = uint32(m)
			}
			o.MakeParents, o.User = mkdir, user
			switch {
			case src.vm != "" && dst.vm != "":
				return usageError{fmt.Errorf("cp: both SRC and DST are in a VM; copy through this host with `aether-cli cp ID:/path - | aether-cli cp - ID2:/path`")}
			case src.vm == "" && dst.vm == "":
				return usageError{fmt.Errorf("cp: neither SRC nor DST is in a VM; name one as ID:/path")}
			}
			// Ctrl-C ends the copy cleanly: no temporary file is left.
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			svc, err := a.service(ctx)
			if err != nil {
				return err
			}
			var n int64
			if dst.vm != "" {
				n, err = a.upload(ctx, svc, src.path, dst, o)
			} else {
				n, err = a.download(ctx, svc, src, dst.path, o.Mode)
			}
			if err != nil && ctx.Err() != nil && cmd.Context().Err() == nil {
				return exitError{exitInterrupted}
			}
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(map[string]any{"source": argv[0], "destination": argv[1], "bytes": n})
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&mode, "mode", "", "permission bits of the written file, octal (default: the local file's, or 0644)")
	f.BoolVar(&mkdir, "mkdir", false, "create missing parent directories in the VM")
	f.StringVarP(&user, "user", "u", "", "owner of the file written into the VM, a name or uid (default: root)")
	return cmd
}

func (a *app) upload(ctx context.Context, svc service.TaskService, src string, dst cpEnd, o types.FileOptions) (int64, error) {
	var r io.Reader = a.stdin
	if src != "-" {
		f, err := os.Open(src)
		if err != nil {
			return 0, fmt.Errorf("cp: %w", err)
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return 0, fmt.Errorf("cp: %w", err)
		}
		if st.IsDir() {
			return 0, fmt.Errorf("%w: cp: %s is a directory; copy one file at a time (or a tar archive)", types.ErrInvalid, src)
		}
		if o.Mode == 0 {
			o.Mode = uint32(st.Mode().Perm())
		}
		r = f
	} else if r == nil {
		r = strings.NewReader("")
	}
	p := dst.path
	if strings.HasSuffix(p, "/") {
		if src == "-" {
			return 0, fmt.Errorf("%w: cp: %s ends with / but stdin has no name; give the whole path", types.ErrInvalid, dst.path)
		}
		p += filepath.Base(src)
	}
	return svc.WriteFile(ctx, dst.vm, p, r, o)
}

func (a *app) download(ctx context.Context, svc service.TaskService, src cpEnd, dst string, mode uint32) (int64, error) {
	if dst == "-" {
		return svc.ReadFile(ctx, src.vm, src.path, a.stdout)
	}
	if st, err := os.Stat(dst); err == nil && st.IsDir() {
		dst = filepath.Join(dst, path.Base(src.path))
	}
	// A temporary file beside dst, renamed over it once complete, so that
	// dst never holds half a file.
	tmp, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".aether-cp-*")
	if err != nil {
		return 0, fmt.Errorf("cp: %w", err)
	}
	n, err := svc.ReadFile(ctx, src.vm, src.path, tmp)
	if err == nil {
		if mode == 0 {
			mode = 0o644
		}
		err = tmp.Chmod(os.FileMode(mode))
	}
	err = errors.Join(err, tmp.Close())
	if err == nil {
		err = os.Rename(tmp.Name(), dst)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return n, err
	}
	return n, nil
}
