# test/lib.sh: shell helpers shared by test/check.sh, test/demo.sh and the
# benchmarks.  Source it; it defines functions and sets nothing else but
# CQRS_ROOT, PG_CONFIG and PG_MAJOR.

CQRS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The PostgreSQL major version to build and test against: the one PG_CONFIG
# names when it is set, otherwise the distribution's own (Debian 12 ships
# 15, Debian 13 ships 17; for others, the version the "postgresql"
# package depends on).
cqrs_distribution_pg() {
	local codename="" v
	codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
	case "$codename" in
	bookworm) echo 15; return ;;
	trixie) echo 17; return ;;
	esac
	v=$(apt-cache depends postgresql 2>/dev/null |
		sed -n -E 's/.*Depends: postgresql-([0-9]+)$/\1/p' | head -1)
	if [ -z "$v" ]; then
		# no package lists: the newest server installed
		v=$(ls -d /usr/lib/postgresql/[0-9]*/bin 2>/dev/null | sed -E 's|.*/([0-9]+)/bin|\1|' |
			sort -n | tail -1)
	fi
	echo "${v:-15}"
}

if [ -n "${PG_CONFIG:-}" ] && [ -x "$PG_CONFIG" ]; then
	PG_MAJOR=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
else
	PG_MAJOR=$(cqrs_distribution_pg)
	PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
fi
export PG_CONFIG PG_MAJOR

cqrs_log() { printf '==> %s\n' "$*" >&2; }

