#!/usr/bin/env bash
# test/load-smoke.sh: build cqrs-load and run it for a few seconds against
# a throwaway cluster and Redis (database only when Redis is missing),
# checking that it wrote, read, measured the lag and reported no error,
# that its readers go on from the database when Redis goes away, and
# that it refuses bad arguments and unreachable servers.  Part of CI; the
# full benchmark (make bench) is not.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cqrs_become_root "$@"

DIR=${CQRS_SMOKE_DIR:-/tmp/cqrs-smoke}
PORT=${CQRS_SMOKE_PORT:-54340}
REDIS_PORT=${CQRS_SMOKE_REDIS_PORT:-54341}
BOUNCER_PORT=${CQRS_SMOKE_BOUNCER_PORT:-54342}
LOAD=$CQRS_ROOT/tools/cqrs-load
WORK=$(mktemp -d /tmp/cqrs-smoke-out.XXXXXX)
chmod 777 "$WORK"
fails=0

check() {
	if eval "$2"; then echo "ok - $1"; else echo "not ok - $1"; fails=$((fails + 1)); fi
}

cqrs_install_deps
cqrs_build_install
make -C "$CQRS_ROOT" -s CQRS_CFLAGS=-Werror tools/cqrs-load
cqrs_cluster_start "$DIR" "$PORT"
redis=()
if cqrs_redis_start "$DIR-redis" "$REDIS_PORT" && ldd "$LOAD" | grep -q hiredis; then
	redis=(-r "redis://127.0.0.1:$REDIS_PORT")
	echo "cqrs.redis_url = 'redis://127.0.0.1:$REDIS_PORT'" | cqrs_as_pg tee -a "$DIR/data/postgresql.conf" >/dev/null
fi
trap 'cqrs_cluster_stop "$DIR"; cqrs_redis_stop "$DIR-redis"; cqrs_pgbouncer_stop "$DIR-pgbouncer"; rm -rf "$WORK"' EXIT
cqrs_as_pg "$("$PG_CONFIG" --bindir)/pg_ctl" -D "$DIR/data" reload >/dev/null
conninfo="host=$DIR port=$PORT dbname=postgres user=postgres"
cqrs_as_pg "$("$PG_CONFIG" --bindir)/psql" -X -q -d "$conninfo" -c 'CREATE EXTENSION cqrs'

out=$(cqrs_as_pg "$LOAD" -d "$conninfo" "${redis[@]}" -T 3 -W 200 -R 500 --json "$WORK/s.json" --series "$WORK/s.csv")
echo "$out"
json() { grep -o "\"$1\": [-0-9.e+]*" "$WORK/${2:-s}.json" | awk '{ print $2 }'; }
check "a progress line every second" '[ "$(echo "$out" | grep -c "writes/s")" -ge 3 ]'
check "writes at about the rate asked (200/s)" '[ "$(json writes)" -ge 300 ] && [ "$(json writes)" -le 700 ]'
check "reads" '[ "$(json reads)" -ge 500 ]'
check "lag measured by the probe" '[ "$(json lag_probes)" -ge 5 ]'
check "no errors" 'grep -q "\"errors\": {}" "$WORK/s.json"'
check "one CSV line per second" '[ "$(wc -l < "$WORK/s.csv")" -ge 4 ]'
check "the read model has what was written" \
	'[ "$(cqrs_as_pg "$("$PG_CONFIG" --bindir)/psql" -X -At -d "$conninfo" -c "SELECT count(*) = 0 FROM cqrs.verify()")" = t ]'
if [ ${#redis[@]} -gt 0 ]; then
	check "cache-aside reads hit Redis" 'awk -v r="$(json cache_hit_ratio)" "BEGIN { exit !(r > 0.5) }"'
fi
# Through PgBouncer in transaction pooling mode: --pooled prepares nothing
# and sets synchronous_commit per transaction, so it works on one server
# connection shared by every thread; without it, the second thread to
# prepare its statements there finds them prepared already.
cqrs_pgbouncer_start "$DIR-pgbouncer" "$BOUNCER_PORT" "$DIR" "$PORT" 1
pooled="host=127.0.0.1 port=$BOUNCER_PORT dbname=postgres user=postgres"
cqrs_as_pg "$LOAD" -d "$pooled" --pooled "${redis[@]}" -T 3 -W 200 -R 500 -s off -q --json "$WORK/pooled.json" >/dev/null
check "through PgBouncer with --pooled: writes" '[ "$(json writes pooled)" -ge 300 ]'
check "through PgBouncer with --pooled: reads and lag probes" \
	'[ "$(json reads pooled)" -ge 500 ] && [ "$(json lag_probes pooled)" -ge 5 ]'
check "through PgBouncer with --pooled: no errors" 'grep -q "\"errors\": {}" "$WORK/pooled.json"'
cqrs_as_pg "$LOAD" -d "$pooled" -w 2 -c 0 --no-probe -T 1 -q --json "$WORK/unpooled.json" >/dev/null 2>&1 || true
check "through PgBouncer without --pooled: prepared statements collide" \
	'grep -q "\"errors\": {[^}]*[1-9]" "$WORK/unpooled.json"'
cqrs_pgbouncer_stop "$DIR-pgbouncer"
check "the read model has what went through PgBouncer" \
	'[ "$(cqrs_as_pg "$("$PG_CONFIG" --bindir)/psql" -X -At -d "$conninfo" -c "SELECT count(*) = 0 FROM cqrs.verify()")" = t ]'

if [ ${#redis[@]} -gt 0 ]; then
	# Redis gone in the middle of a run: the readers go on from the database
	(sleep 1.5; cqrs_redis_stop "$DIR-redis") &
	cqrs_as_pg "$LOAD" -d "$conninfo" "${redis[@]}" -T 4 -W 100 -R 300 -q --json "$WORK/down.json" --series "$WORK/down.csv" >/dev/null
	wait
	check "Redis down: reads go on from the database" \
		'[ "$(awk -F, "NR == 5 { print \$3 }" "$WORK/down.csv")" -ge 200 ]'
	check "Redis down: counted as redis errors" 'grep -q "\"redis\": [1-9]" "$WORK/down.json"'
fi
check "bad arguments: exit 2" '( "$LOAD" --writers=-1 2>/dev/null; [ $? -eq 2 ] )'
check "unreachable database: exit 1 with a message" \
	'msg=$("$LOAD" -d "host=$DIR port=1" -T 1 2>&1); [ $? -eq 1 ] && [[ $msg == *"could not connect to the database"* ]]'
[ ${#redis[@]} -gt 0 ] && check "unreachable Redis: a message" \
	'( cqrs_as_pg "$LOAD" -d "$conninfo" -r redis://127.0.0.1:1 -T 1 2>&1 || true ) | grep -q "could not connect to Redis"'
echo "cqrs-load smoke: $fails failed"
[ "$fails" -eq 0 ]
