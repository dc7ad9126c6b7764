package dataplane_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"io"
	"math/rand/v2"
	"net/http"
	"runtime"
	"runtime/metrics"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/internal/testenv/stack"
	"github.com/aetherium/aetherium-core/pkg/dataplane"
	"github.com/aetherium/aetherium-core/pkg/types"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// createVM creates a running VM through the stack's service.
func createVM(t *testing.T, s *stack.Stack, name string) *types.VM {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	id, err := s.Service.CreateVMTask(ctx, name, 1, 128)
	require.NoError(t, err)
	task, err := s.Service.WaitTask(ctx, id)
	require.NoError(t, err)
	require.Equal(t, types.TaskSucceeded, task.State, task.Error)
	var res struct {
		VMID string `json:"vm_id"`
	}
	require.NoError(t, json.Unmarshal(task.Result, &res))
	vm, err := s.Service.GetVM(ctx, uuid.MustParse(res.VMID))
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, vm.State)
	return vm
}

// patternReader yields n pseudo-random bytes (NUL bytes included) without
// holding them: the same seed yields the same bytes.
type patternReader struct {
	rng *rand.ChaCha8
	n   int64
}

func newPattern(n int64) *patternReader {
	return &patternReader{rng: rand.NewChaCha8([32]byte{1, 2, 3}), n: n}
}

func (p *patternReader) Read(b []byte) (int, error) {
	if p.n == 0 {
		return 0, io.EOF
	}
	b = b[:min(int64(len(b)), p.n)]
	_, _ = p.rng.Read(b)
	p.n -= int64(len(b))
	return len(b), nil
}

func sum(r io.Reader) []byte {
	h := sha256.New()
	_, _ = io.Copy(h, r)
	return h.Sum(nil)
}

// peakHeap samples the live heap until stop is called and returns the
// highest sample. runtime/metrics reads without stopping the world.
func peakHeap() (stop func() uint64) {
	sample := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	read := func() uint64 {
		metrics.Read(sample)
		return sample[0].Value.Uint64()
	}
	var peak uint64
	done, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(5 * time.Millisecond)
		defer t.Stop()
		for {
			peak = max(peak, read())
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return func() uint64 {
		close(done)
		<-finished
		return peak
	}
}

// TestLargeFileBoundedMemory moves 100 MiB each way through the service,
// the data plane and the guest agent, and checks that no part holds the
// file: the heap grows by far less than its size.
func TestLargeFileBoundedMemory(t *testing.T) {
	const size = 100 << 20
	s := stack.Start(t, stack.Options{})
	vm := createVM(t, s, "big")
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()

	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)
	stop := peakHeap()
	n, err := s.Service.WriteFile(ctx, vm.ID, "/tmp/big.bin", newPattern(size), types.FileOptions{Mode: 0o600})
	require.NoError(t, err)
	require.EqualValues(t, size, n)

	h := sha256.New()
	n, err = s.Service.ReadFile(ctx, vm.ID, "/tmp/big.bin", h)
	require.NoError(t, err)
	require.EqualValues(t, size, n)
	peak := stop()
	require.Equal(t, sum(newPattern(size)), h.Sum(nil), "the content changed on the way")

	growth := int64(peak) - int64(base.HeapAlloc)
	t.Logf("heap before %d MiB, peak %d MiB (growth %d MiB) while moving 2 x %d MiB",
		base.HeapAlloc>>20, peak>>20, growth>>20, size>>20)
	require.Less(t, growth, int64(40<<20), "the heap grew by %d MiB: something holds the file", growth>>20)
}

func TestFileErrors(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	vm := createVM(t, s, "errs")
	ctx := t.Context()
	_, err := s.Service.WriteFile(ctx, vm.ID, "/tmp/small", strings.NewReader("hello\x00world"), types.FileOptions{Mode: 0o640, User: "1234"})
	require.NoError(t, err)

	tests := []struct {
		name  string
		write bool
		path  string
		opts  types.FileOptions
		kind  error
		msg   string
	}{
		{name: "read missing", path: "/tmp/nosuch", kind: types.ErrNotFound},
		{name: "read a directory", path: "/tmp", kind: types.ErrInvalid, msg: "directory"},
		{name: "read relative", path: "tmp/x", kind: types.ErrInvalid, msg: "relative"},
		{name: "write below a missing directory", write: true, path: "/tmp/no/dir/f", kind: types.ErrNotFound, msg: "does not exist"},
		{name: "write as an unknown user", write: true, path: "/tmp/u", opts: types.FileOptions{User: "nosuchuser"}, kind: types.ErrInvalid, msg: "nosuchuser"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			if tt.write {
				_, err = s.Service.WriteFile(ctx, vm.ID, tt.path, strings.NewReader("x"), tt.opts)
			} else {
				_, err = s.Service.ReadFile(ctx, vm.ID, tt.path, &out)
			}
			require.ErrorIs(t, err, tt.kind)
			require.ErrorContains(t, err, tt.msg)
			require.Zero(t, out.Len(), "nothing is written when the file cannot be read")
		})
	}

	var out bytes.Buffer
	_, err = s.Service.ReadFile(ctx, vm.ID, "/tmp/small", &out)
	require.NoError(t, err)
	require.Equal(t, "hello\x00world", out.String())
	_, err = s.Service.WriteFile(ctx, vm.ID, "/tmp/made/for/f", strings.NewReader(""), types.FileOptions{MakeParents: true})
	require.NoError(t, err)
	out.Reset()
	n, err := s.Service.ReadFile(ctx, vm.ID, "/tmp/made/for/f", &out)
	require.NoError(t, err, "an empty file reads as such")
	require.Zero(t, n)
}

