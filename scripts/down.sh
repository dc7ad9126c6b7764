#!/usr/bin/env bash
# Stops everything scripts/up.sh started, by the pids it recorded.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
stop_pid "$STATE/aether-api.pid" aether-api 40
stop_pid "$STATE/worker.pid" worker 60
stop_pid "$STATE/dockerd/dockerd.pid" dockerd 60
"$REPO/scripts/services.sh" down
