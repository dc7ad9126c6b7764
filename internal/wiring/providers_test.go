package wiring

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/config"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// TestProviders: the table names every backend, each entry is whole, and
// an unknown name is refused the same way by every entry point.
func TestProviders(t *testing.T) {
	for _, name := range []string{"docker", "qemu", "firecracker"} {
		p, err := lookupProvider(name)
		require.NoError(t, err, name)
		require.NotNil(t, p.New, name)
		require.NotNil(t, p.Diagnose, name)
	}
	_, err := lookupProvider("vbox")
	require.ErrorIs(t, err, types.ErrInvalid)
	c := &config.Config{}
	c.VMM.Provider = "vbox"
	_, err = NewOrchestrator(t.Context(), c, "w", nil, nil)
	require.ErrorIs(t, err, types.ErrInvalid)
	require.ErrorIs(t, CheckVMM(t.Context(), c), types.ErrInvalid)
	require.Empty(t, DiagnoseVMM(t.Context(), c))
}
