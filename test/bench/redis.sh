#!/usr/bin/env bash
# test/bench/redis.sh: write throughput with Redis write-through on
# against off, measured in one run on one server with the projector
# running: ROUNDS alternating rounds of a DURATION s full-speed
# cqrs.submit_order() load from CLIENTS clients, with cqrs.redis_url empty
# (off) and pointing at a redis-server on 127.0.0.1 (on), switched with a
# reload between rounds; medians of the submit rates, the worst catch-up
# after a round, and what the projector wrote to Redis.  Starts and stops
# its own cluster and Redis.
#
#   bash test/bench/redis.sh
#   DURATION=10 ROUNDS=7 CLIENTS=4 SYNC=off bash test/bench/redis.sh
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
cqrs_become_root "$@"
. "$(dirname "$0")/common.sh"

ROUNDS=${ROUNDS:-7}
SYNC=${SYNC:-off}

bench_start
bench_redis_start
bench_scripts
psql_bench -c 'CREATE EXTENSION cqrs' >/dev/null
wait_for "SELECT state = 'running' FROM cqrs.status"

redis_url() {
	psql_bench -c "ALTER SYSTEM SET cqrs.redis_url = '$1'" -c 'SELECT pg_reload_conf()' >/dev/null
	wait_for "SELECT redis = '$2' FROM cqrs.status"
}

echo "cqrs Redis write-through benchmark: $CLIENTS clients, $ROUNDS rounds of ${DURATION}s per side, synchronous_commit = $SYNC, $(nproc) cores"
off=()
on=()
caught=0
for _ in $(seq "$ROUNDS"); do
	psql_bench -c CHECKPOINT
	redis_url '' disabled
	off+=("$(bench_run submit "$SYNC")")
	c=$(catch_up)
	caught=$(awk -v a="$caught" -v b="$c" 'BEGIN { print (b > a) ? b : a }')
	redis_url "$BENCH_REDIS_URL" connected
	on+=("$(bench_run submit "$SYNC")")
	c=$(catch_up)
	caught=$(awk -v a="$caught" -v b="$c" 'BEGIN { print (b > a) ? b : a }')
done
wait_for "SELECT NOT EXISTS (SELECT FROM cqrs.redis_backlog)"
echo "  rounds: off ${off[*]} / on ${on[*]}" >&2
off=$(printf '%s\n' "${off[@]}" | median)
on=$(printf '%s\n' "${on[@]}" | median)
r=$(ratio "$on" "$off")
printf '%-24s %10s\n' "" "submit/s"
printf '%-24s %10s\n' "Redis off" "$off"
printf '%-24s %10s\n' "Redis on (write-through)" "$on"
printf 'on / off: %s (target >= 0.9: %s); worst catch-up after a round: %ss\n' \
	"$r" "$(verdict "$r" 0.9 '>=')" "$caught"
psql_bench -F ' ' -c "SELECT 'keys written: ' || max(value) FILTER (WHERE name = 'cqrs_redis_writes_total')::bigint
	|| ', Redis errors: ' || max(value) FILTER (WHERE name = 'cqrs_redis_errors_total')::bigint
	FROM cqrs.metrics()"
echo "keys in Redis: $(redis-cli -p "$BENCH_REDIS_PORT" dbsize)"
psql_bench -c "SELECT 'consistent: ' || (count(*) = 0) FROM cqrs.verify()"