# Install what building and testing need, with apt, when running as root
# and something is missing.  Non-root users must have these already.  With
# PG_CONFIG pointing at a server installed otherwise (built from source, say),
# only the rest is installed.
cqrs_install_deps() {
	local pkgs="libhiredis-dev libcurl4-openssl-dev redis-server pkg-config make gcc libipc-run-perl pgbouncer
		prometheus prometheus-postgres-exporter"
	local missing="" p
	case "$PG_CONFIG" in
	/usr/lib/postgresql/*)
		pkgs="postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR $pkgs" ;;
	esac
	for p in $pkgs; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' ||
			missing="$missing $p"
	done
	[ -z "$missing" ] && return 0
	if [ "$(id -u)" -ne 0 ]; then
		cqrs_log "missing packages:$missing (install them as root)"
		return 1
	fi
	cqrs_log "installing:$missing"
	export DEBIAN_FRONTEND=noninteractive
	cqrs_apt_get update -qq
	# Package daemons (PostgreSQL's "main" cluster, Prometheus and its
	# exporter, which come for promtool and the exporter test) are not
	# started: the tests and the demo run servers of their own.
	local policy=""
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
		chmod +x /usr/sbin/policy-rc.d
		policy=1
	fi
	cqrs_apt_get install -y -qq --no-install-recommends $missing >/dev/null
	[ -n "$policy" ] && rm -f /usr/sbin/policy-rc.d
	return 0
}

# apt-get "$@", waiting for another package manager (unattended-upgrades,
# a second apt) to finish rather than failing on its lock: up to
# CQRS_APT_WAIT seconds (default 600).
cqrs_apt_get() {
	local err waited=0 limit=${CQRS_APT_WAIT:-600} status
	err=$(mktemp)
	while :; do
		status=0
		apt-get -o DPkg::Lock::Timeout=5 "$@" 2>"$err" || status=$?
		[ "$status" -eq 0 ] && break
		if ! grep -qE 'Could not get lock|Unable to (lock|acquire)' "$err" ||
			[ "$waited" -ge "$limit" ]; then
			cat "$err" >&2
			rm -f "$err"
			return "$status"
		fi
		[ "$waited" -eq 0 ] && cqrs_log "another package manager holds apt's lock: waiting for it (up to ${limit}s)"
		sleep 5
		waited=$((waited + 10))
	done
	rm -f "$err"
}

# Missing root rights: a user who cannot install packages or write
# PostgreSQL's install directories runs the calling script ($0, with "$@")
# again as root through sudo, when sudo is there, keeping the environment
# (the scripts' settings: PG_CONFIG, DURATION, ...).
cqrs_become_root() {
	[ "$(id -u)" -eq 0 ] && return 0
	if cqrs_install_deps >/dev/null 2>&1 && [ -w "$("$PG_CONFIG" --pkglibdir)" ]; then
		return 0
	fi
	if command -v sudo >/dev/null; then
		cqrs_log "this needs root: running it again with sudo"
		exec sudo --preserve-env bash "$0" "$@"
	fi
	return 0
}

# The passed and failed counts of one suite's output ($1), as "P F":
# pg_regress and isolation print "All N tests passed." or "F of N tests
# failed."; prove prints "Files=.., Tests=N" and, per failing script,
# "(Wstat: W ... Tests: N Failed: F)", where a script that died has
# Failed: 0 and a non-zero wait status: it counts as one failure.
cqrs_suite_counts() {
	sed -E 's/^[# ]+//' "$1" | awk '
		/^All [0-9]+ tests passed/ { p += $2 }
		/^[0-9]+ of [0-9]+ tests failed/ { f += $1; p += $3 - $1 }
		/^Files=[0-9]+, Tests=[0-9]+,/ {
			t = $2; sub(/^Tests=/, "", t); sub(/,$/, "", t); p += t }
		/\(Wstat: [0-9]+ .*Failed: [0-9]+\)$/ {
			match($0, /Wstat: [0-9]+/); w = substr($0, RSTART + 7, RLENGTH - 7)
			match($0, /Failed: [0-9]+/); n = substr($0, RSTART + 8, RLENGTH - 8)
			if (n > 0) { f += n; p -= n } else if (w != 0) f += 1 }
		END { print p + 0, f + 0 }'
}

# Build with warnings as errors and install into the server's directories.
cqrs_build_install() {
	cqrs_log "building and installing cqrs"
	make -C "$CQRS_ROOT" -s CQRS_CFLAGS=-Werror >/dev/null
	if [ "$(id -u)" -eq 0 ]; then
		make -C "$CQRS_ROOT" -s install >/dev/null
	else
		make -C "$CQRS_ROOT" -s install >/dev/null || {
			cqrs_log "make install failed: run as root, or with write access to $($PG_CONFIG --pkglibdir)"
			return 1
		}
	fi
}

# The OS user the servers run as: PostgreSQL refuses to run as root.
cqrs_pg_user() {
	if [ "$(id -u)" -eq 0 ]; then echo postgres; else id -un; fi
}

# Run a command as that user.
cqrs_as_pg() {
	if [ "$(id -u)" -eq 0 ]; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

# A copy of the source tree the server user can write test output into;
# prints its path.
cqrs_test_tree() {
	local dir
	dir=$(mktemp -d /tmp/cqrs-test.XXXXXX)
	(cd "$CQRS_ROOT" && tar --exclude=.git --exclude='*.o' --exclude='*.bc' \
		--exclude=tmp_check --exclude=tmp_check_iso --exclude=results -cf - .) |
		tar -C "$dir" -xf -
	chmod 755 "$dir"
	[ "$(id -u)" -eq 0 ] && chown -R postgres: "$dir"
	echo "$dir"
}

# Start a throwaway cluster in $1 listening on port $2 (unix socket in $1
# only), with cqrs preloaded; further arguments are extra postgresql.conf
# lines.  An existing cluster there is stopped and replaced.
cqrs_cluster_start() {
	local dir=$1 port=$2 bindir
	shift 2
	bindir=$("$PG_CONFIG" --bindir)
	cqrs_cluster_stop "$dir"
	rm -rf "$dir"
	mkdir -p "$dir"
	[ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
	cqrs_as_pg "$bindir/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
	{
		cat "$CQRS_ROOT/test/cqrs.conf"
		echo "port = $port"
		echo "unix_socket_directories = '$dir'"
		for line in "$@"; do echo "$line"; done
	} | cqrs_as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
	cqrs_as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
}

# Stop the cluster in $1, if one runs there.
cqrs_cluster_stop() {
	local dir=$1
	[ -f "$dir/data/postmaster.pid" ] || return 0
	cqrs_as_pg "$("$PG_CONFIG" --bindir)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
}

# Start a throwaway redis-server in $1 on 127.0.0.1:$2, without
# persistence, as the server user; stopped by cqrs_redis_stop.  Returns 1
# when redis-server is not installed.
cqrs_redis_start() {
	local dir=$1 port=$2
	command -v redis-server >/dev/null || return 1
	cqrs_redis_stop "$dir"
	mkdir -p "$dir"
	[ "$(id -u)" -eq 0 ] && chown "$(cqrs_pg_user)": "$dir"
	cqrs_as_pg redis-server --port "$port" --bind 127.0.0.1 --save '' \
		--appendonly no --daemonize yes --pidfile "$dir/redis.pid" \
		--dir "$dir" --logfile "$dir/redis.log" >/dev/null
	for _ in $(seq 50); do
		[ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && return 0
		sleep 0.1
	done
	cqrs_log "redis-server did not start: see $dir/redis.log"
	return 1
}

# Start a Redis Cluster of $3 primaries (default 3), without replicas, on
# 127.0.0.1 ports $2, $2+1, ..., one redis-server per subdirectory of $1,
# no persistence, as the server user; stopped by cqrs_redis_cluster_stop.
# Returns 1 when it could not.
cqrs_redis_cluster_start() {
	local dir=$1 port=$2 n=${3:-3} i nodes=()
	command -v redis-server >/dev/null || return 1
	cqrs_redis_cluster_stop "$dir"
	for i in $(seq 0 $((n - 1))); do
		mkdir -p "$dir/$i"
		[ "$(id -u)" -eq 0 ] && chown "$(cqrs_pg_user)": "$dir" "$dir/$i"
		cqrs_as_pg redis-server --port $((port + i)) --bind 127.0.0.1 --save '' \
			--appendonly no --daemonize yes --pidfile "$dir/$i/redis.pid" \
			--dir "$dir/$i" --logfile "$dir/$i/redis.log" \
			--cluster-enabled yes --cluster-config-file "$dir/$i/nodes.conf" \
			--cluster-node-timeout 1000 >/dev/null || return 1
		nodes+=("127.0.0.1:$((port + i))")
	done
	for _ in $(seq 50); do
		[ "$(redis-cli -p $((port + n - 1)) ping 2>/dev/null)" = PONG ] && break
		sleep 0.1
	done
	redis-cli --cluster create "${nodes[@]}" --cluster-yes >"$dir/create.log" 2>&1 || {
		cqrs_log "redis-cli --cluster create failed: see $dir/create.log"
		return 1
	}
	for _ in $(seq 100); do
		local ok=0
		for i in $(seq 0 $((n - 1))); do
			redis-cli -p $((port + i)) cluster info 2>/dev/null | grep -q 'cluster_state:ok' && ok=$((ok + 1))
		done
		[ "$ok" -eq "$n" ] && return 0
		sleep 0.1
	done
	cqrs_log "the Redis Cluster on ports $port.. did not become ready"
	return 1
}

# Stop the redis-servers cqrs_redis_cluster_start started in $1.
cqrs_redis_cluster_stop() {
	local d
	for d in "$1"/*/; do
		[ -f "$d/redis.pid" ] && cqrs_stop_pidfile "$d/redis.pid"
	done
	return 0
}

