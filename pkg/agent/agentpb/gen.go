// Package agentpb holds the generated gRPC code of the guest agent protocol
// defined in agent.proto. Regenerate with `make proto`.
package agentpb

//go:generate protoc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative agent.proto
