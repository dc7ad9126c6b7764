package dataplane

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Defaults of ClientConfig.
const (
	DialTimeoutDefault           = 5 * time.Second
	ResponseHeaderTimeoutDefault = time.Minute
	// maxErrorBody bounds how much of an error answer is read.
	maxErrorBody = 64 << 10
)

// ClientConfig tunes a Client. Zero values take the defaults.
type ClientConfig struct {
	// DialTimeout bounds connecting to a worker. Default 5s.
	DialTimeout time.Duration
	// ResponseHeaderTimeout bounds the wait for a worker's answer once the
	// request (an upload's whole body included) is sent. There is no bound
	// on the body itself: a large file takes as long as it takes, and ctx
	// is how a caller gives up. Default 1 minute.
	ResponseHeaderTimeout time.Duration
}

// Client reaches the workers' data planes. It implements
// service.DataPlane and is safe for concurrent use; connections to a
// worker are reused.
type Client struct {
	token string
	hc    *http.Client
	// dialer and headerTimeout serve DialAgent, whose upgraded
	// connections the transport cannot hand over.
	dialer        *net.Dialer
	headerTimeout time.Duration
}

var _ service.DataPlane = (*Client)(nil)

// NewClient returns a client that sends token, the cluster token, with
// every request.
func NewClient(token string) *Client {
	return NewClientConfig(token, ClientConfig{})
}

// NewClientConfig is NewClient with tuning.
func NewClientConfig(token string, cfg ClientConfig) *Client {
	d := &net.Dialer{Timeout: cmp.Or(cfg.DialTimeout, DialTimeoutDefault), KeepAlive: 30 * time.Second}
	headerTimeout := cmp.Or(cfg.ResponseHeaderTimeout, ResponseHeaderTimeoutDefault)
	tr := &http.Transport{
		DialContext:           d.DialContext,
		ResponseHeaderTimeout: headerTimeout,
		// A refused upload (bad token, unknown VM) is answered before its
		// body is sent.
		ExpectContinueTimeout: time.Second,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   8,
		// The content is what it is; compression would only cost CPU.
		DisableCompression: true,
	}
	return &Client{token: token, hc: &http.Client{Transport: tr}, dialer: d, headerTimeout: headerTimeout}
}

// Close drops idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

func filesURL(addr, vmID, path string, q url.Values) string {
	q.Set(paramPath, path)
	u := url.URL{Scheme: "http", Host: addr, Path: "/internal/v1/vms/" + vmID + "/files", RawQuery: q.Encode()}
	return u.String()
}

// WriteFile implements service.DataPlane: r is the request body, read as
// it is sent.
func (c *Client) WriteFile(ctx context.Context, addr, vmID, path string, r io.Reader, o types.FileOptions) (int64, error) {
	what := fmt.Sprintf("writing %s in vm %s through worker %s", path, vmID, addr)
	q := url.Values{}
	if o.Mode != 0 {
		q.Set(paramMode, "0"+strconv.FormatUint(uint64(o.Mode), 8))
	}
	if o.User != "" {
		q.Set(paramUser, o.User)
	}
	if o.MakeParents {
		q.Set(paramMkdir, "1")
	}
	// The body is wrapped so that the transport neither sniffs its length
	// nor closes the caller's reader, and so that the caller's read errors
	// are told apart from the network's.
	body := &trackingReader{r: r}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, filesURL(addr, vmID, path, q), body)
	if err != nil {
		return 0, fmt.Errorf("%s: %w: %w", what, types.ErrInvalid, err)
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set("Expect", "100-continue")
	resp, err := c.do(req, what)
	if rerr := body.readErr(); rerr != nil {
		if resp != nil {
			resp.Body.Close()
		}
		return 0, fmt.Errorf("%s: reading the content: %w", what, rerr)
	}
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var res writeResult
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxErrorBody)).Decode(&res); err != nil {
		return 0, fmt.Errorf("%s: the worker's answer is not the expected JSON: %w", what, err)
	}
	return res.BytesWritten, nil
}

// ReadFile implements service.DataPlane: the response body is copied to w
// as it arrives. A body cut short fails, with w holding what came.
func (c *Client) ReadFile(ctx context.Context, addr, vmID, path string, w io.Writer) (int64, error) {
	what := fmt.Sprintf("reading %s in vm %s through worker %s", path, vmID, addr)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, filesURL(addr, vmID, path, url.Values{}), nil)
	if err != nil {
		return 0, fmt.Errorf("%s: %w: %w", what, types.ErrInvalid, err)
	}
	resp, err := c.do(req, what)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	n, err := io.Copy(w, resp.Body)
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return n, fmt.Errorf("%s: %w", what, ctxErr)
		}
		return n, fmt.Errorf("%s: %w: the transfer broke after %d bytes: %w", what, types.ErrUnavailable, n, err)
	}
	return n, nil
}

// do sends req with the token and returns a 2xx response, or the error the
// answer (or its absence) means. Errors never include the token.
func (c *Client) do(req *http.Request, what string) (*http.Response, error) {
	req.Header.Set("Authorization", "Bearer "+c.token)
	resp, err := c.hc.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // the URL is in what already
		}
		return nil, unreachable(req.Context(), what, err)
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	var b errorBody
	_ = json.NewDecoder(io.LimitReader(resp.Body, maxErrorBody)).Decode(&b)
	return nil, errorOf(resp.StatusCode, b, what)
}

// unreachable is the error of a request that got no answer: ctx's error
// when ctx ended (a conn deadline mirroring ctx's may fire first),
// types.ErrUnavailable otherwise.
func unreachable(ctx context.Context, what string, err error) error {
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("%s: %w", what, ctxErr)
	}
	var ne net.Error
	if dl, ok := ctx.Deadline(); ok && errors.As(err, &ne) && ne.Timeout() && !time.Now().Before(dl) {
		return fmt.Errorf("%s: %w", what, context.DeadlineExceeded)
	}
	return fmt.Errorf("%s: %w: cannot reach the worker's data plane: %w; check that the worker runs and that worker.data_advertise is reachable from here", what, types.ErrUnavailable, err)
}

// trackingReader remembers the error its reader returned. The transport
// may still read from another goroutine when the answer arrives.
type trackingReader struct {
	r   io.Reader
	mu  sync.Mutex
	err error
}

func (t *trackingReader) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if err != nil {
		t.mu.Lock()
		t.err = err
		t.mu.Unlock()
	}
	return n, err
}

// readErr returns the reader's error other than io.EOF.
func (t *trackingReader) readErr() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if errors.Is(t.err, io.EOF) {
		return nil
	}
	return t.err
}
