package image

import (
	"bytes"
	"debug/elf"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// GuestModules are the kernel modules the guest agent needs, in the order
// PLATFORM.md gives for Debian's cloud kernel. OrderModules adds whatever
// else they depend on, dependencies first.
var GuestModules = []string{
	"virtio_ring", "virtio", "virtio_mmio",
	"virtio_console", "failover", "net_failover", "virtio_net", "virtio_blk",
	"vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
}

// Module is one kernel module file and what its .modinfo says.
type Module struct {
	// Name is the module's name as the kernel knows it (underscores).
	Name string
	// Path is the .ko file.
	Path string
	// Depends are the names of the modules it needs loaded first.
	Depends []string
}

// modName normalises a module or file name the way the kernel does:
// '-' and '_' are the same, and the .ko suffix is not part of the name.
func modName(s string) string {
	return strings.ReplaceAll(strings.TrimSuffix(filepath.Base(s), ".ko"), "-", "_")
}

// IndexModules maps module names to .ko files under dir (a kernel's
// lib/modules/<release>), without reading the files.
func IndexModules(dir string) (map[string]string, error) {
	idx := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".ko") {
			idx[modName(p)] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("listing kernel modules under %s: %w", dir, err)
	}
	return idx, nil
}

// ReadModinfo reads the name and dependencies of the module at path from
// its .modinfo ELF section, so no kmod tools are needed. Modules must be
// uncompressed (Debian's are: CONFIG_MODULE_COMPRESS_NONE).
func ReadModinfo(path string) (Module, error) {
	f, err := elf.Open(path)
	if err != nil {
		return Module{}, fmt.Errorf("reading module %s: %w (compressed modules are not supported)", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return Module{}, fmt.Errorf("%w: module %s has no .modinfo section", types.ErrInvalid, path)
	}
	data, err := sec.Data()
	if err != nil {
		return Module{}, fmt.Errorf("reading .modinfo of %s: %w", path, err)
	}
	m := Module{Name: modName(path), Path: path}
	for _, field := range bytes.Split(data, []byte{0}) {
		k, v, ok := strings.Cut(string(field), "=")
		if !ok {
			continue
		}
		switch k {
		case "name":
			m.Name = v
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d = strings.TrimSpace(d); d != "" {
					m.Depends = append(m.Depends, modName(d))
				}
			}
		}
	}
	return m, nil
}

// OrderModules returns want plus everything it depends on, each module
// after its dependencies and otherwise in the order of want. read gives a
// module's information by name; it fails for a module that does not
// exist. A dependency cycle is an error.
func OrderModules(want []string, read func(name string) (Module, error)) ([]Module, error) {
	const (
		unseen = iota
		visiting
		done
	)
	state := map[string]int{}
	var out []Module
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		switch state[name] {
		case done:
			return nil
		case visiting:
			return fmt.Errorf("%w: kernel modules depend on each other in a cycle: %s", types.ErrInvalid, strings.Join(append(chain, name), " -> "))
		}
		state[name] = visiting
		m, err := read(name)
		if err != nil {
			if len(chain) > 0 {
				return fmt.Errorf("module %s, needed by %s: %w", name, strings.Join(chain, " <- "), err)
			}
			return err
		}
		for _, d := range m.Depends {
			if err := visit(d, append(chain, name)); err != nil {
				return err
			}
		}
		state[name] = done
		out = append(out, m)
		return nil
	}
	for _, w := range want {
		if err := visit(modName(w), nil); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// ModuleReader returns a read function for OrderModules over the modules
// of one kernel (dir is its lib/modules/<release>).
func ModuleReader(dir string) (func(string) (Module, error), error) {
	idx, err := IndexModules(dir)
	if err != nil {
		return nil, err
	}
	return func(name string) (Module, error) {
		p, ok := idx[name]
		if !ok {
			return Module{}, fmt.Errorf("%w: kernel module %s is not in %s; the kernel package does not build it as a module (check its config)", types.ErrNotFound, name, dir)
		}
		return ReadModinfo(p)
	}, nil
}

// moduleFile reads a module for the initramfs.
func moduleFile(m Module) ([]byte, error) {
	b, err := os.ReadFile(m.Path)
	if err != nil {
		return nil, fmt.Errorf("reading kernel module %s: %w", m.Path, err)
	}
	return b, nil
}
