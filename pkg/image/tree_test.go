package image_test

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/image"
	"github.com/aetherium/aetherium-core/pkg/types"
)

type entry struct {
	name, link string
	typ        byte
	body       string
}

func makeTar(t *testing.T, es ...entry) *bytes.Buffer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range es {
		h := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: 0o644, Size: int64(len(e.body))}
		if e.typ == tar.TypeDir {
			h.Mode = 0o755
		}
		require.NoError(t, tw.WriteHeader(h))
		_, err := tw.Write([]byte(e.body))
		require.NoError(t, err)
	}
	require.NoError(t, tw.Close())
	return &buf
}

func TestExtractTarRejectsEscapes(t *testing.T) {
	for _, tc := range []struct {
		name    string
		entries []entry
	}{
		{"dot-dot file", []entry{{name: "../evil", typ: tar.TypeReg, body: "x"}}},
		{"dot-dot inside", []entry{{name: "etc/../../evil", typ: tar.TypeReg, body: "x"}}},
		{"hard link out", []entry{{name: "l", link: "../../etc/shadow", typ: tar.TypeLink}}},
		{"through a symlink", []entry{
			{name: "up", link: "..", typ: tar.TypeSymlink},
			{name: "up/evil", typ: tar.TypeReg, body: "x"},
		}},
		{"through an absolute symlink", []entry{
			{name: "abs", link: "/", typ: tar.TypeSymlink},
			{name: "abs/evil", typ: tar.TypeReg, body: "x"},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			parent := t.TempDir()
			dir := filepath.Join(parent, "root")
			require.NoError(t, os.Mkdir(dir, 0o755))
			err := image.ExtractTar(makeTar(t, tc.entries...), dir)
			require.Error(t, err)
			_, serr := os.Lstat(filepath.Join(parent, "evil"))
			require.True(t, os.IsNotExist(serr), "nothing written outside")
			_, serr = os.Lstat("/evil")
			require.True(t, os.IsNotExist(serr), "nothing written outside")
			if tc.name[:3] == "dot" {
				require.ErrorIs(t, err, image.ErrUnsafePath)
				require.ErrorIs(t, err, types.ErrInvalid)
				require.Contains(t, err.Error(), `".."`)
			}
		})
	}
}

func TestExtractTarRoundTrip(t *testing.T) {
	dir := t.TempDir()
	err := image.ExtractTar(makeTar(t,
		entry{name: "./", typ: tar.TypeDir},
		entry{name: "./etc/", typ: tar.TypeDir},
		entry{name: "/etc/os-release", typ: tar.TypeReg, body: "ID=test\n"},
		entry{name: "etc/alias", link: "/etc/os-release", typ: tar.TypeSymlink},
		entry{name: "etc/hard", link: "etc/os-release", typ: tar.TypeLink},
	), dir)
	require.NoError(t, err)
	b, err := os.ReadFile(filepath.Join(dir, "etc/hard"))
	require.NoError(t, err)
	require.Equal(t, "ID=test\n", string(b))
	l, err := os.Readlink(filepath.Join(dir, "etc/alias"))
	require.NoError(t, err)
	require.Equal(t, "/etc/os-release", l)

	// The tree hash ignores mtimes but sees contents.
	h1, err := image.HashTree(dir)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "etc/os-release"), []byte("ID=other\n"), 0o644))
	h2, err := image.HashTree(dir)
	require.NoError(t, err)
	require.NotEqual(t, h1, h2)
}
