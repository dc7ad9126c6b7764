#!/usr/bin/env bash
# services.sh up|down|status: private PostgreSQL and Redis for development.
#
# They run on their own ports and data directories under $STATE, never as
# the system's services, so they can sit next to anything else on the
# machine. `up` installs the packages when their binaries are missing.
#
#   AETHERIUM_STATE_DIR   where data, logs and pidfiles live (default <repo>/.aetherium)
#   AETHERIUM_PG_PORT     PostgreSQL's port on 127.0.0.1 (default 15432)
#   AETHERIUM_REDIS_PORT  Redis's port on 127.0.0.1 (default 16379)
#   AETHERIUM_PG_BIN      directory of initdb/pg_ctl (default: newest /usr/lib/postgresql/*/bin)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${AETHERIUM_STATE_DIR:-$REPO/.aetherium}
PG_PORT=${AETHERIUM_PG_PORT:-15432}
REDIS_PORT=${AETHERIUM_REDIS_PORT:-16379}
PG_DATA=$STATE/pg
PG_LOG=$STATE/pg.log
REDIS_DIR=$STATE/redis
REDIS_PIDFILE=$REDIS_DIR/redis.pid
REDIS_LOG=$REDIS_DIR/redis.log
DB_USER=aetherium
DB_PASSWORD=aetherium
DB_NAME=aetherium

die() {
	echo "services.sh: $*" >&2
	exit 1
}
say() { echo "services.sh: $*"; }

pg_bin() {
	if [[ -n ${AETHERIUM_PG_BIN:-} ]]; then
		echo "$AETHERIUM_PG_BIN"
		return
	fi
	local d
	d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
	if [[ -n $d && -x $d/initdb ]]; then
		echo "$d"
	elif command -v initdb >/dev/null; then
		dirname "$(command -v initdb)"
	fi
}

have_pg() { local d; d=$(pg_bin); [[ -n $d && -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]]; }
have_redis() { command -v redis-server >/dev/null; }

