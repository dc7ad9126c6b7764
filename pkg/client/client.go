// Package client is a Go client for aether-api, Aetherium Core's HTTP API.
// *Client implements service.TaskService, so a program written against
// that interface runs unchanged against PostgreSQL and Redis (the local
// service) or against a remote aether-api.
//
// Errors wrap the kinds in pkg/types (types.ErrNotFound, ErrInvalid, ...)
// and keep the server's message, so errors.Is works as with the local
// service. A refused API key wraps ErrUnauthenticated.
package client

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// Defaults of the client's own http.Client (see WithHTTPClient).
const (
	// DialTimeout bounds opening a TCP connection to the API.
	DialTimeout = 10 * time.Second
	// TLSHandshakeTimeout bounds the TLS handshake.
	TLSHandshakeTimeout = 10 * time.Second
	// IdleConnTimeout closes keep-alive connections idle this long.
	IdleConnTimeout = 90 * time.Second
	// RequestTimeout bounds a plain JSON call (not a stream, not a file,
	// not a long poll) when ctx has no earlier deadline.
	RequestTimeout = 2 * time.Minute
	// WaitPoll is how long one long poll of WaitTask asks the server to
	// hold the request (the server caps it at 60s).
	WaitPoll = 30 * time.Second
)

// ErrUnauthenticated is wrapped by errors for a missing, unknown or revoked
// API key.
var ErrUnauthenticated = errors.New("the API key was refused; check AETHERIUM_API_KEY (or api_key in the config)")

// Client talks to one aether-api. It is safe for concurrent use and reuses
// keep-alive connections.
type Client struct {
	base      *url.URL
	key       string
	hc        *http.Client
	userAgent string
}

type options struct {
	hc        *http.Client
	tls       *tls.Config
	userAgent string
}

// Option configures a Client.
type Option func(*options)

// WithHTTPClient makes the client send requests through hc (its Timeout
// should be zero: streams and long polls last as long as they need; calls
// are bounded through their ctx instead). WithTLSConfig is then ignored.
func WithHTTPClient(hc *http.Client) Option { return func(o *options) { o.hc = hc } }

// WithTLSConfig sets the TLS configuration of the default transport, e.g.
// a private CA in RootCAs.
func WithTLSConfig(c *tls.Config) Option { return func(o *options) { o.tls = c } }

// WithUserAgent sets the User-Agent header (default "aetherium-client").
func WithUserAgent(ua string) Option { return func(o *options) { o.userAgent = ua } }

// New returns a client of the API at baseURL (e.g. http://127.0.0.1:8080)
// authenticating with apiKey. An invalid URL returns types.ErrInvalid.
func New(baseURL, apiKey string, opts ...Option) (*Client, error) {
	u, err := url.Parse(baseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("%w: API URL %q must be an http:// or https:// URL such as http://127.0.0.1:8080", types.ErrInvalid, baseURL)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	o := options{userAgent: "aetherium-client"}
	for _, f := range opts {
		f(&o)
	}
	hc := o.hc
	if hc == nil {
		hc = &http.Client{Transport: newTransport(o.tls)}
	}
	return &Client{base: u, key: apiKey, hc: hc, userAgent: o.userAgent}, nil
}

func newTransport(tc *tls.Config) *http.Transport {
	return &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: DialTimeout, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:     true,
		TLSClientConfig:       tc,
		TLSHandshakeTimeout:   TLSHandshakeTimeout,
		IdleConnTimeout:       IdleConnTimeout,
		MaxIdleConns:          64,
		MaxIdleConnsPerHost:   16,
		ExpectContinueTimeout: time.Second,
	}
}

// Close releases idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

// URL returns the API's base URL.
func (c *Client) URL() string { return c.base.String() }

// Health checks that the API answers GET /healthz.
func (c *Client) Health(ctx context.Context) error {
	return c.doJSON(ctx, http.MethodGet, "/healthz", nil, nil, nil)
}

// request builds a request to path (with query q) on the API.
func (c *Client) request(ctx context.Context, method, path string, q url.Values, body io.Reader) (*http.Request, error) {
	u := *c.base
	u.Path += path
	u.RawQuery = q.Encode()
	req, err := http.NewRequestWithContext(ctx, method, u.String(), body)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", types.ErrInvalid, err)
	}
	if c.key != "" {
		req.Header.Set("Authorization", "Bearer "+c.key)
	}
	req.Header.Set("User-Agent", c.userAgent)
	return req, nil
}

// do sends req and returns the response when its status is 2xx; any other
// status is turned into an error and the body closed.
func (c *Client) do(req *http.Request) (*http.Response, error) {
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctxErr := req.Context().Err(); ctxErr != nil {
			return nil, fmt.Errorf("%s %s: %w", req.Method, req.URL.Path, ctxErr)
		}
		return nil, fmt.Errorf("%w: cannot reach aether-api at %s: %v; start it with `make up`, or check AETHERIUM_API_URL",
			types.ErrUnavailable, c.base, unwrapURLError(err))
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	err = decodeError(resp)
	if ae, ok := err.(*Error); ok && req.Header.Get("Authorization") == "" {
		ae.noKey = true
	}
	return nil, err
}

func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// doJSON sends in (when not nil) as JSON and decodes a 2xx answer into out
// (when not nil). The call is bounded by RequestTimeout.
func (c *Client) doJSON(ctx context.Context, method, path string, q url.Values, in, out any) error {
	ctx, cancel := context.WithTimeout(ctx, RequestTimeout)
	defer cancel()
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("%w: encoding the request: %v", types.ErrInvalid, err)
		}
		body = strings.NewReader(string(b))
	}
	req, err := c.request(ctx, method, path, q, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil || resp.StatusCode == http.StatusNoContent {
		_, _ = io.Copy(io.Discard, resp.Body) // so the connection is reused
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decoding the answer to %s %s: %w", method, path, err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	return nil
}
