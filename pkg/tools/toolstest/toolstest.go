// Package toolstest serves tool tarballs from a local HTTP server, so tests
// install tools with mise's http backend without any network beyond
// loopback.
package toolstest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"
)

// HelloOutput is what the hello tool prints.
const HelloOutput = "hello from the tool cache\n"

// HelloTarball is hello-VERSION/bin/hello, a shell script that prints
// HelloOutput, as a gzipped tar.
func HelloTarball(t testing.TB, version string) []byte {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	script := []byte("#!/bin/sh\necho \"hello from the tool cache\"\n")
	top := "hello-" + version
	for _, h := range []*tar.Header{
		{Name: top + "/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: top + "/bin/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: top + "/bin/hello", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(script))},
	} {
		require.NoError(t, tw.WriteHeader(h))
		if h.Typeflag == tar.TypeReg {
			_, err := tw.Write(script)
			require.NoError(t, err)
		}
	}
	require.NoError(t, tw.Close())
	require.NoError(t, gz.Close())
	return buf.Bytes()
}

// Server serves /hello-1.0.0.tar.gz and answers 404 for anything else,
// counting every request.
type Server struct {
	*httptest.Server
	requests atomic.Int32
}

// NewServer starts a server on loopback, closed when t ends.
func NewServer(t testing.TB) *Server {
	t.Helper()
	tgz := HelloTarball(t, "1.0.0")
	s := &Server{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.requests.Add(1)
		if r.URL.Path != "/hello-1.0.0.tar.gz" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/gzip")
		_, _ = w.Write(tgz)
	}))
	t.Cleanup(s.Close)
	return s
}

// Requests returns how many requests the server has seen.
func (s *Server) Requests() int { return int(s.requests.Load()) }

// Spec returns the http: spec of hello at version (only 1.0.0 exists).
func (s *Server) Spec(version string) string {
	return "http:hello[url=" + s.URL + "/hello-{{version}}.tar.gz]@" + version
}
