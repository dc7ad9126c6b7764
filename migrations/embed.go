// Package migrations holds the database schema as golang-migrate files
// (NNNNNN_name.up.sql / .down.sql), embedded so that every binary carries
// the schema it was built against. storage/postgres applies them.
package migrations

import "embed"

// FS holds the migration files at its root.
//
//go:embed *.sql
var FS embed.FS
