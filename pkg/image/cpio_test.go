package image

import (
	"bytes"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// readCpio parses a newc archive; it is the test's independent reader.
func readCpio(t *testing.T, b []byte) []CpioEntry {
	t.Helper()
	var out []CpioEntry
	hex := func(s string) uint32 {
		v, err := strconv.ParseUint(s, 16, 32)
		require.NoError(t, err)
		return uint32(v)
	}
	off := 0
	for {
		require.GreaterOrEqual(t, len(b)-off, 110, "truncated header at %d", off)
		h := string(b[off : off+110])
		require.Equal(t, "070701", h[:6])
		field := func(i int) uint32 { return hex(h[6+8*i : 14+8*i]) }
		mode, size, nameLen := field(1), int(field(6)), int(field(11))
		name := string(b[off+110 : off+110+nameLen-1])
		off = align4(off + 110 + nameLen)
		data := b[off : off+size]
		off = align4(off + size)
		if name == "TRAILER!!!" {
			require.Equal(t, len(b), off, "bytes after the trailer")
			return out
		}
		var m fs.FileMode
		switch mode & 0o170000 {
		case cpioDir:
			m = fs.ModeDir
		case cpioChr:
			m = fs.ModeDevice | fs.ModeCharDevice
		case cpioLink:
			m = fs.ModeSymlink
		}
		out = append(out, CpioEntry{Name: name, Mode: m | fs.FileMode(mode&0o777), Data: data, Major: field(9), Minor: field(10)})
	}
}

func TestWriteCpioRoundTrip(t *testing.T) {
	in := []CpioEntry{
		{Name: "init", Mode: 0o755, Data: []byte("#!/bin/sh\necho hi\n")},
		{Name: "dev", Mode: fs.ModeDir | 0o755},
		{Name: "dev/console", Mode: fs.ModeDevice | fs.ModeCharDevice | 0o600, Major: 5, Minor: 1},
		{Name: "etc/x", Mode: 0o644, Data: []byte("abc")}, // 3 bytes: needs padding
		{Name: "etc", Mode: fs.ModeDir | 0o755},
		{Name: "bin/sh", Mode: fs.ModeSymlink | 0o777, Data: []byte("busybox")},
	}
	var buf bytes.Buffer
	require.NoError(t, WriteCpio(&buf, in))
	got := readCpio(t, buf.Bytes())
	names := []string{}
	for _, e := range got {
		names = append(names, e.Name)
	}
	require.Equal(t, []string{"bin/sh", "dev", "dev/console", "etc", "etc/x", "init"}, names, "sorted")
	require.Equal(t, uint32(5), got[2].Major)
	require.Equal(t, uint32(1), got[2].Minor)
	require.Equal(t, "abc", string(got[4].Data))
	require.Equal(t, fs.FileMode(0o755), got[5].Mode)

	// Deterministic: the same entries give the same bytes.
	var again bytes.Buffer
	require.NoError(t, WriteCpio(&again, in))
	require.Equal(t, buf.Bytes(), again.Bytes())

	// GNU cpio reads it too.
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Logf("cpio is not installed; skipping the cross-check with it (run ./scripts/setup.sh)")
		return
	}
	cmd := exec.Command("cpio", "-t", "-v")
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Contains(t, string(out), "dev/console")
	require.Contains(t, string(out), "5,   1")

	dir := t.TempDir()
	cmd = exec.Command("cpio", "-i", "-d", "--quiet")
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	out, err = cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	b, err := os.ReadFile(filepath.Join(dir, "init"))
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(string(b), "#!/bin/sh"))
	fi, err := os.Stat(filepath.Join(dir, "init"))
	require.NoError(t, err)
	require.Equal(t, fs.FileMode(0o755), fi.Mode().Perm())
}

func TestWriteCpioRejects(t *testing.T) {
	var buf bytes.Buffer
	require.Error(t, WriteCpio(&buf, []CpioEntry{{Name: "a", Mode: 0o644}, {Name: "a", Mode: 0o644}}))
	require.Error(t, WriteCpio(&buf, []CpioEntry{{Name: "d", Mode: fs.ModeDir, Data: []byte("x")}}))
	require.Error(t, WriteCpio(&buf, []CpioEntry{{Name: "p", Mode: fs.ModeNamedPipe}}))
}
