#!/usr/bin/env bash
# test/bench/declared.sh: the orders domain through the built-in C apply
# against the same rules written in SQL only (a declared domain "porder":
# composite payload types, a PL/pgSQL apply function, a projection into a
# table of the read model's shape), measured in one run on one cluster
# with the projector running:
#
#   - append: ROUNDS alternating rounds of DURATION s of pgbench, CLIENTS
#     clients, synchronous_commit off: a plain INSERT of the command log's
#     row shape (the baseline), cqrs.submit_order(), cqrs.submit() of the
#     declared PCREATE_ORDER; medians and their ratios to the INSERT;
#   - catch-up: after each submit round, the time until every committed
#     command is projected (the worst of the rounds);
#   - rebuild: ORDERS orders of each domain, 2 commands each (created, then
#     shipped or cancelled), written straight into the log;
#     cqrs.rebuild() and cqrs.rebuild('porders'), ROUNDS times each:
#     median commands per second.
#
# Targets: the PL/pgSQL projection rebuilds at >= 50,000 commands/s and
# has caught up <= 1 s after a full-speed load.  Starts and stops its own
# cluster.
#
#   bash test/bench/declared.sh
#   DURATION=10 ROUNDS=3 ORDERS=200000 bash test/bench/declared.sh
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
cqrs_become_root "$@"
. "$(dirname "$0")/common.sh"

ROUNDS=${ROUNDS:-3}
ORDERS=${ORDERS:-200000}

bench_start "synchronous_commit = off"
bench_scripts
bench_script declared <<'SQL'
\set r random(1, 4000000000000000000)
SELECT cqrs.submit('PCREATE_ORDER', 'p' || :r, jsonb_build_object('user_id', 'u' || :client_id, 'amount', 10.50));
SQL

# A fresh extension, with the orders rules declared in SQL beside it.
setup() {
	psql_bench <<'SQL'
SET client_min_messages = warning;
DROP SCHEMA IF EXISTS bench CASCADE;
DROP EXTENSION IF EXISTS cqrs;
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
 WHERE slot_name = 'cqrs' AND NOT active;
CREATE EXTENSION cqrs;
CREATE SCHEMA bench;
CREATE TABLE bench.plain (LIKE cqrs.command_log INCLUDING ALL);

-- The orders rules, declared in SQL.
CREATE TYPE bench.create_payload AS (user_id text, amount numeric);
CREATE TYPE bench.empty_payload AS (reason text);
SELECT cqrs.create_aggregate_type('porder');
SELECT cqrs.create_command_type('PCREATE_ORDER', 'porder', true, 'bench.create_payload');
SELECT cqrs.create_command_type('PSHIP_ORDER', 'porder', false, 'bench.empty_payload');
SELECT cqrs.create_command_type('PCANCEL_ORDER', 'porder', false, 'bench.empty_payload');
CREATE TABLE bench.porders (LIKE cqrs.read_model INCLUDING ALL);
CREATE FUNCTION bench.apply_order(state bench.porders, command cqrs.command_log)
RETURNS bench.porders LANGUAGE plpgsql AS $$
BEGIN
	IF command.command_type = 'PCREATE_ORDER' THEN
		IF state IS NOT NULL THEN
			RAISE EXCEPTION 'invalid transition: CREATE_ORDER of an existing order'
				USING ERRCODE = 'check_violation';
		END IF;
		state := ROW(command.aggregate_id, command.payload->>'user_id',
					 (command.payload->>'amount')::numeric, 'created',
					 command.sequence_id, command.created_at);
		RETURN state;
	END IF;
	IF state.status <> 'created' THEN
		RAISE EXCEPTION 'invalid transition: % on a % order', command.command_type, state.status
			USING ERRCODE = 'check_violation';
	END IF;
	state.status := CASE command.command_type WHEN 'PSHIP_ORDER' THEN 'shipped' ELSE 'cancelled' END;
	state.version := command.sequence_id;
	state.updated_at := command.created_at;
	RETURN state;
END
$$;
SELECT cqrs.create_projection('porders', 'porder', 'bench.porders', 'order_id',
	'bench.apply_order(bench.porders, cqrs.command_log)');
SQL
	wait_for "SELECT state = 'running' FROM cqrs.status"
}
setup

