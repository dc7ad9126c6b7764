package jail

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// TestVMLimits: a backend without a Manager gets the Manager's limits,
// and Files names them for each cgroup version as Create writes them.
func TestVMLimits(t *testing.T) {
	t.Parallel()
	lim := VMLimits(Config{}, 2, 512)
	require.Equal(t, Limits{CPUMillis: 2000 + DefaultCPUOverheadMillis, MemoryBytes: (512 + DefaultMemoryOverheadMB) << 20, PidsMax: DefaultPidsMax}, lim)
	require.Equal(t, Limits{CPUMillis: 1000, MemoryBytes: 96 << 20, PidsMax: 7, IOWeight: 50},
		VMLimits(Config{CPUOverheadMillis: -1, MemoryOverheadMB: 32, PidsMax: 7, IOWeight: 50}, 1, 64), "-1: no CPU overhead")
	m := &Manager{cfg: Config{}.withDefaults()}
	require.Equal(t, lim, m.Limits(2, 512))

	require.Equal(t, []CgroupFile{{"cpu.max", "225000 100000"}, {"memory.max", "939524096"}, {"pids.max", "512"}}, lim.Files(CgroupV2))
	require.Equal(t, []CgroupFile{{"cpu.cfs_period_us", "100000"}, {"cpu.cfs_quota_us", "225000"}, {"memory.limit_in_bytes", "939524096"}, {"pids.max", "512"}}, lim.Files(CgroupV1))
	require.Empty(t, Limits{IOWeight: 100}.Files(CgroupV2), "unset limits and the I/O weight are left out")
}
