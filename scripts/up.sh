#!/usr/bin/env bash
# Brings Aetherium Core up: packages, binaries, PostgreSQL and Redis, the
# schema, a private dockerd when the docker backend has no engine to talk to,
# the worker and the HTTP API (aether-api). In the background by default;
# `up.sh --foreground` keeps them in the foreground and stops everything on
# Ctrl-C (make run).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"
FOREGROUND=${1:-}

"$REPO/scripts/setup.sh"
"$REPO/scripts/build.sh"
"$REPO/scripts/services.sh" up
mkdir -p "$STATE"

cfgfile=${AETHERIUM_CONFIG:-aetherium.yaml}
# vmm.provider: the "  provider:" line inside the vmm: section (other
# sections have provider keys too), without quotes or a trailing comment.
file_provider=$( [ -e "$cfgfile" ] && sed -n '/^vmm:/,/^[^ #]/ s/^  provider: *"\{0,1\}\([^ "#]*\).*/\1/p' "$cfgfile" | head -1 || true)
provider=${AETHERIUM_VMM_PROVIDER:-$file_provider}
provider=${provider:-docker}
case $provider in
  docker|qemu|firecracker) ;;
  *) die "unknown vmm provider '$provider'; use docker, qemu or firecracker" ;;
esac
# The CLI reads the same file without the environment: a file naming
# another backend than the worker runs would mislead it (doctor, image
# build) and whoever reads it. A file this script wrote follows the
# environment; one the user wrote is theirs to change.
if [ -n "$file_provider" ] && [ "$file_provider" != "$provider" ]; then
  if head -1 "$cfgfile" | grep -q '^# Written by scripts/up.sh'; then
    log "AETHERIUM_VMM_PROVIDER=$provider: switching vmm.provider in $cfgfile from $file_provider"
    sed -i "/^vmm:/,/^[^ #]/ s/^  provider: .*/  provider: $provider/" "$cfgfile"
  else
    die "$cfgfile says vmm.provider: $file_provider but AETHERIUM_VMM_PROVIDER=$provider; set vmm.provider to $provider in $cfgfile (or unset AETHERIUM_VMM_PROVIDER) so that the CLI and the worker agree"
  fi
fi
DOCKER_HOST_LINE=""
configured=$( [ -e "$cfgfile" ] && sed -n 's/^    host: *//p' "$cfgfile" | tr -d '"' | head -1 || true)
private_host=unix://$STATE/dockerd/docker.sock
if [ "$provider" = docker ] && [ -z "${AETHERIUM_VMM_DOCKER_HOST:-}" ] &&
   { [ -z "$configured" ] || [ "$configured" = "$private_host" ]; }; then
  if [ -z "$configured" ] && [ -S /var/run/docker.sock ] && curl -fsS --max-time 3 --unix-socket /var/run/docker.sock http://docker/_ping >/dev/null 2>&1; then
    log "using the Docker engine at /var/run/docker.sock"
  else
    d=$STATE/dockerd
    mkdir -p "$d"
    if ! alive "$d/dockerd.pid"; then
      log "no Docker engine reachable: starting a private dockerd in $d"
      # --bridge=none --iptables=false: leave the host's network alone.
      setsid dockerd --host "unix://$d/docker.sock" --data-root "$d/data" --exec-root "$d/exec" \
        --pidfile "$d/dockerd.pid.d" --bridge=none --iptables=false --ip-masq=false \
        >"$d/dockerd.log" 2>&1 &
      echo $! > "$d/dockerd.pid"
      for _ in $(seq 300); do
        curl -fsS --max-time 1 --unix-socket "$d/docker.sock" http://docker/_ping >/dev/null 2>&1 && break
        alive "$d/dockerd.pid" || { tail -20 "$d/dockerd.log" >&2; die "dockerd exited; see $d/dockerd.log"; }
        sleep 0.1
      done
    fi
    export AETHERIUM_VMM_DOCKER_HOST=$private_host
    DOCKER_HOST_LINE="    host: $AETHERIUM_VMM_DOCKER_HOST"
  fi
