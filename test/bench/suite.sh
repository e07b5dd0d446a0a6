#!/usr/bin/env bash
# test/bench/suite.sh (make bench): cqrs side by side with what users would
# build instead, measured in one run on a throwaway cluster and Redis:
#
#   append      pgbench, 4 clients, ROUNDS rounds of the variants in turn,
#               DURATION s each, per synchronous_commit setting (medians),
#               the projector and its Redis write-through running:
#               plain INSERT of the command log's row shape and unique keys;
#               cqrs.submit_order(); an AFTER INSERT trigger that upserts a
#               read table in the same transaction; the naive dual write
#               (append and upsert in one transaction);
#   projection  cqrs-load writing flat out (synchronous_commit = off) for
#               DURATION s: commit-to-read-model lag p50/p99 (its probe),
#               then the catch-up time;
#   reads       cqrs-load, 4 readers, no writers, DURATION s each: primary-key
#               SELECT from the read model, Redis GET, cache-aside;
#   production  cqrs-load at 5000 writes/s (synchronous_commit = off) and
#               10000 cache-aside reads/s for PROD_SECONDS s (lag p99 < 500
#               ms, read p95 < 1 ms), plotted with gnuplot into $PNG;
#               then the same through PgBouncer (transaction pooling,
#               BOUNCER_POOL server connections, default 4; cqrs-load
#               --pooled: no prepared statements, no session settings);
#   rebuild     test/bench/rebuild.sh (its own cluster) with ORDERS orders.
#
# Then one table of the figures and their ratios.  Starts and stops its own
# servers.
#
#   make bench
#   DURATION=10 ROUNDS=3 PROD_SECONDS=60 ORDERS=200000 bash test/bench/suite.sh
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
cqrs_become_root "$@"
. "$(dirname "$0")/common.sh"

ROUNDS=${ROUNDS:-3}
PROD_SECONDS=${PROD_SECONDS:-60}
ORDERS=${ORDERS:-200000}
PNG=${PNG:-$CQRS_ROOT/docs/load.png}
LOAD=$CQRS_ROOT/tools/cqrs-load
OUT=$BENCH_WORK/out
mkdir -p "$OUT"
chmod 777 "$OUT"

cqrs_install_deps
command -v gnuplot >/dev/null || {
	[ "$(id -u)" -eq 0 ] && DEBIAN_FRONTEND=noninteractive cqrs_apt_get install -y -qq --no-install-recommends gnuplot-nox >/dev/null
}
make -C "$CQRS_ROOT" -s tools/cqrs-load
bench_start
bench_redis_start

psql_bench <<SQL >/dev/null
ALTER SYSTEM SET cqrs.redis_url = '$BENCH_REDIS_URL';
SELECT pg_reload_conf();
CREATE EXTENSION cqrs;
CREATE SCHEMA bench;
CREATE TABLE bench.plain (LIKE cqrs.command_log INCLUDING ALL);
-- what users would build instead: a log and a read table kept in step
-- by a trigger, or by the application writing both
CREATE TABLE bench.dual_log (LIKE cqrs.command_log INCLUDING ALL);
CREATE TABLE bench.dual_model (LIKE cqrs.read_model INCLUDING ALL);
$(bench_trigger_sql)
SQL
wait_for "SELECT state = 'running' AND redis = 'connected' FROM cqrs.status"

bench_scripts
{
	echo '\set r random(1, 4000000000000000000)'
	bench_log_insert bench.trig_log
} | bench_script trigger
{
	echo '\set r random(1, 4000000000000000000)'
	echo 'BEGIN;'
	bench_log_insert bench.dual_log
	cat <<'SQL'
INSERT INTO bench.dual_model (order_id, user_id, total_amount, status, version, updated_at)
VALUES ('o' || :r, 'u' || :client_id, 10.50, 'created', 1, now())
ON CONFLICT (order_id) DO UPDATE
   SET status = excluded.status, version = excluded.version, updated_at = excluded.updated_at
 WHERE bench.dual_model.version < excluded.version;
COMMIT;
SQL
} | bench_script dual

