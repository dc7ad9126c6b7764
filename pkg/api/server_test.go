package api_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/api"
	"github.com/aetherium/aetherium-core/pkg/apikey"
	"github.com/aetherium/aetherium-core/pkg/types"
)

func TestHealthMetricsAndOpenAPI(t *testing.T) {
	t.Parallel()
	s := stack.Start(t, stack.Options{Workers: []string{"metrics"}})
	a := s.StartAPI(t, stack.APIOptions{})
	c := newClient(t, a, "")
	c = c.as(a.Key(t, apikey.Options{}))
	// Rows only: no task, so no worker touches them.
	now := time.Now().UTC()
	for i, st := range []types.VMState{types.VMRunning, types.VMRunning, types.VMStopped} {
		require.NoError(t, s.Store.CreateVM(context.Background(), &types.VM{ID: uuid.NewString(), Name: "m" + string(rune('a'+i)),
			VCPUs: 1, MemoryMB: 256, State: st, Provider: "docker", Tenant: "default", CreatedAt: now, UpdatedAt: now}))
	}
	var list api.VMList
	c.call("GET", "/v1/vms?limit=2", nil, http.StatusOK, &list)
	require.Len(t, list.VMs, 2)
	require.Equal(t, list.VMs[1].ID, list.Next)
	var labelled api.VMList
	c.call("GET", "/v1/vms?label=a=1&label=b=2", nil, http.StatusOK, &labelled)
	require.Empty(t, labelled.VMs)
	var page2 api.VMList
	c.call("GET", "/v1/vms?limit=2&after="+list.Next, nil, http.StatusOK, &page2)
	require.Len(t, page2.VMs, 1)
	require.Empty(t, page2.Next)
	c.call("GET", "/v1/vms/"+list.VMs[0].ID, nil, http.StatusOK, nil)

	var health map[string]string
	c.as("").call("GET", "/healthz", nil, http.StatusOK, &health)
	require.Equal(t, "ok", health["status"])

	var doc map[string]any
	c.as("").call("GET", "/v1/openapi.json", nil, http.StatusOK, &doc)
	require.Equal(t, "3.1.0", doc["openapi"])
	require.Contains(t, doc["paths"], "/v1/vms/{id}/exec")

	resp := c.as("").send(c.as("").request("GET", "/metrics", nil))
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	m := string(body)
	for _, want := range []string{
		`aetherium_api_request_duration_seconds_bucket{code="200",method="GET",route="/v1/vms/{id}",le="+Inf"} 1`,
		`aetherium_api_request_duration_seconds_count{code="200",method="GET",route="/v1/vms"} 3`,
		`aetherium_vms{provider="docker",state="running"} 2`,
		`aetherium_vms{provider="docker",state="stopped"} 1`,
		`aetherium_vms{provider="docker",state="pending"} 0`,
		"go_goroutines ",
		"process_resident_memory_bytes ",
	} {
		require.True(t, strings.Contains(m, want), "the scrape lacks %s", want)
	}
	require.False(t, strings.Contains(m, list.VMs[0].ID), "routes are patterns, never raw paths")

	off := s.StartAPI(t, stack.APIOptions{MetricsDisabled: true})
	oc := newClient(t, off, "")
	oc.fail(oc.request("GET", "/metrics", nil), http.StatusNotFound, api.CodeNotFound)
}

// selfSigned writes a certificate for 127.0.0.1 and its key, and returns
// their paths and a pool trusting it.
func selfSigned(t *testing.T) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "aether-api test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	kb, err := x509.MarshalECPrivateKey(key)
	require.NoError(t, err)
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	require.NoError(t, os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600))
	require.NoError(t, os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600))
	return certFile, keyFile, pool
}

