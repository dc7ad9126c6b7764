#!/usr/bin/env bash
# Runs the benchmarks quoted in docs/benchmarks.md, each side by side with
# its baseline in one run. The benchmarks start their own services.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"
"$REPO/scripts/setup.sh"
go test -run '^$' -bench 'BenchmarkExecTrue' -benchtime 200x -count 1 ./pkg/vmm/docker ./pkg/agent
go test -run '^$' -bench 'BenchmarkExecuteCommandTask' -benchtime 100x -count 1 ./pkg/worker
# Real microVMs (QEMU microvm, TCG here) and networking; -p 1 keeps the
# boots from competing with each other.
go test -p 1 -run '^$' -bench 'BenchmarkBootVsRaw' -benchtime 10x -count 1 ./pkg/vmm/qemu
go test -p 1 -run '^$' -bench 'BenchmarkExecTrue' -benchtime 300x -count 1 ./pkg/vmm/qemu
go test -p 1 -run '^$' -bench 'BenchmarkIdleMemory' -benchtime 3x -count 1 ./pkg/vmm/qemu
go test -p 1 -run '^$' -bench 'BenchmarkGuestThroughput' -benchtime 5x -count 1 ./pkg/vmm/qemu
go test -p 1 -run '^$' -bench 'BenchmarkAttachDetach' -benchtime 50x -count 1 ./pkg/network
# The HTTP API: exec against docker exec, first streamed byte, listing, the
# CLI as a process in both modes, and 100 MiB files through the real binaries.
go test -run '^$' -bench . -benchtime 100x -count 1 ./pkg/api
go test -run '^$' -bench 'BenchmarkCLIExecTrue' -benchtime 100x -count 1 ./internal/cli
go test -run '^$' -bench 'BenchmarkFileTransfer' -benchtime 3x -count 1 ./internal/e2e
# The unmodified E2B SDK against the native API (docker and qemu).
go test -p 1 -run '^$' -bench 'BenchmarkSDK' -benchtime 1x -count 1 ./pkg/e2b