# as_pg runs a command as the postgres user when we are root, since
# PostgreSQL refuses to run as root.
as_pg() {
	if [[ $EUID -eq 0 ]]; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

# install_packages installs PostgreSQL and Redis without letting the
# packages create or start system services of their own.
install_packages() {
	[[ $EUID -eq 0 ]] || die "PostgreSQL or Redis is missing and installing them needs root; run \`sudo $0 up\` or \`make setup\`"
	local conf=/etc/postgresql-common/createcluster.conf created_policy=
	mkdir -p "$(dirname "$conf")"
	if ! grep -Eq '^[[:space:]]*create_main_cluster[[:space:]]*=' "$conf" 2>/dev/null; then
		echo 'create_main_cluster = false' >>"$conf"
	fi
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 755 /usr/sbin/policy-rc.d
		created_policy=1
	fi
	local rc=0
	say "installing postgresql and redis-server with apt-get"
	{ DEBIAN_FRONTEND=noninteractive apt-get update -q &&
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql redis-server; } || rc=$?
	if [[ -n $created_policy ]]; then
		rm -f /usr/sbin/policy-rc.d
	fi
	[[ $rc -eq 0 ]] || die "apt-get failed (exit $rc); see its output above"
	have_pg || die "PostgreSQL was installed but no initdb/pg_ctl/postgres was found under /usr/lib/postgresql/*/bin; set AETHERIUM_PG_BIN"
	have_redis || die "redis-server was installed but is not in PATH"
}

pg_running() { [[ -f $PG_DATA/PG_VERSION ]] && as_pg "$(pg_bin)/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

pg_pid() { head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null || true; }

# redis_pid prints the pid in our pidfile if that process is alive and is a
# redis-server, so a reused pid is never mistaken for ours.
redis_pid() {
	local pid
	pid=$(cat "$REDIS_PIDFILE" 2>/dev/null || true)
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	kill -0 "$pid" 2>/dev/null || return 1
	[[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server* ]] || return 1
	echo "$pid"
}

# redis_ping asks the Redis on our port for PONG, in a subshell so that the
# descriptor and any connection error stay there.
redis_ping() {
	(
		exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" || exit 1
		printf 'PING\r\n' >&3
		IFS= read -r -t 2 reply <&3 || exit 1
		[[ $reply == "+PONG"* ]]
	) 2>/dev/null
}

pg_psql() {
	as_pg "$(pg_bin)/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_DATA" -p "$PG_PORT" -U postgres -d postgres "$@"
}

start_pg() {
	local bin
	bin=$(pg_bin)
	mkdir -p "$STATE"
	if [[ ! -d $PG_DATA ]]; then
		mkdir -m 700 "$PG_DATA"
	fi
	if [[ $EUID -eq 0 ]]; then
		chown postgres: "$PG_DATA"
		touch "$PG_LOG"
		chown postgres: "$PG_LOG"
	fi
	if ! as_pg test -w "$PG_DATA" -a -x "$PG_DATA"; then
		die "the postgres user cannot reach $PG_DATA: a parent directory is not searchable by it (e.g. mode 0700); set AETHERIUM_STATE_DIR to a directory it can reach, e.g. AETHERIUM_STATE_DIR=/var/tmp/aetherium"
	fi
	# The server's socket lives in the data directory, whose path must fit
	# in a unix socket address.
	if ((${#PG_DATA} + 20 > 107)); then
		die "$PG_DATA is too long for PostgreSQL's unix socket; set AETHERIUM_STATE_DIR to a shorter path"
	fi

	if pg_running; then
		say "postgresql already runs (pid $(pg_pid))"
	else
		if [[ ! -f $PG_DATA/PG_VERSION ]]; then
			say "initializing $PG_DATA"
			# Local socket connections trust the OS user (the socket is in
			# the 0700 data directory); TCP connections need a password.
			(cd "$PG_DATA" && as_pg "$bin/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
				--auth-local=trust --auth-host=scram-sha-256 >/dev/null) ||
				die "initdb failed; see the messages above"
			echo "include_if_exists = 'aetherium.conf'" | as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null
		fi
		# Rewritten on every start so that port and paths follow the
		# environment.
		as_pg tee "$PG_DATA/aetherium.conf" >/dev/null <<-EOF
			# Written by scripts/services.sh; changes are lost on the next start.
			port = $PG_PORT
			listen_addresses = '127.0.0.1'
			unix_socket_directories = '$PG_DATA'
			shared_buffers = 64MB
		EOF
		say "starting postgresql on 127.0.0.1:$PG_PORT"
		(cd "$PG_DATA" && as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null) || {
			tail -n 20 "$PG_LOG" >&2 || true
			die "postgresql did not start; its log is $PG_LOG"
		}
	fi

	if [[ $(pg_psql -tA -c "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'") != 1 ]]; then
		pg_psql -c "CREATE ROLE $DB_USER LOGIN PASSWORD '$DB_PASSWORD'"
	fi
	if [[ $(pg_psql -tA -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'") != 1 ]]; then
		pg_psql -c "CREATE DATABASE $DB_NAME OWNER $DB_USER"
	fi
}

start_redis() {
	mkdir -p "$REDIS_DIR"
	local pid
	if pid=$(redis_pid); then
		say "redis already runs (pid $pid)"
	else
		say "starting redis on 127.0.0.1:$REDIS_PORT"
		rm -f "$REDIS_PIDFILE"
		# The append-only file keeps queued tasks across a restart, written
		# every second; what a crash loses meanwhile the workers' sweeper
		# enqueues again from PostgreSQL (docs/reliability.md).
		redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$REDIS_DIR" \
			--save "" --appendonly yes --appendfsync everysec \
			--daemonize yes --pidfile "$REDIS_PIDFILE" --logfile "$REDIS_LOG" ||
			die "redis-server did not start; its log is $REDIS_LOG"
	fi
	# Redis daemonizes before it binds its port, so a failure shows as our
	# process going away; checking it too keeps another server on the port
	# from passing for ours.
	local i
	for ((i = 0; i < 100; i++)); do
		if redis_pid >/dev/null && redis_ping; then
			return
		fi
		if [[ -s $REDIS_PIDFILE ]] && ! redis_pid >/dev/null; then
			sleep 0.2 # let it finish writing its log
			tail -n 20 "$REDIS_LOG" >&2 || true
			die "redis-server exited; its log is $REDIS_LOG"
		fi
		sleep 0.1
	done
	tail -n 20 "$REDIS_LOG" >&2 || true
	die "redis on 127.0.0.1:$REDIS_PORT did not answer PING; its log is $REDIS_LOG"
}

stop_pg() {
	if ! pg_running; then
		say "postgresql is not running"
		return
	fi
	say "stopping postgresql (pid $(pg_pid))"
	(cd "$PG_DATA" && as_pg "$(pg_bin)/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null)
}

stop_redis() {
	local pid i
	if ! pid=$(redis_pid); then
		say "redis is not running"
		rm -f "$REDIS_PIDFILE"
		return
	fi
	say "stopping redis (pid $pid)"
	kill -TERM "$pid"
	for ((i = 0; i < 100; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		say "redis (pid $pid) did not stop within 10s; killing it"
		kill -KILL "$pid"
	fi
	rm -f "$REDIS_PIDFILE"
}

status() {
	local rc=0 pid
	if have_pg && pg_running; then
		echo "postgresql: running (pid $(pg_pid)) on 127.0.0.1:$PG_PORT, data $PG_DATA"
		echo "  dsn: postgres://$DB_USER:$DB_PASSWORD@127.0.0.1:$PG_PORT/$DB_NAME?sslmode=disable"
	else
		echo "postgresql: stopped"
		rc=3
	fi
	if pid=$(redis_pid); then
		echo "redis: running (pid $pid) on 127.0.0.1:$REDIS_PORT, dir $REDIS_DIR"
	else
		echo "redis: stopped"
		rc=3
	fi
	return "$rc"
}

case ${1:-} in
up)
	if ! have_pg || ! have_redis; then
		install_packages
	fi
	start_pg
	start_redis
	status
	;;
down)
	if have_pg; then
		stop_pg
	fi
	stop_redis
	;;
status)
	status
	;;
*)
	echo "usage: $0 up|down|status" >&2
	exit 2
	;;
esac
