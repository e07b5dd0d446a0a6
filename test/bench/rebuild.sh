#!/usr/bin/env bash
# test/bench/rebuild.sh: cqrs.rebuild() against a set-based SQL fold of the
# same command log, measured in one run.
#
# The log gets ORDERS orders written straight into cqrs.command_log: every
# order created, half of them shipped, a quarter cancelled, and half of the
# shipped ones cancelled afterwards (an invalid transition, so a dead
# letter): 2 commands per order.  Once the projector has caught up,
# ROUNDS times each:
#   - cqrs.rebuild(): delete the read model's rows and replay the whole log
#     through the projector's fold, in one transaction;
#   - the baseline: the same in plain SQL, on a copy of the read model
#     (LIKE ... INCLUDING ALL, same rows): DELETE every row, then INSERT
#     the fold computed with window functions and aggregates (the query
#     cqrs.verify() uses), in one transaction;
#   - the fastest fold a user would write by hand, on a second copy: DELETE
#     every row, then INSERT one row per order with DISTINCT ON, its status
#     from its latest command and its user and amount from its first.  It
#     checks no transition (a ship after a cancel wins), so it is a lower
#     bound, not an equivalent: its rows differ for dead-lettered commands.
# Prints the median times, commands per second and the ratios of the
# rebuild to each fold.  Starts and stops its own cluster.
#
#   bash test/bench/rebuild.sh
#   ORDERS=200000 ROUNDS=5 bash test/bench/rebuild.sh
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
cqrs_become_root "$@"
. "$(dirname "$0")/common.sh"

ORDERS=${ORDERS:-400000}
ROUNDS=${ROUNDS:-3}

bench_start
psql_bench -c "CREATE EXTENSION cqrs" >/dev/null

bench_fill_log "$ORDERS"
commands=$(psql_bench -c "SELECT count(*) FROM cqrs.command_log")
bench_wait_projected

psql_bench <<'SQL' >/dev/null
CREATE SCHEMA bench;
CREATE TABLE bench.model (LIKE cqrs.read_model INCLUDING ALL);
INSERT INTO bench.model SELECT * FROM cqrs.read_model;
CREATE FUNCTION bench.fold() RETURNS bigint LANGUAGE sql AS $$
	DELETE FROM bench.model;
	INSERT INTO bench.model (order_id, user_id, total_amount, status, version, updated_at)
	SELECT f.aggregate_id, f.user_id, CAST(f.amount AS numeric),
	       CASE f.first_transition WHEN 'SHIP_ORDER' THEN 'shipped'
	            WHEN 'CANCEL_ORDER' THEN 'cancelled' ELSE 'created' END,
	       f.version, now()
	  FROM (
		SELECT n.aggregate_id,
		       bool_or(n.sequence_id = 1 AND n.command_type = 'CREATE_ORDER'
		               AND jsonb_typeof(n.payload -> 'user_id') = 'string'
		               AND jsonb_typeof(n.payload -> 'amount') = 'number') AS created,
		       max(n.payload ->> 'user_id') FILTER (WHERE n.sequence_id = 1) AS user_id,
		       max(n.payload ->> 'amount') FILTER (WHERE n.sequence_id = 1) AS amount,
		       (array_agg(n.command_type ORDER BY n.sequence_id)
		           FILTER (WHERE n.sequence_id > 1
		                   AND n.command_type IN ('SHIP_ORDER', 'CANCEL_ORDER')))[1] AS first_transition,
		       max(n.sequence_id) AS version
		  FROM (SELECT l.aggregate_id, l.sequence_id, l.command_type, l.payload,
		               l.sequence_id = row_number() OVER (PARTITION BY l.aggregate_id ORDER BY l.sequence_id) AS in_prefix
		          FROM cqrs.command_log l) n
		 WHERE n.in_prefix
		 GROUP BY n.aggregate_id) f
	 WHERE f.created;
	SELECT count(*) FROM cqrs.command_log;
$$;
CREATE TABLE bench.latest (LIKE cqrs.read_model INCLUDING ALL);
INSERT INTO bench.latest SELECT * FROM cqrs.read_model;
CREATE FUNCTION bench.fold_latest() RETURNS bigint LANGUAGE sql AS $$
	DELETE FROM bench.latest;
	INSERT INTO bench.latest (order_id, user_id, total_amount, status, version, updated_at)
	SELECT DISTINCT ON (l.aggregate_id) l.aggregate_id, c.payload ->> 'user_id',
	       CAST(c.payload ->> 'amount' AS numeric),
	       CASE l.command_type WHEN 'SHIP_ORDER' THEN 'shipped'
	            WHEN 'CANCEL_ORDER' THEN 'cancelled' ELSE 'created' END,
	       l.sequence_id, now()
	  FROM cqrs.command_log l
	  JOIN cqrs.command_log c ON c.aggregate_id = l.aggregate_id
	   AND c.sequence_id = 1 AND c.command_type = 'CREATE_ORDER'
	 ORDER BY l.aggregate_id, l.sequence_id DESC;
	SELECT count(*) FROM cqrs.command_log;
$$;
CHECKPOINT;
SQL

# Seconds one statement takes, measured by the server.
timed() {
	psql_bench -c "DO \$\$ DECLARE t timestamptz := clock_timestamp(); BEGIN PERFORM $1; RAISE NOTICE 'secs %', extract(epoch FROM clock_timestamp() - t); END \$\$" 2>&1 |
		awk '/secs/ { print $NF }'
}

echo "cqrs rebuild benchmark: $ORDERS orders, $commands commands, $ROUNDS rounds, $(nproc) cores"
rb=()
sq=()
dl=()
for _ in $(seq "$ROUNDS"); do
	sq+=("$(timed 'bench.fold()')")
	psql_bench -c CHECKPOINT
	dl+=("$(timed 'bench.fold_latest()')")
	psql_bench -c CHECKPOINT
	rb+=("$(timed 'cqrs.rebuild()')")
	psql_bench -c CHECKPOINT
done
echo "  rounds: SQL fold ${sq[*]} / DISTINCT ON ${dl[*]} / rebuild ${rb[*]}" >&2
s=$(printf '%s\n' "${sq[@]}" | median)
d=$(printf '%s\n' "${dl[@]}" | median)
r=$(printf '%s\n' "${rb[@]}" | median)
rate=$(awk -v n="$commands" -v t="$r" 'BEGIN { printf "%.0f", n / t }')
ratio=$(ratio "$r" "$s")
dratio=$(ratio "$r" "$d")
printf '%-26s %10s %14s\n' "" seconds "commands/s"
printf '%-26s %10.2f %14.0f\n' "SQL fold (baseline)" "$s" "$(awk -v n="$commands" -v t="$s" 'BEGIN { print n / t }')"
printf '%-26s %10.2f %14.0f\n' "DISTINCT ON (lower bound)" "$d" "$(awk -v n="$commands" -v t="$d" 'BEGIN { print n / t }')"
printf '%-26s %10.2f %14s\n' "cqrs.rebuild()" "$r" "$rate"
printf 'rebuild / SQL fold: %s (target <= 1.5: %s); rebuild / DISTINCT ON: %s (target <= 1.5: %s); rebuild rate: %s commands/s (target >= 150000: %s)\n' \
	"$ratio" "$(verdict "$ratio" 1.5 '<=')" "$dratio" "$(verdict "$dratio" 1.5 '<=')" "$rate" "$(verdict "$rate" 150000 '>=')"
psql_bench -c "SELECT 'consistent: ' || (count(*) = 0) FROM cqrs.verify()"