func TestTLS(t *testing.T) {
	t.Parallel()
	s := stack.Start(t, stack.Options{Workers: []string{"tls"}})
	certFile, keyFile, pool := selfSigned(t)
	a := s.StartAPI(t, stack.APIOptions{TLSCertFile: certFile, TLSKeyFile: keyFile})
	require.True(t, strings.HasPrefix(a.URL, "https://"), a.URL)
	key := a.Key(t, apikey.Options{})

	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	c := &client{t: t, base: a.URL, key: key, hc: newContractClient(t, a.URL, tr)}
	var list api.VMList
	c.call("GET", "/v1/vms", nil, http.StatusOK, &list)
	resp := c.send(c.request("GET", "/healthz", nil))
	resp.Body.Close()
	require.NotNil(t, resp.TLS)
	require.GreaterOrEqual(t, resp.TLS.Version, uint16(tls.VersionTLS12))

	// A client that does not trust the certificate, one stuck at TLS 1.1,
	// and one speaking plain HTTP all fail.
	_, err := http.Get(a.URL + "/healthz")
	require.Error(t, err)
	old := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MaxVersion: tls.VersionTLS11}}}
	_, err = old.Get(a.URL + "/healthz")
	require.Error(t, err)
	plain, err := http.Get("http://" + strings.TrimPrefix(a.URL, "https://") + "/healthz")
	if err == nil {
		plain.Body.Close()
		require.Equal(t, http.StatusBadRequest, plain.StatusCode)
	}
}

func TestShutdownEndsStreams(t *testing.T) {
	t.Parallel()
	s := stack.Start(t, stack.Options{Workers: []string{"drain"}})
	a := s.StartAPI(t, stack.APIOptions{ShutdownTimeout: 10 * time.Second})
	c := newClient(t, a, "")
	c = c.as(a.Key(t, apikey.Options{}))
	vm := c.createVM("drain")
	resp, evs := c.stream(vm.ID, api.ExecRequest{Command: "sh", Args: []string{"-c", "echo started; sleep 4; echo done"}})
	defer resp.Body.Close()
	start := evs.next()
	require.Equal(t, "start", start.Type)
	require.Equal(t, "stdout", evs.next().Type)

	// A long poll open at the same time ends too.
	polled := make(chan int, 1)
	go func() {
		r, err := http.Get(a.URL + "/healthz")
		if err == nil {
			r.Body.Close()
		}
		req, _ := http.NewRequest("GET", a.URL+"/v1/tasks/"+start.ExecutionID+"?wait=60s", nil)
		req.Header.Set("Authorization", "Bearer "+c.key)
		if r, err := http.DefaultClient.Do(req); err == nil {
			r.Body.Close()
			polled <- r.StatusCode
		} else {
			polled <- 0
		}
	}()
	// So does a buffered exec, with a 503 saying where its result goes.
	type answer struct {
		status int
		body   string
	}
	buffered := make(chan answer, 1)
	go func() {
		req, _ := http.NewRequest("POST", a.URL+"/v1/vms/"+vm.ID+"/exec", strings.NewReader(`{"command":"sleep","args":["3"]}`))
		req.Header.Set("Authorization", "Bearer "+c.key)
		r, err := http.DefaultClient.Do(req)
		if err != nil {
			buffered <- answer{body: err.Error()}
			return
		}
		b, _ := io.ReadAll(r.Body)
		r.Body.Close()
		buffered <- answer{r.StatusCode, string(b)}
	}()
	time.Sleep(300 * time.Millisecond)

	began := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, a.Server.Shutdown(ctx))
	took := time.Since(began)
	rest := evs.all()
	t.Logf("Shutdown returned after %s; the stream ended with %s", took, fmtEvents(rest))
	require.Less(t, took, 3*time.Second)
	require.NotEmpty(t, rest)
	last := rest[len(rest)-1]
	require.Equal(t, "error", last.Type)
	require.Equal(t, api.CodeUnavailable, last.Error.Code)
	require.Contains(t, last.Error.Message, "/v1/executions/"+start.ExecutionID)
	require.Equal(t, http.StatusOK, <-polled)
	b := <-buffered
	require.Equal(t, http.StatusServiceUnavailable, b.status, b.body)
	require.Contains(t, b.body, `"code":"unavailable"`)
	require.Contains(t, b.body, "GET /v1/executions/")
	require.NoError(t, a.Wait())

	// The command went on; its result is recorded.
	wctx, wcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer wcancel()
	task, err := s.Service.WaitTask(wctx, uuid.MustParse(start.ExecutionID))
	require.NoError(t, err)
	require.Equal(t, types.TaskSucceeded, task.State, task.Error)
	e, err := s.Service.GetExecution(wctx, uuid.MustParse(start.ExecutionID))
	require.NoError(t, err)
	require.Equal(t, "started\ndone\n", e.Stdout)
}
