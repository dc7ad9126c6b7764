package e2b

import (
	"compress/gzip"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"path"
	"strings"

	"connectrpc.com/connect"
	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/e2b/gen/filesystem/filesystemconnect"
	"github.com/aetherium/aetherium-core/pkg/e2b/gen/process/processconnect"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Sandbox-plane request headers set by the SDKs.
const (
	headerSandboxID   = "E2b-Sandbox-Id"
	headerAccessToken = "X-Access-Token"
)

// maxRPCBytes bounds one Connect request (SendInput carries stdin).
const maxRPCBytes = 32 << 20

// sandbox is the sandbox a sandbox-plane request was authorised for.
type sandbox struct {
	id     string
	vm     *types.VM
	client *agent.Client
}

type sandboxKey struct{}

func sandboxFrom(ctx context.Context) *sandbox {
	sb, _ := ctx.Value(sandboxKey{}).(*sandbox)
	return sb
}

func (s *Server) envdRoutes() http.Handler {
	mux := http.NewServeMux()
	opts := []connect.HandlerOption{connect.WithReadMaxBytes(maxRPCBytes)}
	mux.Handle(processconnect.NewProcessHandler(&processService{s: s}, opts...))
	mux.Handle(filesystemconnect.NewFilesystemHandler(&filesystemService{s: s}, opts...))
	mux.HandleFunc("GET /files", s.getFile)
	mux.HandleFunc("POST /files", s.postFile)
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusNoContent) })
	return s.sandboxAuth(mux)
}

// sandboxAuth finds the sandbox a request is for and lets it through only
// with one of that sandbox's access tokens. A sandbox that is unknown,
// deleted or not running answers 502, as E2B's proxy does, which the SDKs
// read as "the sandbox is gone".
func (s *Server) sandboxAuth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		raw := r.Header.Get(headerSandboxID)
		gone := func() {
			writeJSON(w, http.StatusBadGateway, errorBody{Code: http.StatusBadGateway, SandboxID: raw, Message: "The sandbox was not found"})
		}
		id, err := uuid.Parse(raw)
		if err != nil {
			gone()
			return
		}
		sb, err := s.store.GetSandbox(ctx, id.String())
		if errors.Is(err, types.ErrNotFound) {
			gone()
			return
		}
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		if !tokenMatches(sb.TokenHashes, r.Header.Get(headerAccessToken)) {
			writeEnvdError(w, http.StatusUnauthorized, "unauthorized access, please provide a valid access token for this sandbox in X-Access-Token")
			return
		}
		// The token authorises; the VM is read as admin (no scope) and the
		// agent dialled in the VM's own tenant.
		vm, err := s.svc.GetVM(ctx, id)
		if errors.Is(err, types.ErrNotFound) || (err == nil && vm.State != types.VMRunning) {
			gone()
			return
		}
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		ctx = service.WithScope(ctx, service.Scope{Tenant: vm.Tenant})
		c, release, err := s.clients.get(ctx, vm.ID)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		defer release() // held for the whole request, streams included
		ctx = context.WithValue(ctx, sandboxKey{}, &sandbox{id: vm.ID, vm: vm, client: c})
		next.ServeHTTP(w, r.WithContext(ctx))
	})
}

// tokenMatches compares tok with every stored hash in constant time.
func tokenMatches(hashes [][]byte, tok string) bool {
	if tok == "" {
		return false
	}
	h := sha256.Sum256([]byte(tok))
	ok := 0
	for _, want := range hashes {
		ok |= subtle.ConstantTimeCompare(want, h[:])
	}
	return ok == 1
}

// rpcUser returns the guest user of an RPC: the name in
// `Authorization: Basic base64(user:)`, or "" (the agent's user, root).
func rpcUser(h http.Header) (string, error) {
	v := h.Get("Authorization")
	if v == "" {
		return "", nil
	}
	scheme, enc, ok := strings.Cut(v, " ")
	if !ok || !strings.EqualFold(scheme, "Basic") {
		return "", connect.NewError(connect.CodeUnauthenticated, errors.New("the Authorization header must be Basic base64(user:)"))
	}
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(enc))
	if err != nil {
		return "", connect.NewError(connect.CodeUnauthenticated, errors.New("the Authorization header is not valid base64"))
	}
	user, _, _ := strings.Cut(string(b), ":")
	return user, nil
}

// resolvePath makes p absolute: "~", "~/x" and relative paths are taken
// from user's home, as envd does.
func resolvePath(ctx context.Context, c *agent.Client, p, user string) (string, error) {
	if p == "" {
		return "", fmt.Errorf("%w: path is empty", types.ErrInvalid)
	}
	if strings.HasPrefix(p, "/") {
		return path.Clean(p), nil
	}
	home, err := c.Stat(ctx, "~", user)
	if err != nil {
		return "", err
	}
	rest := p
	if p == "~" || strings.HasPrefix(p, "~/") {
		rest = strings.TrimPrefix(p[1:], "/")
	}
	return path.Join(home.Path, rest), nil
}

