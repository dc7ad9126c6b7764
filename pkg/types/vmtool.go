package types

import "time"

// VMTool records one cached tool version a VM was given (see ToolSet): at
// create time or by a tools:install task.
type VMTool struct {
	// VMID is the VM that has it.
	VMID string `json:"vm_id"`
	// Key names the tool cache entry, e.g. "hello-1.0.0-1a2b3c4d5e6f7a8b".
	Key string `json:"key"`
	// Spec is the spec that asked for it, e.g. "node@22"; empty for mise
	// itself, which comes with every tool set.
	Spec string `json:"spec"`
	// Tool is the spec without its version, e.g. "npm:cowsay", or "mise".
	Tool string `json:"tool"`
	// Version is the version the spec resolved to, e.g. "22.11.0".
	Version string `json:"version"`
	// AddedAt is when the VM got it.
	AddedAt time.Time `json:"added_at"`
}
