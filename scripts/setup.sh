#!/usr/bin/env bash
# Installs the system packages Aetherium Core needs, idempotently, without
# letting them start system-wide services: our scripts and tests start
# private instances instead.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ "$(id -u)" = 0 ] || die "setup installs packages: run it as root (or with sudo)"

need=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "$1" ]; }
have make || need+=(make)
have curl || need+=(curl)
have git || need+=(git)
have /usr/lib/postgresql/15/bin/postgres || need+=(postgresql)
have redis-server || need+=(redis-server)
have dockerd || need+=(docker.io)
# A static busybox gives the docker backend's base image its shell.
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)

if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  # Keep postinst scripts from starting system services (PostgreSQL's main
  # cluster, redis-server, dockerd) that we would then leave running.
  created_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && created_policy=1
  fi
  mkdir -p /etc/postgresql-common
  grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf ||
    echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf
  trap '[ -n "$created_policy" ] && rm -f /usr/sbin/policy-rc.d' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v go >/dev/null 2>&1; then
  die "Go is missing: install Go 1.26 or newer at /usr/local/go (the build machines have it there)"
fi
log "system packages present"
