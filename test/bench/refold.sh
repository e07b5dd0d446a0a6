#!/usr/bin/env bash
# test/bench/refold.sh: what a fold of the whole command log costs when
# the projector has no slot to go on from: a promoted standby on
# PostgreSQL 15 and 16 (no slot reaches a standby there), a lost slot, a
# failover without synchronized_standby_slots.
#
# The log gets ORDERS orders written straight into it (bench_fill_log: 2
# commands per order), and the projector catches up.  Then ROUNDS times:
# projection switched off (cqrs.enabled), the slot dropped, projection
# switched on again; the projector makes a slot and folds the whole log,
# every command of which is already applied, as on a promoted standby.
# The time is the server's, between its two log lines ("is creating
# replication slot", "created slot ... and caught up").  The baseline, in
# the same run, is a sequential scan of the log (count(*) over its rows)
# that reads what the fold reads.  Prints the median, seconds per million
# commands, and the ratio to the scan.  Starts and stops its own cluster.
#
#   bash test/bench/refold.sh
#   ORDERS=500000 ROUNDS=5 bash test/bench/refold.sh
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
cqrs_become_root "$@"
. "$(dirname "$0")/common.sh"

ORDERS=${ORDERS:-500000}
ROUNDS=${ROUNDS:-3}

bench_start "log_line_prefix = '%m '"
psql_bench -c "CREATE EXTENSION cqrs" >/dev/null
bench_fill_log "$ORDERS"
commands=$(psql_bench -c "SELECT count(*) FROM cqrs.command_log")
bench_wait_projected
psql_bench -c "VACUUM ANALYZE cqrs.command_log" -c CHECKPOINT

# Seconds between the last two log lines matching $1 and $2 after byte $3.
log_seconds() {
	tail -c +"$(($3 + 1))" "$BENCH_DIR/server.log" | awk -v a="$1" -v b="$2" '
		function secs(line,   t) { split(line, f, " "); split(f[2], t, ":"); return t[1] * 3600 + t[2] * 60 + t[3] }
		index($0, a) { s = secs($0) }
		index($0, b) { e = secs($0) }
		END { if (s == "" || e == "") exit 1; printf "%.3f\n", e - s }'
}

set_enabled() {
	psql_bench -c "ALTER SYSTEM SET cqrs.enabled = $1" -c "SELECT pg_reload_conf()" >/dev/null
}

echo "cqrs refold benchmark: $ORDERS orders, $commands commands (all applied), $ROUNDS rounds, $(nproc) cores"
rf=()
sc=()
for _ in $(seq "$ROUNDS"); do
	sc+=("$(psql_bench -c "DO \$\$ DECLARE t timestamptz := clock_timestamp(); n bigint; BEGIN
		SELECT count(*) INTO n FROM (SELECT aggregate_id, sequence_id, payload FROM cqrs.command_log) l;
		RAISE NOTICE 'secs %', extract(epoch FROM clock_timestamp() - t); END \$\$" 2>&1 |
		awk '/secs/ { print $NF }')")
	set_enabled off
	until [ "$(psql_bench -c "SELECT state FROM cqrs.status")" = disabled ]; do sleep 0.1; done
	psql_bench -c "SELECT pg_drop_replication_slot('cqrs')" >/dev/null
	offset=$(stat -c %s "$BENCH_DIR/server.log")
	set_enabled on
	until tail -c +"$((offset + 1))" "$BENCH_DIR/server.log" | grep -q 'and caught up from the command log'; do
		sleep 0.1
	done
	rf+=("$(log_seconds 'is creating replication slot' 'and caught up from the command log' "$offset")")
done
echo "  rounds: scan ${sc[*]} / refold ${rf[*]}" >&2
s=$(printf '%s\n' "${sc[@]}" | median)
r=$(printf '%s\n' "${rf[@]}" | median)
printf '%-28s %10s %22s\n' "" seconds "seconds per 1M commands"
printf '%-28s %10.2f %22.2f\n' "scan of the log (baseline)" "$s" "$(awk -v n="$commands" -v t="$s" 'BEGIN { print t * 1e6 / n }')"
printf '%-28s %10.2f %22.2f\n' "refold (slot made again)" "$r" "$(awk -v n="$commands" -v t="$r" 'BEGIN { print t * 1e6 / n }')"
printf 'refold / scan: %s\n' "$(ratio "$r" "$s")"
psql_bench -c "SELECT 'consistent: ' || (count(*) = 0) FROM cqrs.verify()"
