package api_test

import (
	"bytes"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"runtime"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/api"
	"github.com/aetherium/aetherium-core/pkg/apikey"
)

// putFile uploads r to path and returns the response.
func (c *client) putFile(vmID, path, query string, r io.Reader, size int64) *http.Response {
	c.t.Helper()
	req := c.request("PUT", "/v1/vms/"+vmID+"/files?path="+url.QueryEscape(path)+query, nil)
	req.Body = io.NopCloser(r)
	req.ContentLength = size
	req.Header.Set("Content-Type", "application/octet-stream")
	return c.send(req)
}

func (c *client) getFile(vmID, path string) *http.Response {
	c.t.Helper()
	return c.send(c.request("GET", "/v1/vms/"+vmID+"/files?path="+url.QueryEscape(path), nil))
}

// randomReader is n deterministic pseudo-random bytes, made as they are
// read so that nothing holds the whole file.
type randomReader struct {
	rng *rand.ChaCha8
	n   int64
}

func (r *randomReader) Read(p []byte) (int, error) {
	if r.n == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > r.n {
		p = p[:r.n]
	}
	n, _ := r.rng.Read(p)
	r.n -= int64(n)
	return n, nil
}

func TestFiles(t *testing.T) {
	t.Parallel()
	s := stack.Start(t, stack.Options{Workers: []string{"files"}})
	a := s.StartAPI(t, stack.APIOptions{MaxFileBytes: 200 << 20})
	c := newClient(t, a, "")
	key := a.Key(t, apikey.Options{})
	c = c.as(key)
	vm := c.createVM("files")

	all := make([]byte, 256*4)
	for i := range all {
		all[i] = byte(i)
	}
	resp := c.putFile(vm.ID, "/tmp/x/bin.dat", "&mkdir=true&mode=0600", bytes.NewReader(all), int64(len(all)))
	var w api.FileWritten
	c.answer(resp, http.StatusOK, &w)
	require.Equal(t, api.FileWritten{Path: "/tmp/x/bin.dat", Size: int64(len(all))}, w)

	t.Run("binary round trip", func(t *testing.T) {
		c := c.on(t)
		resp := c.getFile(vm.ID, "/tmp/x/bin.dat")
		defer resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.Equal(t, "application/octet-stream", resp.Header.Get("Content-Type"))
		got, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		require.Equal(t, all, got)
		var e struct{ Stdout string }
		c.call("POST", "/v1/vms/"+vm.ID+"/exec", api.ExecRequest{Command: "stat", Args: []string{"-c", "%a", "/tmp/x/bin.dat"}}, http.StatusOK, &e)
		require.Equal(t, "600\n", e.Stdout)
	})

	t.Run("empty file", func(t *testing.T) {
		c := c.on(t)
		c.answer(c.putFile(vm.ID, "/tmp/empty", "", bytes.NewReader(nil), 0), http.StatusOK, nil)
		resp := c.getFile(vm.ID, "/tmp/empty")
		defer resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
		got, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		require.Empty(t, got)
	})

	t.Run("100 MiB streamed both ways", func(t *testing.T) {
		c := c.on(t)
		const size = 100 << 20
		base := liveHeap()
		sum := sha256.New()
		up := &heapProbe{r: io.TeeReader(&randomReader{rng: rand.NewChaCha8([32]byte{7}), n: size}, sum), at: size * 9 / 10}
		// Chunked: the server cannot know the size before it has read it.
		c.answer(c.putFile(vm.ID, "/tmp/big", "", up, -1), http.StatusOK, &w)
		require.EqualValues(t, size, w.Size)
		resp := c.getFile(vm.ID, "/tmp/big")
		defer resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
		back := sha256.New()
		down := &heapProbe{r: resp.Body, at: size * 9 / 10}
		n, err := io.Copy(back, down)
		require.NoError(t, err)
		require.EqualValues(t, size, n)
		require.Equal(t, sum.Sum(nil), back.Sum(nil))
		// Client, API, data plane and agent client share this process: a
		// copy of the file anywhere would be ~90 MiB of live heap when 90%
		// of it has gone by.
		for _, p := range []*heapProbe{up, down} {
			grew := int64(p.live) - int64(base)
			t.Logf("live heap at 90%%: %+d MiB", grew>>20)
			require.Less(t, grew, int64(40<<20), "the file must be streamed, not buffered")
		}
	})

	t.Run("errors", func(t *testing.T) {
		c := c.on(t)
		e := c.failed(c.putFile(vm.ID, "tmp/rel", "", bytes.NewReader(all), int64(len(all))), http.StatusUnprocessableEntity, api.CodeInvalid)
		require.Contains(t, e.Error.Message, "relative")
		resp := c.getFile(vm.ID, "/tmp/no/such/file")
		require.Equal(t, "application/json", resp.Header.Get("Content-Type"))
		c.failed(resp, http.StatusNotFound, api.CodeNotFound)
		c.failed(c.getFile(vm.ID, "rel"), http.StatusUnprocessableEntity, api.CodeInvalid)
		req := c.request("PUT", "/v1/vms/"+vm.ID+"/files?path=/tmp/m&mode=999", nil)
		req.Header.Set("Content-Type", "application/octet-stream")
		c.fail(offContract(req), http.StatusBadRequest, api.CodeInvalidRequest)
	})

	t.Run("too large", func(t *testing.T) {
		small := s.StartAPI(t, stack.APIOptions{MaxFileBytes: 1 << 20})
		c := newClient(t, small, key)
		const size = 2 << 20
		for _, declared := range []int64{size, -1} {
			src := &randomReader{rng: rand.NewChaCha8([32]byte{1}), n: size}
			resp := c.putFile(vm.ID, "/tmp/too-big", "", src, declared)
			e := c.failed(resp, http.StatusRequestEntityTooLarge, api.CodeTooLarge)
			require.Contains(t, e.Error.Message, "1048576")
		}
	})
}

// liveHeap returns the live heap (after a collection), in bytes.
func liveHeap() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// heapProbe passes r through and, once more than at bytes went by,
// records the live heap: whoever held the file whole at that point would
// show as that much more.
type heapProbe struct {
	r    io.Reader
	n    int64
	at   int64
	live uint64
}

func (p *heapProbe) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.n += int64(n)
	if p.live == 0 && p.n > p.at {
		p.live = liveHeap()
	}
	return n, err
}
