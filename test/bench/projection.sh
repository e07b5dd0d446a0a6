#!/usr/bin/env bash
# test/bench/projection.sh: the projector under a sustained full-speed
# submit load, measured in one run on one server with the projector running:
#
#   - plain INSERT rate of the command log's row shape (the baseline),
#   - cqrs.submit_order() rate,
#   - commit-to-read-model lag p50/p99 under that load, from the
#     projector's own histogram (cqrs.lag_histogram(): bucket bounds, so
#     "<= x ms"),
#   - catch-up: time from the end of the load until every command
#     committed is in the read model,
#   - lag p50/p99 at light load (one client, RATE commands/s).
#
# with synchronous_commit off and on; ROUNDS alternating rounds of the
# plain and submit loads (both tables keep their rows from round to round,
# as the log and the read model do), medians of the rates, the worst
# catch-up, lag
# over all submit rounds.  Starts and stops its own cluster.
#
#   bash test/bench/projection.sh
#   DURATION=10 CLIENTS=4 RATE=100 bash test/bench/projection.sh
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
cqrs_become_root "$@"
. "$(dirname "$0")/common.sh"

ROUNDS=${ROUNDS:-5}
RATE=${RATE:-100}
MODES=${MODES:-off on}

bench_start
bench_scripts
psql_bench <<'SQL'
CREATE EXTENSION cqrs;
CREATE SCHEMA bench;
CREATE TABLE bench.plain (LIKE cqrs.command_log INCLUDING ALL);
CREATE TABLE bench.h0 AS SELECT * FROM cqrs.lag_histogram();
SQL

wait_for "SELECT state = 'running' FROM cqrs.status"

hist_mark() {
	psql_bench -c 'TRUNCATE bench.h0; INSERT INTO bench.h0 SELECT * FROM cqrs.lag_histogram()'
}

# p50 and p99 (bucket upper bounds, ms) of the commands projected since
# hist_mark.
hist_percentiles() {
	psql_bench -F ' ' <<'SQL'
WITH d AS (
	SELECT h.le_ms, h.commands - coalesce(h0.commands, 0) AS n
	  FROM cqrs.lag_histogram() h LEFT JOIN bench.h0 h0 USING (le_ms)
), c AS (
	SELECT le_ms, sum(n) OVER (ORDER BY le_ms) AS cum, sum(n) OVER () AS total FROM d
)
SELECT min(le_ms) FILTER (WHERE cum >= 0.5 * total),
       min(le_ms) FILTER (WHERE cum >= 0.99 * total)
  FROM c;
SQL
}

echo "cqrs projection benchmark: $CLIENTS clients, $ROUNDS rounds of ${DURATION}s full-speed loads per side, light load $RATE/s, $(nproc) cores"
printf '%-8s %9s %9s %6s %13s %13s %9s %13s %13s\n' sync_commit "INSERT/s" "submit/s" ratio \
	"lag p50 full" "lag p99 full" "catch-up" "lag p50 light" "lag p99 light"
for sc in $MODES; do
	plain=()
	submit=()
	caught=0
	hist_mark
	for _ in $(seq "$ROUNDS"); do
		psql_bench -c CHECKPOINT
		plain+=("$(bench_run plain "$sc")")
		catch_up >/dev/null
		submit+=("$(bench_run submit "$sc")")
		c=$(catch_up)
		caught=$(awk -v a="$caught" -v b="$c" 'BEGIN { print (b > a) ? b : a }')
	done
	# the plain runs add no projected commands: the histogram holds the
	# submit rounds only
	read -r full50 full99 <<<"$(hist_percentiles)"
	echo "  rounds: plain ${plain[*]} / submit ${submit[*]}" >&2
	plain=$(printf '%s\n' "${plain[@]}" | median)
	submit=$(printf '%s\n' "${submit[@]}" | median)

	hist_mark
	light=$(CLIENTS=1 DURATION=5 bench_run submit "$sc" -R "$RATE")
	catch_up >/dev/null
	read -r light50 light99 <<<"$(hist_percentiles)"

	r=$(ratio "$submit" "$plain")
	printf '%-8s %9s %9s %6s %13s %13s %8ss %13s %13s\n' "$sc" "$plain" "$submit" "$r" \
		"<= ${full50} ms" "<= ${full99} ms" "$caught" "<= ${light50} ms" "<= ${light99} ms"
	printf '  targets: ratio >= 0.75 %s; lag p99 full <= 100 ms %s; catch-up <= 1 s %s; lag p50 light <= 5 ms %s\n' \
		"$(verdict "$r" 0.75 '>=')" "$(verdict "$full99" 100 '<=')" \
		"$(verdict "$caught" 1 '<=')" "$(verdict "$light50" 5 '<=')"
done
psql_bench -c "SELECT 'consistent: ' || (count(*) = 0) FROM cqrs.verify()"
