package types

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestCheckTransition(t *testing.T) {
	cases := []struct {
		from, to VMState
		ok       bool
	}{
		{VMPending, VMCreating, true},
		{VMCreating, VMRunning, true},
		{VMRunning, VMStopping, true},
		{VMStopping, VMStopped, true},
		{VMStopped, VMRunning, true},
		{VMRunning, VMDeleting, true},
		{VMDeleting, VMDeleted, true},
		{VMFailed, VMDeleting, true},
		{VMRunning, VMRunning, true}, // retries are no-ops
		{VMDeleted, VMRunning, false},
		{VMDeleted, VMDeleting, false},
		{VMPending, VMRunning, false},
		{VMFailed, VMRunning, false},
		{VMState("bogus"), VMRunning, false},
	}
	for _, tc := range cases {
		err := CheckTransition(tc.from, tc.to)
		if tc.ok {
			require.NoError(t, err, "%s -> %s", tc.from, tc.to)
		} else {
			require.Error(t, err, "%s -> %s", tc.from, tc.to)
		}
	}
	// Every state is covered by the transition table.
	for _, s := range AllVMStates {
		require.True(t, s.Valid(), s)
	}
}

func TestSpecValidate(t *testing.T) {
	ok := VMSpec{Name: "web-1", VCPUs: 1, MemoryMB: 64}
	require.NoError(t, ok.Validate(2))
	cases := []struct {
		name string
		mod  func(*VMSpec)
		want string
	}{
		{"zero vcpus", func(s *VMSpec) { s.VCPUs = 0 }, "at least 1"},
		{"too many vcpus", func(s *VMSpec) { s.VCPUs = 3 }, "only 2 CPUs"},
		{"small memory", func(s *VMSpec) { s.MemoryMB = 63 }, "at least 64"},
		{"empty name", func(s *VMSpec) { s.Name = "" }, "empty"},
		{"long name", func(s *VMSpec) { s.Name = strings.Repeat("a", 64) }, "at most 63"},
		{"upper case", func(s *VMSpec) { s.Name = "Web" }, "lowercase"},
		{"leading dash", func(s *VMSpec) { s.Name = "-web" }, "start and end"},
		{"bad label", func(s *VMSpec) { s.Labels = map[string]string{"a b": "x"} }, "label key"},
		{"bad env", func(s *VMSpec) { s.Env = map[string]string{"1X": "x"} }, "environment variable"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := ok
			tc.mod(&s)
			err := s.Validate(2)
			require.ErrorIs(t, err, ErrInvalid)
			require.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestCommandValidate(t *testing.T) {
	require.NoError(t, Command{Cmd: "true"}.Validate())
	require.ErrorIs(t, Command{}.Validate(), ErrInvalid)
	require.ErrorIs(t, Command{Cmd: "x", Timeout: -1}.Validate(), ErrInvalid)
	require.ErrorIs(t, Command{Cmd: "x", Stdin: make([]byte, MaxStdinBytes+1)}.Validate(), ErrInvalid)
}
