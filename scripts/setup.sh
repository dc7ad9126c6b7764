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
# The qemu backend and the guest image builder.
have qemu-system-x86_64 || need+=(qemu-system-x86)
have qemu-img || need+=(qemu-utils)
have /usr/sbin/debootstrap || need+=(debootstrap)
have /usr/sbin/mkfs.ext4 || need+=(e2fsprogs)
have debugfs || have /usr/sbin/debugfs || need+=(e2fsprogs)
have cpio || need+=(cpio)
# Node runs the e2b SDK compatibility tests (test/e2b, docs/e2b.md).
have node || need+=(nodejs npm)

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

# The e2b SDK 2.51.0 needs Node 20.18.1 or newer; Debian 12's nodejs is 18.
node_version=$(node --version 2>/dev/null | sed 's/^v//')
if ! printf '%s\n' 20.18.1 "$node_version" | sort -V -C; then
  die "Node ${node_version:-(none)} is too old for the e2b SDK tests (test/e2b): install Node 20.18.1 or newer (e.g. from nodejs.org or NodeSource) and put node and npm in PATH"
fi

# mise provisions tools for VMs (pkg/tools, docs/tools.md). The pinned build
# comes from the npm registry's @jdxcode/mise-linux-x64 package, the source
# these machines can reach, and is checked against the registry's sha512
# integrity before it is unpacked. AETHERIUM_MISE_SOURCE overrides the source:
# another npm spec or a local .tgz (then set AETHERIUM_MISE_INTEGRITY to its
# "sha512-..." value too). With internet access the official installer
# (https://mise.run, `curl https://mise.run | sh`) works as well; point
# tools.mise_binary at the result.
MISE_VERSION=2026.9.15
MISE_INTEGRITY=sha512-ButPFGyztN0Rk/HOHvHuf+W80CkvQRAjbDWHvhGJc3PnL3e2KhCYZIOyjx8wPkhr9VJa/7sJZXpxtt5JLjsfaQ==
install_mise() {
  local src=${AETHERIUM_MISE_SOURCE:-@jdxcode/mise-linux-x64@$MISE_VERSION}
  local want=${AETHERIUM_MISE_INTEGRITY:-$MISE_INTEGRITY}
  local cache=/var/cache/aetherium/mise dest=/usr/local/lib/aetherium/mise/$MISE_VERSION
  if [ -x "$dest/mise" ] && "$dest/mise" --version >/dev/null 2>&1; then
    ln -sf "$dest/mise" /usr/local/bin/mise
    return 0
  fi
  command -v npm >/dev/null 2>&1 || die "npm is needed to fetch mise from the npm registry; install nodejs and npm"
  log "fetching mise from $src"
  mkdir -p "$cache"
  local tgz
  tgz=$(cd "$cache" && npm pack --silent "$src" | tail -n1) || die "npm pack $src failed; check the npm registry is reachable or set AETHERIUM_MISE_SOURCE"
  local got
  got="sha512-$(openssl dgst -sha512 -binary "$cache/$tgz" | base64 -w0)"
  if [ "$got" != "$want" ]; then
    rm -f "$cache/$tgz"
    die "mise tarball $tgz has integrity $got, expected $want; refusing to install it"
  fi
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  tar -xzf "$cache/$tgz" -C "$dest.tmp" --strip-components=2 package/bin/mise ||
    die "$tgz holds no package/bin/mise"
  chmod 0755 "$dest.tmp/mise"
  "$dest.tmp/mise" --version >/dev/null || die "the mise from $tgz does not run here"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  ln -sf "$dest/mise" /usr/local/bin/mise
  log "installed mise $("$dest/mise" --version)"
}
install_mise

if ! command -v go >/dev/null 2>&1; then
  die "Go is missing: install Go 1.26 or newer at /usr/local/go (the build machines have it there)"
fi
log "system packages present"
