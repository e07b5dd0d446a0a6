#!/usr/bin/env bash
# test/bench/append.sh: append rate of cqrs.submit_order() against a plain
# INSERT of the same row shape, measured side by side in one run.
#
# The baseline table is LIKE cqrs.command_log INCLUDING ALL: the same
# columns, defaults, CHECK constraints and unique keys (log_id, command_id,
# (aggregate_id, sequence_id)); its INSERT builds the same payload with
# jsonb_build_object() and takes its command_id from cqrs.uuidv7().  Both
# run through pgbench with prepared statements, CLIENTS clients, for
# DURATION seconds, ROUNDS times alternately, on a fresh log each round;
# the median rate of each side is compared.  Done with synchronous_commit
# on and off.  Starts and stops its own cluster (in /tmp/cqrs-bench).
#
#   bash test/bench/append.sh            # as root, or a user with the packages
#   DURATION=20 ROUNDS=5 MODES=off bash test/bench/append.sh
set -euo pipefail
. "$(dirname "$0")/../lib.sh"

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-5}
CLIENTS=${CLIENTS:-4}
MODES=${MODES:-on off}
BENCH_DIR=${CQRS_BENCH_DIR:-/tmp/cqrs-bench}
BENCH_PORT=${CQRS_BENCH_PORT:-54330}
BINDIR=$("$PG_CONFIG" --bindir)

cqrs_install_deps
cqrs_build_install
# Sized so that no checkpoint or autovacuum of the log falls into a round.
cqrs_cluster_start "$BENCH_DIR" "$BENCH_PORT" \
	"shared_buffers = '1GB'" "max_wal_size = '16GB'" \
	"checkpoint_timeout = '1h'" "autovacuum = off"
trap 'cqrs_cluster_stop "$BENCH_DIR"' EXIT

work=$(mktemp -d /tmp/cqrs-bench-scripts.XXXXXX)
trap 'cqrs_cluster_stop "$BENCH_DIR"; rm -rf "$work"' EXIT
cat > "$work/plain.sql" <<'SQL'
\set r random(1, 4000000000000000000)
INSERT INTO bench.plain (command_id, command_type, aggregate_id, sequence_id, payload)
VALUES (cqrs.uuidv7(), 'CREATE_ORDER', 'o' || :r, 1,
        jsonb_build_object('order_id', 'o' || :r, 'user_id', 'u' || :client_id, 'amount', 10.50));
SQL
cat > "$work/submit.sql" <<'SQL'
\set r random(1, 4000000000000000000)
SELECT cqrs.submit_order('o' || :r, 'u' || :client_id, 10.50);
SQL
chmod -R a+rX "$work"

psql_bench() {
	cqrs_as_pg "$BINDIR/psql" -X -q -h "$BENCH_DIR" -p "$BENCH_PORT" -U postgres \
		-d postgres -v ON_ERROR_STOP=1 "$@"
}

# A fresh log and baseline table, flushed, before each measured run.
reset_tables() {
	psql_bench <<'SQL'
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS cqrs;
CREATE EXTENSION cqrs;
DROP SCHEMA IF EXISTS bench CASCADE;
CREATE SCHEMA bench;
CREATE TABLE bench.plain (LIKE cqrs.command_log INCLUDING ALL);
CHECKPOINT;
SQL
}

# Rate of one pgbench run of script $1 with synchronous_commit $2.
run() {
	reset_tables
	PGOPTIONS="-c synchronous_commit=$2" cqrs_as_pg "$BINDIR/pgbench" \
		-h "$BENCH_DIR" -p "$BENCH_PORT" -U postgres -n -M prepared \
		-c "$CLIENTS" -j "$CLIENTS" -T "$DURATION" -f "$work/$1.sql" postgres 2>&1 |
		awk '/^tps = / { printf "%.0f\n", $3 }'
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

echo "cqrs append benchmark: $CLIENTS clients, $ROUNDS rounds of ${DURATION}s per side, $(nproc) cores"
printf '%-18s %14s %14s %7s %8s\n' synchronous_commit "plain INSERT/s" "submit/s" ratio target
for sc in $MODES; do
	# untimed warm-up of both sides: caches, WAL segments, fsync pattern
	DURATION=3 run plain "$sc" >/dev/null
	DURATION=3 run submit "$sc" >/dev/null
	plain=()
	submit=()
	for _ in $(seq "$ROUNDS"); do
		plain+=("$(run plain "$sc")")
		submit+=("$(run submit "$sc")")
	done
	p=$(printf '%s\n' "${plain[@]}" | median)
	s=$(printf '%s\n' "${submit[@]}" | median)
	target=0.85
	[ "$sc" = off ] && target=0.75
	ratio=$(awk -v s="$s" -v p="$p" 'BEGIN { printf "%.2f", s / p }')
	verdict=$(awk -v r="$ratio" -v t="$target" 'BEGIN { print (r >= t) ? "met" : "MISSED" }')
	printf '%-18s %14s %14s %7s %8s  %s\n' "$sc" "$p" "$s" "$ratio" ">= $target" "$verdict"
	echo "  rounds: plain ${plain[*]} / submit ${submit[*]}" >&2
done
