package types

import (
	"fmt"
	"regexp"
)

// vmIDRE is what a VM id may look like. It becomes a directory name, part
// of socket paths and container names, and Firecracker's jailer accepts
// only letters, digits and hyphens, at most 64: every backend takes the
// same ids, so a VM can move between them.
var vmIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9-]{0,63}$`)

// ValidateID checks a VM id; an invalid one returns ErrInvalid.
func ValidateID(id string) error {
	if !vmIDRE.MatchString(id) {
		return fmt.Errorf("%w: vm id %q: use 1-64 letters, digits or '-', starting with a letter or digit", ErrInvalid, id)
	}
	return nil
}
