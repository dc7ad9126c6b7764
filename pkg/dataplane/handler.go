package dataplane

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// VMGetter is the part of storage.Store the handler needs: it serves only
// the VMs the store says this worker owns.
type VMGetter interface {
	GetVM(ctx context.Context, id string) (*types.VM, error)
}

// HandlerConfig configures a Handler.
type HandlerConfig struct {
	// WorkerID is the worker the handler serves; VMs owned by any other
	// worker are answered 404. Required.
	WorkerID string
	// Token is the cluster token every request must carry as
	// "Authorization: Bearer <token>". Required: an empty token would let
	// anyone who reaches the port write into every VM.
	Token string
	// VMM moves the files and dials the agents. Required.
	VMM vmm.VMOrchestrator
	// Store says who owns a VM. Required.
	Store VMGetter
	// Logger receives the handler's logs. Default: discard.
	Logger *slog.Logger
}

// Handler is a worker's data plane: an http.Handler serving the files and
// the agent tunnels of the VMs that worker owns.
type Handler struct {
	cfg       HandlerConfig
	tokenHash [sha256.Size]byte
	mux       *http.ServeMux
	log       *slog.Logger

	mu      sync.Mutex
	closing bool                  // CloseTunnels was called
	tunnels map[*tunnel]struct{}  // the open agent tunnels
	servers map[*http.Server]bool // whose Shutdown calls CloseTunnels
}

// NewHandler checks cfg and returns a handler. An empty token or worker id
// returns types.ErrInvalid.
func NewHandler(cfg HandlerConfig) (*Handler, error) {
	switch {
	case cfg.WorkerID == "":
		return nil, fmt.Errorf("%w: the data plane needs the worker's id", types.ErrInvalid)
	case cfg.Token == "":
		return nil, fmt.Errorf("%w: the data plane needs a cluster token; set cluster.token (the same on the API and every worker)", types.ErrInvalid)
	case cfg.VMM == nil || cfg.Store == nil:
		return nil, fmt.Errorf("%w: the data plane needs a VM backend and a store", types.ErrInvalid)
	}
	h := &Handler{cfg: cfg, tokenHash: sha256.Sum256([]byte(cfg.Token)), mux: http.NewServeMux(),
		log: cfg.Logger}
	if h.log == nil {
		h.log = slog.New(slog.DiscardHandler)
	}
	h.mux.HandleFunc("PUT "+filesPath, h.putFile)
	h.mux.HandleFunc("GET "+filesPath, h.getFile)
	h.mux.HandleFunc("GET "+agentPath, h.agentTunnel)
	return h, nil
}

// ServeHTTP authenticates the request, then routes it.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !h.authorized(r) {
		// Do not read an upload nobody asked for.
		w.Header().Set("Connection", "close")
		w.Header().Set("WWW-Authenticate", `Bearer realm="aetherium-data-plane"`)
		writeCode(w, http.StatusUnauthorized, CodeUnauthorized, "a valid cluster token is required: send Authorization: Bearer <cluster.token>")
		return
	}
	h.mux.ServeHTTP(w, r)
}

// authorized compares the bearer token with the cluster token in constant
// time; hashing both first hides the length as well.
func (h *Handler) authorized(r *http.Request) bool {
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || got == "" {
		return false
	}
	sum := sha256.Sum256([]byte(got))
	return subtle.ConstantTimeCompare(sum[:], h.tokenHash[:]) == 1
}

// ownedVM returns the id of a VM this worker owns, or an error that the
// caller answers.
func (h *Handler) ownedVM(r *http.Request) (string, error) {
	id := r.PathValue("id")
	notHere := fmt.Errorf("%w: vm %s is not on worker %s", types.ErrNotFound, id, h.cfg.WorkerID)
	if _, err := uuid.Parse(id); err != nil {
		return "", notHere
	}
	vm, err := h.cfg.Store.GetVM(r.Context(), id)
	switch {
	case errors.Is(err, types.ErrNotFound):
		return "", notHere
	case err != nil:
		return "", fmt.Errorf("looking vm %s up: %w", id, err)
	case vm.Owner != h.cfg.WorkerID || vm.State == types.VMDeleted:
		return "", notHere
	}
	return vm.ID, nil
}

// fileRequest reads what both routes share: the VM and a valid path.
func (h *Handler) fileRequest(r *http.Request) (id, path string, err error) {
	path = r.URL.Query().Get(paramPath)
	if err := service.ValidateGuestPath(path); err != nil {
		return "", "", err
	}
	id, err = h.ownedVM(r)
	return id, path, err
}

func (h *Handler) putFile(w http.ResponseWriter, r *http.Request) {
	id, path, err := h.fileRequest(r)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	q := r.URL.Query()
	var o types.FileOptions
	if m := q.Get(paramMode); m != "" {
		mode, err := strconv.ParseUint(m, 8, 32)
		if err != nil || mode&^0o7777 != 0 {
			h.fail(w, r, fmt.Errorf("%w: mode %q is not an octal permission such as 0644", types.ErrInvalid, m))
			return
		}
		o.Mode = uint32(mode)
	}
	o.User = q.Get(paramUser)
	switch q.Get(paramMkdir) {
	case "", "0", "false":
	case "1", "true":
		o.MakeParents = true
	default:
		h.fail(w, r, fmt.Errorf("%w: mkdir=%q must be 1 or 0", types.ErrInvalid, q.Get(paramMkdir)))
		return
	}
	n, err := h.cfg.VMM.WriteFile(r.Context(), id, path, r.Body, o)
	if err != nil {
		h.fail(w, r, fmt.Errorf("writing %s in vm %s: %w", path, id, err))
		return
	}
	h.log.Debug("file written", "vm_id", id, "path", path, "bytes", n)
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(writeResult{BytesWritten: n})
}

func (h *Handler) getFile(w http.ResponseWriter, r *http.Request) {
	id, path, err := h.fileRequest(r)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	lw := &lazyWriter{w: w}
	n, err := h.cfg.VMM.ReadFile(r.Context(), id, path, lw)
	switch {
	case err != nil && !lw.started:
		h.fail(w, r, fmt.Errorf("reading %s in vm %s: %w", path, id, err))
	case err != nil:
		// The 200 is out: break the connection so that the client sees a
		// truncated body as the failure it is, not as the whole file.
		if r.Context().Err() == nil {
			h.log.Warn("reading file failed midway", "vm_id", id, "path", path, "bytes", n, "err", err)
		}
		panic(http.ErrAbortHandler)
	default:
		lw.start() // an empty file
		h.log.Debug("file read", "vm_id", id, "path", path, "bytes", n)
	}
}

// fail answers err, logging what is the worker's fault.
func (h *Handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	if status, _ := statusOf(err); status >= 500 && r.Context().Err() == nil {
		h.log.Warn("data plane request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	writeError(w, err)
}

// lazyWriter sends the 200 with the first bytes, so that an error before
// them can still be answered with its own status.
type lazyWriter struct {
	w       http.ResponseWriter
	started bool
}

func (l *lazyWriter) start() {
	if !l.started {
		l.started = true
		l.w.Header().Set("Content-Type", "application/octet-stream")
		l.w.WriteHeader(http.StatusOK)
	}
}

func (l *lazyWriter) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	l.start()
	return l.w.Write(p)
}
