#!/usr/bin/env bash
# Runs the benchmarks quoted in docs/benchmarks.md, each side by side with
# its baseline in one run. The benchmarks start their own services.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"
"$REPO/scripts/setup.sh"
go test -run '^$' -bench 'BenchmarkExecTrue' -benchtime 200x -count 1 ./pkg/vmm/docker ./pkg/agent
go test -run '^$' -bench 'BenchmarkExecuteCommandTask' -benchtime 100x -count 1 ./pkg/worker
