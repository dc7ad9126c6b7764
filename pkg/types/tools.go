package types

import (
	"fmt"
	"path/filepath"
	"strings"
)

// ToolSet is the set of cached tool versions a VM gets read-only (see
// pkg/tools). The worker fills it from its tools.Installer before it calls
// CreateVM; backends deliver it and never run mise themselves.
//
// Delivery contract, shared by every backend and the guest agent:
//   - Every volume's Dir is Root/<Key> on the host and in the guest: mise
//     installs hold absolute paths.
//   - Dir holds ToolMarkerFile, which names the volume's key, dir and bin
//     directories. The agent finds tools by reading Root/*/ToolMarkerFile
//     and puts their bin directories in front of PATH for every command.
//   - VM backends (qemu, firecracker) attach each volume's Image as a
//     read-only virtio-blk disk whose serial is ToolDiskSerial(i); the
//     guest's init mounts each such disk read-only at the Dir its marker
//     names, and learns Root from the kernel parameter
//     bootparams.ToolsRoot.
//   - The docker backend mounts a tmpfs at Root (so tools can be added to
//     a running container) and each Dir read-only over it, and passes Root
//     in the container's environment as ToolsRootEnv.
type ToolSet struct {
	// Root is the tool cache's root: the parent of every volume's Dir.
	Root string `json:"root"`
	// Volumes are the entries to deliver, in the order the specs were
	// asked for.
	Volumes []ToolVolume `json:"volumes"`
}

// ToolVolume is one cached tool version (or mise itself) to deliver.
type ToolVolume struct {
	// Key names the cache entry, e.g. "http-hello-1.0.0-1a2b3c4d".
	Key string `json:"key"`
	// Spec is the tool spec that asked for it, e.g. "node@22"; empty for
	// mise itself.
	Spec string `json:"spec,omitempty"`
	// Dir is Root/Key, the same path on the host and in the guest.
	Dir string `json:"dir"`
	// Image is the host path of a read-only ext4 image whose root is Dir's
	// content (marker included). VM backends attach it; docker ignores it.
	Image string `json:"image,omitempty"`
	// BinPaths are the directories under Dir holding executables.
	BinPaths []string `json:"bin_paths,omitempty"`
}

// ToolMarkerFile is the file at the root of every tool volume that names it
// (JSON of ToolVolume without Image).
const ToolMarkerFile = ".aetherium-tool.json"

// ToolsRootEnv is the environment variable that tells the docker guest
// agent where the tool volumes are.
const ToolsRootEnv = "AETHERIUM_TOOLS_ROOT"

// toolDiskSerialPrefix starts the virtio-blk serial of every tool disk
// (a serial has at most 20 bytes).
const toolDiskSerialPrefix = "aet-tool-"

// RootDiskSerial is the virtio-blk serial of a VM's root disk; the kernel
// command line names the root as root=SERIAL=<RootDiskSerial>, so adding
// disks never changes which one is the root.
const RootDiskSerial = "aet-root"

// ToolDiskLabel is the ext4 label of every tool image. Firecracker cannot
// set a drive's serial, so the guest's init also takes a disk with this
// label (and a valid marker) for a tool disk.
const ToolDiskLabel = "aet-tool"

// ToolDiskSerial is the virtio-blk serial of the i-th tool disk.
func ToolDiskSerial(i int) string { return fmt.Sprintf("%s%d", toolDiskSerialPrefix, i) }

// IsToolDiskSerial reports whether serial names a tool disk.
func IsToolDiskSerial(serial string) bool { return strings.HasPrefix(serial, toolDiskSerialPrefix) }

// MaxToolVolumes bounds the disks a VM gets for tools.
const MaxToolVolumes = 16

// Validate checks a tool set as backends receive it: absolute clean paths,
// every Dir directly under Root, bin paths under Dir.
func (s *ToolSet) Validate() error {
	if s == nil || len(s.Volumes) == 0 {
		return nil
	}
	if !filepath.IsAbs(s.Root) || filepath.Clean(s.Root) != s.Root || s.Root == "/" {
		return fmt.Errorf("%w: tools root %q must be a clean absolute path other than /", ErrInvalid, s.Root)
	}
	if len(s.Volumes) > MaxToolVolumes {
		return fmt.Errorf("%w: %d tool volumes asked for; at most %d are allowed", ErrInvalid, len(s.Volumes), MaxToolVolumes)
	}
	seen := map[string]bool{}
	for _, v := range s.Volumes {
		if v.Key == "" || strings.ContainsAny(v.Key, "/\x00") || v.Key[0] == '.' {
			return fmt.Errorf("%w: tool volume key %q is not a valid directory name", ErrInvalid, v.Key)
		}
		if seen[v.Key] {
			return fmt.Errorf("%w: tool volume %q is given twice", ErrInvalid, v.Key)
		}
		seen[v.Key] = true
		if v.Dir != filepath.Join(s.Root, v.Key) {
			return fmt.Errorf("%w: tool volume %q has dir %q; it must be %s", ErrInvalid, v.Key, v.Dir, filepath.Join(s.Root, v.Key))
		}
		if v.Image != "" && (!filepath.IsAbs(v.Image) || strings.ContainsAny(v.Image, ",\x00")) {
			return fmt.Errorf("%w: tool volume %q has image %q; it must be an absolute path without commas", ErrInvalid, v.Key, v.Image)
		}
		for _, b := range v.BinPaths {
			if filepath.Clean(b) != b || !strings.HasPrefix(b, v.Dir+"/") {
				return fmt.Errorf("%w: tool volume %q has bin path %q outside %s", ErrInvalid, v.Key, b, v.Dir)
			}
		}
	}
	return nil
}

// Path returns the bin directories of every volume, in order.
func (s *ToolSet) Path() []string {
	if s == nil {
		return nil
	}
	var p []string
	for _, v := range s.Volumes {
		p = append(p, v.BinPaths...)
	}
	return p
}
