package api

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"

	"github.com/aetherium/aetherium-core/pkg/api/wire"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// FileWritten answers PUT /v1/vms/{id}/files.
type FileWritten = wire.FileWritten

func (s *Server) putFile(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	q := r.URL.Query()
	o := types.FileOptions{User: q.Get("user")}
	if v := q.Get("mode"); v != "" {
		m, err := strconv.ParseUint(v, 8, 32)
		if err != nil {
			return badRequest("mode=%q is not an octal file mode such as 0644", v)
		}
		o.Mode = uint32(m)
	}
	if o.MakeParents, err = queryBool(r, "mkdir"); err != nil {
		return err
	}
	if r.ContentLength > s.cfg.MaxFileBytes {
		return &http.MaxBytesError{Limit: s.cfg.MaxFileBytes}
	}
	// The body streams through to the worker; the limit is counted here
	// because whatever sits between may not pass MaxBytesError on intact.
	body := &limitedBody{r: http.MaxBytesReader(w, r.Body, s.cfg.MaxFileBytes)}
	path := q.Get("path")
	n, err := s.svc.WriteFile(r.Context(), id.String(), path, body, o)
	if body.tooBig != nil {
		return body.tooBig
	}
	if err != nil {
		return err
	}
	s.log.Info("file written", "vm_id", id, "path", path, "bytes", n, "key_id", infoOf(r.Context()).keyID)
	return writeJSON(w, http.StatusOK, FileWritten{Path: path, Size: n})
}

type limitedBody struct {
	r      io.Reader
	tooBig *http.MaxBytesError
}

func (b *limitedBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	var e *http.MaxBytesError
	if errors.As(err, &e) {
		b.tooBig = e
	}
	return n, err
}

func (s *Server) getFile(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	path := r.URL.Query().Get("path")
	lw := &lazyWriter{w: w}
	n, err := s.svc.ReadFile(r.Context(), id.String(), path, lw)
	switch {
	case err != nil && !lw.started:
		return err
	case err != nil:
		// The status is sent: cut the connection so that the client sees
		// a broken transfer, not a shorter file.
		s.log.Warn("reading a file failed midway", "vm_id", id, "path", path, "bytes", n, "error", err)
		panic(http.ErrAbortHandler)
	case !lw.started:
		lw.start()
	}
	return nil
}

// lazyWriter sends the 200 and its headers with the first byte, so that
// an error before any content (a missing file) can still be a JSON error.
type lazyWriter struct {
	w       http.ResponseWriter
	started bool
}

func (l *lazyWriter) start() {
	l.started = true
	l.w.Header().Set("Content-Type", "application/octet-stream")
	l.w.Header().Set("X-Content-Type-Options", "nosniff")
	l.w.WriteHeader(http.StatusOK)
}

func (l *lazyWriter) Write(p []byte) (int, error) {
	if !l.started {
		if len(p) == 0 {
			return 0, nil
		}
		l.start()
	}
	n, err := l.w.Write(p)
	if err != nil {
		return n, fmt.Errorf("sending the file to the client: %w", err)
	}
	return n, nil
}
