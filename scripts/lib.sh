# Shared helpers for the scripts in this directory. Source it.
# shellcheck shell=bash
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${AETHERIUM_STATE_DIR:-$REPO/.aetherium}
export PATH=/usr/local/go/bin:$PATH:/usr/sbin:/sbin

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# alive PIDFILE: true when the pid in PIDFILE runs.
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_pid PIDFILE NAME [SECONDS]: SIGTERM the pid we recorded, wait, then
# SIGKILL. Only ever touches the process whose pid we wrote.
stop_pid() {
  local pidfile=$1 name=$2 secs=${3:-30} pid
  if ! alive "$pidfile"; then rm -f "$pidfile"; return 0; fi
  pid=$(cat "$pidfile")
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq $((secs * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then log "$name did not stop in ${secs}s; killing it"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$pidfile"
}