# cqrs-load as the server user, with the bench cluster and Redis; with
# pooled first, through PgBouncer.
load() {
	local db="host=$BENCH_DIR port=$BENCH_PORT dbname=postgres user=postgres"
	if [ "$1" = pooled ]; then
		shift
		db="host=127.0.0.1 port=$BENCH_BOUNCER_PORT dbname=postgres user=postgres"
		set -- --pooled "$@"
	fi
	cqrs_as_pg "$LOAD" -d "$db" -r "$BENCH_REDIS_URL" -q "$@" >/dev/null
}
json() { grep -o "\"$2\": [-0-9.e+]*" "$1" | awk '{ print $2 }'; }

cqrs_log "append: $ROUNDS rounds of the 4 variants in turn, ${DURATION}s each, synchronous_commit on and off"
declare -A rate runs
for sc in on off; do
	for _ in $(seq "$ROUNDS"); do
		for v in plain submit trigger dual; do
			psql_bench -c CHECKPOINT
			runs[$v.$sc]="${runs[$v.$sc]:-} $(bench_run "$v" "$sc")"
			catch_up >/dev/null
		done
	done
	for v in plain submit trigger dual; do
		rate[$v.$sc]=$(printf '%s\n' ${runs[$v.$sc]} | median)
		echo "  $v sync=$sc:${runs[$v.$sc]}" >&2
	done
done

cqrs_log "projection: cqrs-load writing flat out for ${DURATION}s"
load -w 4 -s off -c 0 -T "$DURATION" --json "$OUT/projection.json"
caught=$(catch_up)

cqrs_log "reads: SELECT by key, Redis GET, cache-aside, ${DURATION}s each"
for m in db redis cache-aside; do
	load -w 0 -c 4 -p 2000 -m "$m" -T "$DURATION" --json "$OUT/read-$m.json"
done

cqrs_log "production check: 5000 writes/s and 10000 reads/s for ${PROD_SECONDS}s"
load -w 4 -s off -W 5000 -c 4 -R 10000 -T "$PROD_SECONDS" --json "$OUT/prod.json" --series "$OUT/prod.csv"
catch_up >/dev/null
cqrs_log "production check through PgBouncer (transaction pooling, $BENCH_BOUNCER_POOL server connections)"
bench_pgbouncer_start
load pooled -w 4 -s off -W 5000 -c 4 -R 10000 -T "$PROD_SECONDS" --json "$OUT/prod-pooled.json"
bench_pgbouncer_stop
if command -v gnuplot >/dev/null; then
	mkdir -p "$(dirname "$PNG")"
	gnuplot <<EOF
set terminal pngcairo size 1000,520 font ",10" noenhanced
set output "$PNG"
set datafile separator ","
set title "cqrs-load: 5000 writes/s + 10000 reads/s on $(nproc) cores (cache-aside reads through Redis)"
set xlabel "second"
set ylabel "read latency (ms)"
set y2label "commit-to-read-model lag (ms)"
set ytics nomirror
set y2tics
set key top left
set grid
plot "$OUT/prod.csv" every ::1 using 1:5 with lines lw 2 title "read p95 (ms)", \
     "$OUT/prod.csv" every ::1 using 1:4 with lines lw 1 title "read p50 (ms)", \
     "$OUT/prod.csv" every ::1 using 1:7 axes x1y2 with lines lw 2 title "lag, slowest probe of the second (ms, right axis)"
EOF
fi
cqrs_cluster_stop "$BENCH_DIR"
cqrs_redis_stop "$BENCH_REDIS_DIR"

cqrs_log "rebuild: test/bench/rebuild.sh with $ORDERS orders"
rebuild_line=$(ORDERS=$ORDERS bash "$CQRS_ROOT/test/bench/rebuild.sh" 2>/dev/null | grep '^rebuild / SQL fold')

