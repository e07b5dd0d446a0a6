#!/usr/bin/env bash
# test/bench/bulk.sh: one transaction of COMMANDS cqrs.submit_order() calls
# on a cluster with the default max_locks_per_transaction, against a plain
# INSERT of as many rows of the same shape in one transaction, measured in
# one run.  Prints the commit time of both and their ratio, how long the
# projector then took to apply the transaction, and the projector's
# private memory (RssAnon) before, at its peak (sampled every 0.2 s) and
# after.
# Starts and stops its own cluster.
#
#   bash test/bench/bulk.sh
#   COMMANDS=100000 bash test/bench/bulk.sh
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
cqrs_become_root "$@"
. "$(dirname "$0")/common.sh"

COMMANDS=${COMMANDS:-1000000}

bench_start
psql_bench -c "CREATE EXTENSION cqrs" >/dev/null
for _ in $(seq 100); do
	[ "$(psql_bench -c "SELECT state FROM cqrs.status")" = running ] && break
	sleep 0.1
done
psql_bench -c "CREATE TABLE plain_log (LIKE cqrs.command_log INCLUDING ALL)" >/dev/null

# milliseconds of one psql command
ms() {
	local t0 t1
	t0=$(date +%s%N)
	psql_bench -c "$1" >/dev/null
	t1=$(date +%s%N)
	echo $(((t1 - t0) / 1000000))
}

pid=$(psql_bench -c "SELECT leader_pid FROM cqrs.status")
# private memory: shared buffers the projector touches count in VmRSS too
rss() { awk '/^RssAnon/ { print int($2 / 1024) }' "/proc/$pid/status"; }
before=$(rss)
(while kill -0 "$pid" 2>/dev/null; do rss; sleep 0.2; done) > "$BENCH_WORK/rss" &
sampler=$!

plain=$(ms "INSERT INTO plain_log (command_id, command_type, aggregate_id, sequence_id, payload)
	SELECT cqrs.uuidv7(), 'CREATE_ORDER', 'p-' || i, 1,
	       jsonb_build_object('order_id', 'p-' || i, 'user_id', 'u', 'amount', 1)
	  FROM generate_series(1, $COMMANDS) i")
cqrs=$(ms "SELECT count(*) FROM (SELECT cqrs.submit_order('b-' || i, 'u', 1)
	FROM generate_series(1, $COMMANDS) i) s")
apply=$(ms "SELECT cqrs.wait_for_lsn(pg_current_wal_insert_lsn(), '1 hour')")
sleep 2
after=$(rss)
kill "$sampler" 2>/dev/null || true
peak=$(sort -n "$BENCH_WORK/rss" | tail -1)
rows=$(psql_bench -c "SELECT count(*) FROM cqrs.read_model WHERE order_id LIKE 'b-%'")

printf '%-58s %10s\n' "one transaction of $COMMANDS commands" "ms"
printf '%-58s %10d\n' "plain INSERT ... SELECT" "$plain"
printf '%-58s %10d   (%.1f x plain)\n' "cqrs.submit_order() calls" "$cqrs" \
	"$(echo "$cqrs / $plain" | bc -l)"
printf '%-58s %10d\n' "projector: commit to applied" "$apply"
printf '%-58s %10s\n' "projector private memory (RssAnon) before / peak / after, MB" "$before / $peak / $after"
echo "read model rows: $rows"
[ "$rows" = "$COMMANDS" ]