// TestAuthAndOwnership: the data plane serves only requests with the
// cluster token, and only for VMs of its own worker.
func TestAuthAndOwnership(t *testing.T) {
	s := stack.Start(t, stack.Options{Workers: []string{"w1", "w2"}})
	vm := createVM(t, s, "own")
	owner := s.Workers[vm.Owner]
	var other string
	for id, w := range s.Workers {
		if id != vm.Owner {
			other = w.DataAddr()
		}
	}
	require.NotEmpty(t, owner.DataAddr())
	require.NotEmpty(t, other)
	ctx := t.Context()

	t.Run("another worker's vm", func(t *testing.T) {
		c := dataplane.NewClient(s.Token)
		defer c.Close()
		_, err := c.ReadFile(ctx, other, vm.ID, "/etc/hostname", io.Discard)
		require.ErrorIs(t, err, types.ErrNotFound)
		_, err = c.WriteFile(ctx, other, vm.ID, "/tmp/x", strings.NewReader("x"), types.FileOptions{})
		require.ErrorIs(t, err, types.ErrNotFound)
		_, err = c.ReadFile(ctx, other, uuid.NewString(), "/etc/hostname", io.Discard)
		require.ErrorIs(t, err, types.ErrNotFound, "an unknown vm")
		var out bytes.Buffer
		_, err = c.ReadFile(ctx, owner.DataAddr(), vm.ID, "/etc/hostname", &out)
		require.NoError(t, err, "the owner serves it")
		require.NotZero(t, out.Len())
	})

	t.Run("wrong token", func(t *testing.T) {
		const wrong = "not-the-cluster-token"
		c := dataplane.NewClient(wrong)
		defer c.Close()
		_, err := c.ReadFile(ctx, owner.DataAddr(), vm.ID, "/etc/hostname", io.Discard)
		require.ErrorIs(t, err, types.ErrUnavailable)
		require.ErrorContains(t, err, "cluster token")
		require.NotContains(t, err.Error(), wrong)
		// A large upload is refused before its body is sent.
		start := time.Now()
		_, err = c.WriteFile(ctx, owner.DataAddr(), vm.ID, "/tmp/x", newPattern(1<<30), types.FileOptions{})
		require.ErrorIs(t, err, types.ErrUnavailable)
		require.Less(t, time.Since(start), 10*time.Second)
	})

	t.Run("raw requests", func(t *testing.T) {
		url := "http://" + owner.DataAddr() + "/internal/v1/vms/" + vm.ID + "/files?path=/etc/hostname"
		tests := []struct {
			name   string
			auth   string
			status int
			code   string
		}{
			{name: "no token", status: http.StatusUnauthorized, code: dataplane.CodeUnauthorized},
			{name: "empty bearer", auth: "Bearer ", status: http.StatusUnauthorized, code: dataplane.CodeUnauthorized},
			{name: "token without Bearer", auth: s.Token, status: http.StatusUnauthorized, code: dataplane.CodeUnauthorized},
			{name: "token with a suffix", auth: "Bearer " + s.Token + "x", status: http.StatusUnauthorized, code: dataplane.CodeUnauthorized},
			{name: "right token", auth: "Bearer " + s.Token, status: http.StatusOK},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
				require.NoError(t, err)
				if tt.auth != "" {
					req.Header.Set("Authorization", tt.auth)
				}
				resp, err := http.DefaultClient.Do(req)
				require.NoError(t, err)
				defer resp.Body.Close()
				require.Equal(t, tt.status, resp.StatusCode)
				if tt.code != "" {
					var b struct {
						Error struct{ Code, Message string }
					}
					require.NoError(t, json.NewDecoder(resp.Body).Decode(&b))
					require.Equal(t, tt.code, b.Error.Code)
					require.NotEmpty(t, b.Error.Message)
				}
			})
		}
	})
}

// TestStoppedVM: files of a stopped VM are a conflict, not a failure.
func TestStoppedVM(t *testing.T) {
	s := stack.Start(t, stack.Options{})
	vm := createVM(t, s, "stopped")
	c := dataplane.NewClient(s.Token)
	defer c.Close()
	ctx := t.Context()
	require.NoError(t, s.VMMs[vm.Owner].StopVM(ctx, vm.ID, true))
	_, err := c.ReadFile(ctx, s.Workers[vm.Owner].DataAddr(), vm.ID, "/etc/hostname", io.Discard)
	require.ErrorIs(t, err, types.ErrConflict)
	require.ErrorContains(t, err, "start it")
}