r() { ratio "$1" "$2"; }
echo
echo "cqrs benchmark suite: $(nproc) cores, $(free -g | awk '/^Mem/ { print $2 }') GiB, $("$BINDIR/postgres" --version), $(redis-server --version | awk '{ print $1, $2, $3 }')"
echo
printf '%-52s %10s %10s\n' "append (rows/s, median of $ROUNDS x ${DURATION}s, $CLIENTS clients)" "sync on" "sync off"
printf '%-52s %10s %10s\n' "  plain INSERT (the log's row shape and keys)" "${rate[plain.on]}" "${rate[plain.off]}"
printf '%-52s %10s %10s\n' "  cqrs.submit_order() (projector, Redis running)" "${rate[submit.on]}" "${rate[submit.off]}"
printf '%-52s %10s %10s\n' "  AFTER INSERT trigger upserting a read table" "${rate[trigger.on]}" "${rate[trigger.off]}"
printf '%-52s %10s %10s\n' "  dual write: append + upsert in one transaction" "${rate[dual.on]}" "${rate[dual.off]}"
a=$(r "${rate[submit.on]}" "${rate[plain.on]}"); b=$(r "${rate[submit.off]}" "${rate[plain.off]}")
printf '  cqrs / plain       on %s (>= 0.85 %s)   off %s (>= 0.75 %s)\n' "$a" "$(verdict "$a" 0.85)" "$b" "$(verdict "$b" 0.75)"
a=$(r "${rate[submit.on]}" "${rate[trigger.on]}"); b=$(r "${rate[submit.off]}" "${rate[trigger.off]}")
printf '  cqrs / trigger     on %s                off %s (>= 1.2 %s)\n' "$a" "$b" "$(verdict "$b" 1.2)"
a=$(r "${rate[submit.on]}" "${rate[dual.on]}"); b=$(r "${rate[submit.off]}" "${rate[dual.off]}")
printf '  cqrs / dual write  on %s                off %s (>= 1.5 %s)\n' "$a" "$b" "$(verdict "$b" 1.5)"
echo
p=$OUT/projection.json
printf 'projection (cqrs-load, 4 writers flat out, synchronous_commit off, %ss): %s writes/s; lag p50 %s ms, p99 %s ms, max %s ms; catch-up %ss\n' \
	"$DURATION" "$(json "$p" writes_per_s)" "$(json "$p" lag_p50_ms)" "$(json "$p" lag_p99_ms)" "$(json "$p" lag_max_ms)" "$caught"
echo
printf '%-40s %9s %9s %9s %10s\n' "reads (ms, 4 threads, ${DURATION}s)" p50 p95 p99 "reads/s"
for m in db redis cache-aside; do
	f=$OUT/read-$m.json
	case $m in db) n="primary-key SELECT on cqrs.read_model" ;; redis) n="Redis GET" ;; *) n="cache-aside (cqrs-load)" ;; esac
	printf '  %-38s %9s %9s %9s %10s\n' "$n" "$(json "$f" read_p50_ms)" "$(json "$f" read_p95_ms)" "$(json "$f" read_p99_ms)" "$(json "$f" reads_per_s)"
done
a=$(r "$(json "$OUT/read-cache-aside.json" read_p95_ms)" "$(json "$OUT/read-redis.json" read_p95_ms)")
printf '  cache-aside p95 / Redis GET p95: %s (<= 1.5 %s)\n' "$a" "$(verdict "$a" 1.5 '<=')"
echo
printf 'production check (5000 writes/s, synchronous_commit off, + 10000 reads/s, %ss)\n' "$PROD_SECONDS"
for p in "$OUT/prod.json" "$OUT/prod-pooled.json"; do
	case $p in
	*pooled*) echo "  through PgBouncer (transaction pooling, $BENCH_BOUNCER_POOL server connections, cqrs-load --pooled):" ;;
	*) echo "  directly (9 connections, prepared statements):" ;;
	esac
	printf '    %s writes/s, %s reads/s, hit ratio %s\n' \
		"$(json "$p" writes_per_s)" "$(json "$p" reads_per_s)" "$(json "$p" cache_hit_ratio)"
	printf '    lag p99 %s ms (< 500 %s), read p95 %s ms (< 1 %s); errors: %s\n' \
		"$(json "$p" lag_p99_ms)" "$(verdict "$(json "$p" lag_p99_ms)" 500 '<=')" \
		"$(json "$p" read_p95_ms)" "$(verdict "$(json "$p" read_p95_ms)" 1 '<=')" \
		"$(grep -o '"errors": {[^}]*}' "$p" | sed 's/"errors": //')"
done
[ -f "$PNG" ] && echo "  plotted (directly): ${PNG#$CQRS_ROOT/}"
echo
echo "rebuild ($ORDERS orders): $rebuild_line"
