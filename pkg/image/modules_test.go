package image

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/types"
)

func fakeModules(deps map[string][]string) func(string) (Module, error) {
	return func(name string) (Module, error) {
		d, ok := deps[name]
		if !ok {
			return Module{}, fmt.Errorf("%w: module %s", types.ErrNotFound, name)
		}
		return Module{Name: name, Depends: d}, nil
	}
}

func names(ms []Module) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.Name
	}
	return out
}

func TestOrderModules(t *testing.T) {
	for _, tc := range []struct {
		name    string
		want    []string
		deps    map[string][]string
		order   []string
		errKind error
		errText string
	}{
		{
			name:  "dependencies first, otherwise as asked",
			want:  []string{"c", "a"},
			deps:  map[string][]string{"a": nil, "b": {"a"}, "c": {"b", "d"}, "d": nil},
			order: []string{"a", "b", "d", "c"},
		},
		{
			name:  "dashes are underscores and .ko is dropped",
			want:  []string{"net-failover.ko"},
			deps:  map[string][]string{"net_failover": {"failover"}, "failover": nil},
			order: []string{"failover", "net_failover"},
		},
		{
			name:  "shared dependencies appear once",
			want:  []string{"x", "y"},
			deps:  map[string][]string{"x": {"z"}, "y": {"z"}, "z": nil},
			order: []string{"z", "x", "y"},
		},
		{
			name:    "cycle",
			want:    []string{"a"},
			deps:    map[string][]string{"a": {"b"}, "b": {"c"}, "c": {"a"}},
			errKind: types.ErrInvalid,
			errText: "a -> b -> c -> a",
		},
		{
			name:    "missing dependency",
			want:    []string{"a"},
			deps:    map[string][]string{"a": {"gone"}},
			errKind: types.ErrNotFound,
			errText: "module gone, needed by a",
		},
		{
			name:    "missing module",
			want:    []string{"nope"},
			deps:    map[string][]string{},
			errKind: types.ErrNotFound,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := OrderModules(tc.want, fakeModules(tc.deps))
			if tc.errKind != nil {
				require.ErrorIs(t, err, tc.errKind)
				require.Contains(t, err.Error(), tc.errText)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.order, names(got))
		})
	}
}
