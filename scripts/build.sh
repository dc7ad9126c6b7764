#!/usr/bin/env bash
# Builds the binaries into bin/. fc-agent is static: it runs inside
# guests and containers that have no libc of ours.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"
mkdir -p bin
CGO_ENABLED=0 go build -trimpath -buildvcs=false -o bin/fc-agent ./cmd/fc-agent
# aether-jailer confines every VMM; the worker looks for it next to itself.
CGO_ENABLED=0 go build -trimpath -buildvcs=false -o bin/aether-jailer ./cmd/aether-jailer
for b in worker aether-api aether-cli migrate; do
  [ -d "cmd/$b" ] && go build -o "bin/$b" "./cmd/$b"
done
log "built bin/worker bin/aether-api bin/fc-agent bin/aether-jailer bin/aether-cli bin/migrate"