// startWriter writes the 200 header on the first byte, so that an error
// before any byte can still be answered as JSON.
type startWriter struct {
	w       http.ResponseWriter
	started bool
}

func (sw *startWriter) Write(p []byte) (int, error) {
	if !sw.started {
		sw.started = true
		sw.w.Header().Set("Content-Type", "application/octet-stream")
		sw.w.WriteHeader(http.StatusOK)
	}
	return sw.w.Write(p)
}

// getFile streams a guest file: GET /files?path=&username=.
func (s *Server) getFile(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	sb := sandboxFrom(ctx)
	q := r.URL.Query()
	user := q.Get("username")
	p, err := resolvePath(ctx, sb.client, q.Get("path"), user)
	if err != nil {
		s.fileError(w, r, err)
		return
	}
	e, err := sb.client.Stat(ctx, p, user)
	if err != nil {
		s.fileError(w, r, err)
		return
	}
	if e.Type == agent.FileTypeDirectory {
		writeEnvdError(w, http.StatusBadRequest, fmt.Sprintf("path '%s' is a directory", p))
		return
	}
	sw := &startWriter{w: w}
	if _, err := sb.client.ReadFileTo(ctx, p, sw, 0); err != nil {
		if !sw.started {
			s.fileError(w, r, err)
			return
		}
		s.log.Warn("e2b: reading a file broke off", "vm_id", sb.id, "path", p, "error", err)
		panic(http.ErrAbortHandler) // the client must not take a cut file as whole
	}
	if !sw.started {
		w.Header().Set("Content-Length", "0")
		w.WriteHeader(http.StatusOK)
	}
}

// writtenFile is one entry of POST /files' answer.
type writtenFile struct {
	Name string `json:"name"`
	Type string `json:"type"`
	Path string `json:"path"`
}

// postFile writes guest files: one multipart request holding one or more
// parts named "file" (the part's filename is the destination unless the
// path query gives it), or one raw body for ?path=. Bodies are streamed
// to the agent, never held whole.
func (s *Server) postFile(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	sb := sandboxFrom(ctx)
	q := r.URL.Query()
	user := q.Get("username")
	body := io.Reader(r.Body)
	if strings.EqualFold(r.Header.Get("Content-Encoding"), "gzip") {
		zr, err := gzip.NewReader(r.Body)
		if err != nil {
			writeEnvdError(w, http.StatusBadRequest, "the body is not gzip data: "+err.Error())
			return
		}
		defer zr.Close()
		body = zr
	}
	write := func(dst string, src io.Reader) (writtenFile, error) {
		p, err := resolvePath(ctx, sb.client, dst, user)
		if err != nil {
			return writtenFile{}, err
		}
		if _, err := sb.client.WriteFile(ctx, p, src, types.FileOptions{User: user, MakeParents: true}); err != nil {
			return writtenFile{}, err
		}
		return writtenFile{Name: path.Base(p), Type: "file", Path: p}, nil
	}
	var out []writtenFile
	ct, params, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if ct == "multipart/form-data" {
		mr := multipart.NewReader(body, params["boundary"])
		seen := map[string]bool{}
		for {
			part, err := mr.NextPart()
			if err == io.EOF {
				break
			}
			if err != nil {
				writeEnvdError(w, http.StatusBadRequest, "reading the multipart body: "+err.Error())
				return
			}
			if part.FormName() != "file" {
				continue
			}
			// Not part.FileName(): it keeps only the base name, and the
			// SDKs put the whole destination path there.
			_, dp, _ := mime.ParseMediaType(part.Header.Get("Content-Disposition"))
			dst := q.Get("path")
			if dst == "" {
				dst = dp["filename"]
			}
			if seen[dst] {
				writeEnvdError(w, http.StatusBadRequest, fmt.Sprintf("path '%s' is given twice in one request", dst))
				return
			}
			seen[dst] = true
			f, err := write(dst, part)
			if err != nil {
				s.fileError(w, r, err)
				return
			}
			out = append(out, f)
		}
		if len(out) == 0 {
			writeEnvdError(w, http.StatusBadRequest, "the multipart body holds no part named \"file\"")
			return
		}
	} else {
		f, err := write(q.Get("path"), body)
		if err != nil {
			s.fileError(w, r, err)
			return
		}
		out = append(out, f)
	}
	writeJSON(w, http.StatusOK, out)
}

// fileError answers an error of /files in envd's shape.
func (s *Server) fileError(w http.ResponseWriter, r *http.Request, err error) {
	status, msg := statusOf(err)
	if status >= 500 {
		s.log.Error("e2b files request failed", "method", r.Method, "error", err)
	}
	writeEnvdError(w, status, msg)
}
