package vmutil

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// RunDir is the directory that holds one directory per VM, named by its id.
// The per-VM directories are a backend's only state.
type RunDir string

// VM returns the directory of VM id.
func (d RunDir) VM(id string) string { return filepath.Join(string(d), id) }

// Path returns the file name in VM id's directory.
func (d RunDir) Path(id, name string) string { return filepath.Join(string(d), id, name) }

// IDs returns the ids of the VM directories, skipping every other entry
// (temporary directories, lock files).
func (d RunDir) IDs() ([]string, error) {
	ents, err := os.ReadDir(string(d))
	if err != nil {
		return nil, fmt.Errorf("listing vms in %s: %w", string(d), err)
	}
	var ids []string
	for _, e := range ents {
		if e.IsDir() && types.ValidateID(e.Name()) == nil {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// ReadRecord reads VM id's JSON record at path into v. A missing record is
// types.ErrNotFound: the VM does not exist (a record is written last by a
// create and removed first by a delete).
func ReadRecord(path, id string, v any) error {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return NotFound(id)
	}
	if err != nil {
		return fmt.Errorf("reading vm %s: %w", id, err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("reading vm %s: %s is corrupt: %w; delete the vm (its processes, disk and network are removed all the same)", id, path, err)
	}
	return nil
}

// WriteRecord replaces the JSON record at path atomically: it is written
// to a fresh temporary file beside it, synced, renamed over path, and the
// directory synced. A crash at any point leaves either the old record or
// the new one, never a torn one, and a leftover temporary file is never
// read (its name ends in .tmp).
func WriteRecord(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(f.Name(), 0o600)
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
		return err
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync() // the rename is durable once the directory is
		d.Close()
	}
	return nil
}

// IsTemp reports whether name is one of WriteRecord's temporary files.
func IsTemp(name string) bool { return strings.HasSuffix(name, ".tmp") }

// NotFound is the error of a VM that does not exist.
func NotFound(id string) error {
	return fmt.Errorf("%w: vm %s", types.ErrNotFound, id)
}
