package e2b

import (
	"fmt"
	"regexp"

	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

var templateNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$`)

// ValidateTemplate checks a template an operator registers: a name of 1
// to 63 characters of [a-z0-9._-] other than the built-in "base", at
// least 1 vCPU and types.MinMemoryMB of memory, and valid variable names.
func ValidateTemplate(tpl *storage.Template) error {
	switch {
	case tpl.Name == BaseTemplate:
		return fmt.Errorf("%w: template %q is built in (the default guest image, %d vCPUs, %d MiB) and cannot be registered", types.ErrInvalid, BaseTemplate, BaseVCPUs, BaseMemoryMB)
	case !templateNameRE.MatchString(tpl.Name):
		return fmt.Errorf("%w: template name %q must be 1-63 characters of lowercase letters, digits, '.', '_' and '-', starting and ending with a letter or digit", types.ErrInvalid, tpl.Name)
	case tpl.VCPUs < 1:
		return fmt.Errorf("%w: template %s has %d vCPUs; give at least 1", types.ErrInvalid, tpl.Name, tpl.VCPUs)
	case tpl.MemoryMB < types.MinMemoryMB:
		return fmt.Errorf("%w: template %s has %d MiB of memory; give at least %d", types.ErrInvalid, tpl.Name, tpl.MemoryMB, types.MinMemoryMB)
	}
	return types.ValidateEnv(tpl.Env)
}