echo "cqrs declared-domain benchmark: $CLIENTS clients, $ROUNDS rounds of ${DURATION}s, synchronous_commit off, $ORDERS orders per rebuild, $(nproc) cores"
plain=()
builtin=()
declared=()
catch_builtin=0
catch_declared=0
worst() { awk -v a="$1" -v b="$2" 'BEGIN { print (b > a) ? b : a }'; }
for _ in $(seq "$ROUNDS"); do
	psql_bench -c CHECKPOINT
	plain+=("$(bench_run plain off)")
	builtin+=("$(bench_run submit off)")
	catch_builtin=$(worst "$catch_builtin" "$(catch_up)")
	psql_bench -c CHECKPOINT
	declared+=("$(bench_run declared off)")
	catch_declared=$(worst "$catch_declared" "$(catch_up)")
done
echo "  rounds: plain ${plain[*]} / built-in ${builtin[*]} / declared ${declared[*]}" >&2
plain=$(printf '%s\n' "${plain[@]}" | median)
builtin=$(printf '%s\n' "${builtin[@]}" | median)
declared=$(printf '%s\n' "${declared[@]}" | median)
psql_bench -c "SELECT 'consistent: ' || ((SELECT count(*) FROM cqrs.verify()) = 0
	AND (SELECT count(*) FROM cqrs.verify('porders')) = 0)"

# The rebuild log: only these orders, of both domains, written while
# projection is paused.
setup
psql_bench <<SQL
SET client_min_messages = warning;
SELECT cqrs.pause();
INSERT INTO cqrs.command_log (command_id, command_type, aggregate_id, sequence_id, payload)
SELECT cqrs.uuidv7(), d.prefix || 'CREATE_ORDER', d.id || g, 1,
       jsonb_build_object('user_id', 'u' || (g % 1000), 'amount', (g % 997 + 1) * 1.25)
  FROM generate_series(1, $ORDERS) g, (VALUES ('', 'o'), ('P', 'p')) AS d(prefix, id);
INSERT INTO cqrs.command_log (command_id, command_type, aggregate_id, sequence_id, payload)
SELECT cqrs.uuidv7(), d.prefix || CASE WHEN g % 2 = 0 THEN 'SHIP_ORDER' ELSE 'CANCEL_ORDER' END,
       d.id || g, 2, '{}'
  FROM generate_series(1, $ORDERS) g, (VALUES ('', 'o'), ('P', 'p')) AS d(prefix, id);
VACUUM ANALYZE cqrs.command_log;
SQL

# milliseconds of one statement
timed() {
	psql_bench -c '\timing on' -c "$1" | awk '/^Time:/ { print $2 }'
}
rb_builtin=()
rb_declared=()
for _ in $(seq "$ROUNDS"); do
	rb_builtin+=("$(timed 'SELECT cqrs.rebuild()')")
	rb_declared+=("$(timed "SELECT cqrs.rebuild('porders')")")
done
echo "  rebuild ms: built-in ${rb_builtin[*]} / declared ${rb_declared[*]}" >&2
rb_builtin=$(printf '%s\n' "${rb_builtin[@]}" | median)
rb_declared=$(printf '%s\n' "${rb_declared[@]}" | median)
psql_bench -c "SELECT 'rebuilt consistently: ' || ((SELECT count(*) FROM cqrs.verify()) = 0
	AND (SELECT count(*) FROM cqrs.verify('porders')) = 0)"
psql_bench -c "SELECT cqrs.resume()" >/dev/null

rate_b=$(awk -v ms="$rb_builtin" -v n="$ORDERS" 'BEGIN { printf "%.0f", 2 * n / (ms / 1000) }')
rate_d=$(awk -v ms="$rb_declared" -v n="$ORDERS" 'BEGIN { printf "%.0f", 2 * n / (ms / 1000) }')

printf '%-28s %12s %12s %8s\n' "" "built-in C" "PL/pgSQL" "ratio"
printf '%-28s %12s %12s %8s\n' "append/s (INSERT: $plain)" "$builtin" "$declared" "$(ratio "$declared" "$builtin")"
printf '%-28s %12s %12s\n' "append ratio to INSERT" "$(ratio "$builtin" "$plain")" "$(ratio "$declared" "$plain")"
printf '%-28s %11ss %11ss\n' "catch-up after the load" "$catch_builtin" "$catch_declared"
printf '%-28s %12s %12s %8s\n' "rebuild commands/s" "$rate_b" "$rate_d" "$(ratio "$rate_d" "$rate_b")"
printf 'targets: PL/pgSQL rebuild >= 50000 commands/s %s; PL/pgSQL catch-up <= 1 s %s\n' \
	"$(verdict "$rate_d" 50000 '>=')" "$(verdict "$catch_declared" 1 '<=')"
