package e2b

// The Go and connect-go code in gen/ is generated from proto/ and kept in
// the repository; regenerate after editing a .proto (needs protoc,
// protoc-gen-go v1.36.12 and protoc-gen-connect-go v1.21.1 in PATH).
//go:generate protoc -I proto --go_out=gen --go_opt=module=github.com/aetherium/aetherium-core/pkg/e2b/gen --connect-go_out=gen --connect-go_opt=module=github.com/aetherium/aetherium-core/pkg/e2b/gen process/process.proto filesystem/filesystem.proto