fi

PG_PORT=${AETHERIUM_PG_PORT:-15432}
REDIS_PORT=${AETHERIUM_REDIS_PORT:-16379}
if [ ! -e aetherium.yaml ] && [ -z "${AETHERIUM_CONFIG:-}" ]; then
  log "writing aetherium.yaml for the local services"
  cat > aetherium.yaml <<YAML
# Written by scripts/up.sh for the services it starts; edit freely.
# Every key is documented in aetherium.example.yaml.
vmm:
  provider: $provider
  docker:
    socket_dir: $STATE/vms
$DOCKER_HOST_LINE
queue:
  provider: redis
  redis_addr: 127.0.0.1:$REDIS_PORT
storage:
  provider: postgres
  host: 127.0.0.1
  port: $PG_PORT
  database: aetherium
  user: aetherium
  password: aetherium
worker:
  auto_migrate: true
api:
  listen: 127.0.0.1:${AETHERIUM_API_PORT:-8080}
YAML
fi

# The API reaches the workers' data planes (file transfer) with a shared
# token. It is generated once, kept private in the state directory and
# handed to both daemons, unless the configuration sets cluster.token.
if ! grep -qE '^cluster:' "$cfgfile" 2>/dev/null && [ -z "${AETHERIUM_CLUSTER_TOKEN:-}" ]; then
  if [ ! -s "$STATE/cluster.token" ]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$STATE/cluster.token")
  fi
  AETHERIUM_CLUSTER_TOKEN=$(cat "$STATE/cluster.token")
  export AETHERIUM_CLUSTER_TOKEN
fi

./bin/migrate up

# Real VMs boot the guest image: build it (a no-op when it is up to date;
# the first build runs debootstrap and takes a minute or two).
if [ "$provider" != docker ]; then
  log "building the guest image for the $provider backend"
  ./bin/aether-cli image build >/dev/null
fi

export AETHERIUM_WORKER_READY_FILE=$STATE/worker.ready
export AETHERIUM_API_READY_FILE=$STATE/api.ready

# start_daemon NAME READYFILE: start bin/NAME in its own session, record its
# pid and wait until it writes its ready file.
start_daemon() {
  local name=$1 ready=$2
  if alive "$STATE/$name.pid"; then
    log "$name already running (pid $(cat "$STATE/$name.pid"))"
    return 0
  fi
  rm -f "$ready"
  setsid "./bin/$name" >"$STATE/$name.log" 2>&1 &
  echo $! > "$STATE/$name.pid"
  for _ in $(seq 1200); do
    [ -e "$ready" ] && break
    alive "$STATE/$name.pid" || { tail -30 "$STATE/$name.log" >&2; die "$name exited; see $STATE/$name.log"; }
    sleep 0.1
  done
  [ -e "$ready" ] || die "$name did not become ready in 120s; see $STATE/$name.log"
  log "$name ready (pid $(cat "$STATE/$name.pid"), log $STATE/$name.log)"
}

if [ "$FOREGROUND" = --foreground ]; then
  trap '"$REPO/scripts/down.sh"' EXIT
  trap 'exit 130' INT TERM
  start_daemon aether-api "$AETHERIUM_API_READY_FILE"
  log "worker running in the foreground; Ctrl-C stops everything"
  ./bin/worker &
  echo $! > "$STATE/worker.pid"
  wait "$(cat "$STATE/worker.pid")"
  exit $?
fi

start_daemon worker "$AETHERIUM_WORKER_READY_FILE"
start_daemon aether-api "$AETHERIUM_API_READY_FILE"
log "Try: ./bin/aether-cli vm create --name demo --wait   (HTTP: key=\$(./bin/aether-cli apikey create me); see docs/api.md)"