# Start Debian's pgbouncer from directory $1 (made anew), listening on
# 127.0.0.1:$2 in transaction pooling mode, in front of database postgres
# of the cluster whose socket is in $3, port $4, with $5 server
# connections; clients connect as postgres without a password.
cqrs_pgbouncer_start() {
	local d=$1 port=$2 host=$3 pgport=$4 pool=$5 bin
	bin=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
	cqrs_pgbouncer_stop "$d"
	rm -rf "$d"
	mkdir -p "$d"
	cat > "$d/pgbouncer.ini" <<-INI
	[databases]
	postgres = host=$host port=$pgport dbname=postgres user=postgres

	[pgbouncer]
	listen_addr = 127.0.0.1
	listen_port = $port
	unix_socket_dir =
	auth_type = trust
	auth_file = $d/users.txt
	pool_mode = transaction
	default_pool_size = $pool
	max_client_conn = 200
	logfile = $d/pgbouncer.log
	pidfile = $d/pgbouncer.pid
	INI
	echo '"postgres" ""' > "$d/users.txt"
	[ "$(id -u)" -eq 0 ] && chown -R "$(cqrs_pg_user)": "$d"
	cqrs_as_pg "$bin" -d -q "$d/pgbouncer.ini"
	for _ in $(seq 50); do
		cqrs_as_pg "$("$PG_CONFIG" --bindir)/psql" -X -q -At -h 127.0.0.1 -p "$port" \
			-U postgres -d postgres -c 'SELECT 1' >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	cqrs_log "pgbouncer did not start: see $d/pgbouncer.log"
	return 1
}

# Stop the process whose pid file is $1, if it runs: SIGTERM, then up to
# 5 s for it to exit; the pid file goes.
cqrs_stop_pidfile() {
	local pidfile=$1 pid
	[ -f "$pidfile" ] || return 0
	pid=$(cat "$pidfile")
	kill "$pid" 2>/dev/null || true
	for _ in $(seq 50); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	rm -f "$pidfile"
}

# Stop the pgbouncer cqrs_pgbouncer_start started in $1, if it runs.
cqrs_pgbouncer_stop() { cqrs_stop_pidfile "$1/pgbouncer.pid"; }

# Stop the redis-server cqrs_redis_start started in $1, if it runs.
cqrs_redis_stop() { cqrs_stop_pidfile "$1/redis.pid"; }
