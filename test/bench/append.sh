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
# on and off.  Starts and stops its own cluster (in /tmp/cqrs-bench), with
# the projector switched off: this measures the command path alone
# (test/bench/projection.sh measures it with the projector running).
#
#   bash test/bench/append.sh            # as root, or a user with the packages
#   DURATION=20 ROUNDS=9 MODES=off bash test/bench/append.sh
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
cqrs_become_root "$@"
. "$(dirname "$0")/common.sh"

ROUNDS=${ROUNDS:-7}
MODES=${MODES:-on off}

bench_start "cqrs.enabled = off"
bench_scripts

echo "cqrs append benchmark: $CLIENTS clients, $ROUNDS rounds of ${DURATION}s per side, $(nproc) cores"
printf '%-18s %14s %14s %7s %8s\n' synchronous_commit "plain INSERT/s" "submit/s" ratio target
for sc in $MODES; do
	# untimed warm-up of both sides: caches, WAL segments, fsync pattern
	bench_reset
	DURATION=3 bench_run plain "$sc" >/dev/null
	DURATION=3 bench_run submit "$sc" >/dev/null
	plain=()
	submit=()
	for _ in $(seq "$ROUNDS"); do
		bench_reset
		plain+=("$(bench_run plain "$sc")")
		bench_reset
		submit+=("$(bench_run submit "$sc")")
	done
	p=$(printf '%s\n' "${plain[@]}" | median)
	s=$(printf '%s\n' "${submit[@]}" | median)
	target=0.85
	[ "$sc" = off ] && target=0.75
	r=$(ratio "$s" "$p")
	printf '%-18s %14s %14s %7s %8s  %s\n' "$sc" "$p" "$s" "$r" ">= $target" "$(verdict "$r" "$target")"
	echo "  rounds: plain ${plain[*]} / submit ${submit[*]}" >&2
done
