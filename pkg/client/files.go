package client

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"

	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// WriteFile streams r as the body of PUT /v1/vms/{id}/files: nothing is
// buffered whole, whatever the file's size.
func (c *Client) WriteFile(ctx context.Context, vmID, path string, r io.Reader, o types.FileOptions) (int64, error) {
	if err := service.ValidateGuestPath(path); err != nil {
		return 0, err
	}
	if o.Mode&^0o7777 != 0 {
		return 0, fmt.Errorf("%w: file mode %#o has bits beyond 07777", types.ErrInvalid, o.Mode)
	}
	q := url.Values{"path": {path}}
	if o.Mode != 0 {
		q.Set("mode", fmt.Sprintf("%04o", o.Mode))
	}
	if o.User != "" {
		q.Set("user", o.User)
	}
	if o.MakeParents {
		q.Set("mkdir", "true")
	}
	// Hide r's type so net/http never takes a length from it: the body
	// is sent chunked, as it is read.
	body := io.Reader(http.NoBody)
	if r != nil {
		body = struct{ io.Reader }{r}
	}
	req, err := c.request(ctx, http.MethodPut, vmPath(vmID, "files"), q, body)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set("Accept", "application/json")
	resp, err := c.do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var out struct {
		Path string `json:"path"`
		Size int64  `json:"size"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return 0, fmt.Errorf("decoding the answer to writing %s: %w", path, err)
	}
	return out.Size, nil
}

// ReadFile streams the body of GET /v1/vms/{id}/files to w. Nothing is
// written to w unless the server answered with the file.
func (c *Client) ReadFile(ctx context.Context, vmID, path string, w io.Writer) (int64, error) {
	if err := service.ValidateGuestPath(path); err != nil {
		return 0, err
	}
	req, err := c.request(ctx, http.MethodGet, vmPath(vmID, "files"), url.Values{"path": {path}}, nil)
	if err != nil {
		return 0, err
	}
	resp, err := c.do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	n, err := io.Copy(w, resp.Body)
	if err != nil {
		return n, fmt.Errorf("reading %s from vm %s: %w", path, vmID, err)
	}
	if resp.ContentLength >= 0 && n != resp.ContentLength {
		return n, fmt.Errorf("reading %s from vm %s: got %d of %d bytes", path, vmID, n, resp.ContentLength)
	}
	return n, nil
}
