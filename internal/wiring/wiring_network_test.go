package wiring

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/config"
)

// TestNetworkConfigCarriesPolicy: the network section's egress policy and
// the worker's id (the owner of what its manager attaches) reach the
// network manager's config.
func TestNetworkConfigCarriesPolicy(t *testing.T) {
	c := &config.Config{}
	c.Worker.ID = "w7"
	c.Network.AllowPrivate = true
	c.Network.EgressAllow = []string{"10.1.0.0/16"}
	nc := NetworkConfig(c)
	require.True(t, nc.AllowPrivate)
	require.Equal(t, []string{"10.1.0.0/16"}, nc.EgressAllow)
	require.Equal(t, "w7", nc.Owner)
}
