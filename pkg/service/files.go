package service

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// DataPlane carries file content, and connections to the guest agents,
// straight between the service and the worker that owns a VM, bypassing
// the queue: a file may be far larger than anything Redis should hold, and
// it is streamed, never buffered whole. pkg/dataplane implements it over
// HTTP.
type DataPlane interface {
	// WriteFile streams r into path in VM vmID through the worker whose
	// data plane listens at addr.
	WriteFile(ctx context.Context, addr, vmID, path string, r io.Reader, o types.FileOptions) (int64, error)
	// ReadFile streams path in VM vmID to w through the worker at addr.
	// Nothing is written to w when the file cannot be opened.
	ReadFile(ctx context.Context, addr, vmID, path string, w io.Writer) (int64, error)
	// DialAgent opens a byte stream to the gRPC server of VM vmID's guest
	// agent through the worker at addr. ctx bounds the dial only; the
	// caller closes the conn.
	DialAgent(ctx context.Context, addr, vmID string) (net.Conn, error)
}

// MaxPathLength bounds a guest path (Linux's PATH_MAX).
const MaxPathLength = 4096

// ValidateGuestPath checks a path in a guest: absolute, clean of NUL bytes
// and at most MaxPathLength long.
func ValidateGuestPath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("%w: the file path is empty; give an absolute path such as /tmp/data.txt", types.ErrInvalid)
	case !strings.HasPrefix(p, "/"):
		return fmt.Errorf("%w: file path %q is relative; give an absolute path such as /%s", types.ErrInvalid, p, strings.TrimPrefix(path.Clean(p), "./"))
	case strings.ContainsRune(p, 0):
		return fmt.Errorf("%w: file path %q contains a NUL byte", types.ErrInvalid, p)
	case len(p) > MaxPathLength:
		return fmt.Errorf("%w: file path is %d bytes long; at most %d are allowed", types.ErrInvalid, len(p), MaxPathLength)
	}
	return nil
}

func (s *Service) WriteFile(ctx context.Context, vmID, p string, r io.Reader, o types.FileOptions) (int64, error) {
	if err := ValidateGuestPath(p); err != nil {
		return 0, err
	}
	if o.Mode&^0o7777 != 0 {
		return 0, fmt.Errorf("%w: file mode %#o has bits beyond 07777", types.ErrInvalid, o.Mode)
	}
	addr, vm, err := s.dataAddr(ctx, vmID, "write a file into")
	if err != nil {
		return 0, err
	}
	return s.opts.dataPlane.WriteFile(ctx, addr, vm, p, r, o)
}

func (s *Service) ReadFile(ctx context.Context, vmID, p string, w io.Writer) (int64, error) {
	if err := ValidateGuestPath(p); err != nil {
		return 0, err
	}
	addr, vm, err := s.dataAddr(ctx, vmID, "read a file from")
	if err != nil {
		return 0, err
	}
	return s.opts.dataPlane.ReadFile(ctx, addr, vm, p, w)
}

// dataAddr finds the data plane of the worker owning a running VM.
func (s *Service) dataAddr(ctx context.Context, vmID, what string) (addr, id string, err error) {
	if s.opts.dataPlane == nil {
		return "", "", fmt.Errorf("%w: cannot %s vm %s: this service has no data plane to reach the workers; give it one with service.WithDataPlane (set cluster.token)", types.ErrNotSupported, what, vmID)
	}
	vm, err := s.runningVM(ctx, vmID, what)
	if err != nil {
		return "", "", err
	}
	w, err := s.store.GetWorker(ctx, vm.Owner)
	if errors.Is(err, types.ErrNotFound) || (err == nil && w.DataAddr == "") {
		return "", "", fmt.Errorf("%w: worker %s, which owns vm %s, serves no data plane; set worker.data_listen and restart it", types.ErrUnavailable, vm.Owner, vm.ID)
	}
	if err != nil {
		return "", "", err
	}
	return w.DataAddr, vm.ID, nil
}
