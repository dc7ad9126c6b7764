#!/usr/bin/env bash
# Runs the whole test suite. Tests start their own PostgreSQL, Redis and
# dockerd on private directories and ports; this script only makes sure the
# packages they need are installed. AETHERIUM_TEST_REQUIRE=1 turns skips for
# missing services into failures (CI sets it).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"
"$REPO/scripts/setup.sh"
log "go vet"
go vet ./...
log "go test"
go test -count=1 -timeout 30m "$@" ./...
