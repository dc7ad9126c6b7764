package testenv

import "testing"

// Jailer builds cmd/aether-jailer once per test process and returns its
// path, for the jail.binary of every confined backend a test makes: a test
// binary has no aether-jailer next to it, where the backends look first.
func Jailer(t testing.TB) string {
	t.Helper()
	return BuildBinary(t, "aether-jailer")
}
