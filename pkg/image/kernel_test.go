package image_test

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/internal/testenv"
	"github.com/aetherium/aetherium-core/pkg/image"
	"github.com/aetherium/aetherium-core/pkg/types"
)

var (
	kernelOnce sync.Once
	kernelDir  string
	kernelInfo *image.KernelTree
	kernelErr  error
)

// unpackedKernel downloads the current cloud kernel into the shared
// package cache (once per machine) and unpacks it once per test binary.
func unpackedKernel(t *testing.T) *image.KernelTree {
	t.Helper()
	if _, err := exec.LookPath("apt-get"); err != nil {
		testenv.Skip(t, "apt-get is not installed; these tests need Debian's kernel package")
	}
	kernelOnce.Do(func() {
		ctx := context.Background()
		var deb string
		deb, kernelErr = image.FetchKernelDeb(ctx, filepath.Join(image.DefaultCacheDir(), "debs"))
		if kernelErr != nil {
			return
		}
		kernelDir, kernelErr = os.MkdirTemp("", "aetherium-kernel-")
		if kernelErr != nil {
			return
		}
		kernelInfo, kernelErr = image.UnpackKernel(ctx, deb, kernelDir)
	})
	if errors.Is(kernelErr, types.ErrUnavailable) {
		testenv.Skip(t, "cannot get Debian's cloud kernel: %v", kernelErr)
	}
	require.NoError(t, kernelErr)
	return kernelInfo
}

func TestMain(m *testing.M) {
	testenv.AtExit(func() {
		if kernelDir != "" {
			os.RemoveAll(kernelDir)
		}
	})
	testenv.Main(m)
}

func TestOrderRealModules(t *testing.T) {
	k := unpackedKernel(t)
	read, err := image.ModuleReader(k.Modules)
	require.NoError(t, err)
	mods, err := image.OrderModules(image.GuestModules, read)
	require.NoError(t, err)
	got := make([]string, len(mods))
	for i, m := range mods {
		got[i] = m.Name
	}
	// PLATFORM.md's order is already dependency-closed for this kernel.
	require.Equal(t, image.GuestModules, got)
	for _, m := range mods {
		if m.Name == "virtio_net" {
			require.ElementsMatch(t, []string{"net_failover", "virtio", "virtio_ring"}, m.Depends)
		}
	}
	// The .modinfo parser agrees with modinfo(8) where kmod is installed.
	if _, err := exec.LookPath("modinfo"); err != nil {
		t.Log("modinfo (kmod) is not installed; not cross-checking the .modinfo parser against it")
	} else {
		for _, m := range mods {
			out, err := exec.Command("modinfo", "-F", "depends", m.Path).Output()
			require.NoError(t, err)
			want := string(bytes.TrimSpace(out))
			var gotDeps string
			for i, d := range m.Depends {
				if i > 0 {
					gotDeps += ","
				}
				gotDeps += d
			}
			require.Equal(t, want, gotDeps, m.Name)
		}
	}
}

func TestExtractVmlinux(t *testing.T) {
	k := unpackedKernel(t)
	bz, err := os.ReadFile(k.Vmlinuz)
	require.NoError(t, err)
	vmlinux, comp, err := image.ExtractVmlinux(bz)
	require.NoError(t, err)
	require.Contains(t, []string{image.CompressionLZ4, image.CompressionGzip}, comp)
	f, err := elf.NewFile(bytes.NewReader(vmlinux))
	require.NoError(t, err)
	require.Equal(t, elf.EM_X86_64, f.Machine)
	require.Equal(t, elf.ET_EXEC, f.Type)
	// x86-64 kernels are linked at 0xffffffff81000000 and enter at a
	// physical address in the first gigabytes.
	require.NotZero(t, f.Entry)
	require.Less(t, f.Entry, uint64(1<<32), "entry %#x", f.Entry)
	var hasText bool
	for _, p := range f.Progs {
		if p.Type == elf.PT_LOAD && p.Flags&elf.PF_X != 0 {
			hasText = true
		}
	}
	require.True(t, hasText)
	pvh, err := image.HasPVHNote(vmlinux)
	require.NoError(t, err)
	require.True(t, pvh, "Debian's cloud kernel has CONFIG_PVH=y")
	t.Logf("vmlinuz %d bytes (%s) -> vmlinux %d bytes, entry %#x, pvh %v", len(bz), comp, len(vmlinux), f.Entry, pvh)

	_, _, err = image.ExtractVmlinux([]byte("not a kernel"))
	require.ErrorIs(t, err, types.ErrInvalid)
}
