package agent

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// maxMarkerBytes bounds a tool volume's marker file: it holds a key, a
// spec and a few paths.
const maxMarkerBytes = 64 << 10

// ReadToolMarker reads the marker (types.ToolMarkerFile) at the top of
// dir, a tool volume's content, and checks it against the tools root: the
// key is a plain directory name, the volume's Dir is root/<key> and its
// bin paths lie under Dir. dir itself may be anywhere (a staging mount
// point); callers that read a volume in place also check that dir is the
// Dir the marker names. A missing marker wraps fs.ErrNotExist, an invalid
// one types.ErrInvalid. The Image field is cleared: it names a host path.
func ReadToolMarker(dir, root string) (types.ToolVolume, error) {
	path := filepath.Join(dir, types.ToolMarkerFile)
	f, err := os.Open(path)
	if err != nil {
		return types.ToolVolume{}, fmt.Errorf("reading tool marker: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxMarkerBytes+1))
	if err != nil {
		return types.ToolVolume{}, fmt.Errorf("reading tool marker %s: %w", path, err)
	}
	if len(b) > maxMarkerBytes {
		return types.ToolVolume{}, fmt.Errorf("%w: tool marker %s is larger than %d bytes", types.ErrInvalid, path, maxMarkerBytes)
	}
	var v types.ToolVolume
	if err := json.Unmarshal(b, &v); err != nil {
		return types.ToolVolume{}, fmt.Errorf("%w: tool marker %s is not JSON of a tool volume: %v", types.ErrInvalid, path, err)
	}
	v.Image = ""
	if err := checkToolVolume(root, v); err != nil {
		return types.ToolVolume{}, fmt.Errorf("tool marker %s: %w", path, err)
	}
	return v, nil
}

// checkToolVolume checks one volume against the tools root with the rules
// every backend applies (types.ToolSet.Validate).
func checkToolVolume(root string, v types.ToolVolume) error {
	if root == "" {
		return fmt.Errorf("%w: no tools root is set", types.ErrInvalid)
	}
	set := types.ToolSet{Root: root, Volumes: []types.ToolVolume{v}}
	return set.Validate()
}
