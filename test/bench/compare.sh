#!/usr/bin/env bash
# test/bench/compare.sh: the command path of this tree against an earlier
# revision, measured in one run.  Builds REV in a git worktree, then, in
# ROUNDS alternating rounds, installs each build, starts a fresh benchmark
# cluster (synchronous_commit off) and runs DURATION seconds of pgbench
# from CLIENTS clients, each transaction creating an order and shipping it
# (submit_order and ship_order: the create path and the server-assigned
# sequence path).  Prints each round, the medians and this tree's median
# over REV's.  Leaves this tree's build installed.
#
#   bash test/bench/compare.sh REV
#   DURATION=20 ROUNDS=5 bash test/bench/compare.sh fcd82a9
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
cqrs_become_root "$@"
. "$(dirname "$0")/common.sh"

REV=${1:?usage: $0 REV}
ROUNDS=${ROUNDS:-3}
base=$(mktemp -d /tmp/cqrs-compare.XXXXXX)
cqrs_install_deps
git -C "$CQRS_ROOT" worktree add -q --detach "$base/tree" "$REV"
trap 'cqrs_cluster_stop "$BENCH_DIR"; git -C "$CQRS_ROOT" worktree remove --force "$base/tree"; rm -rf "$base" "$BENCH_WORK"' EXIT

cat > "$BENCH_WORK/create_ship.sql" <<'SQL'
\set o random(1, 2000000000)
SELECT cqrs.submit_order('cmp-' || :client_id || '-' || :o, 'u', 1);
SELECT cqrs.ship_order('cmp-' || :client_id || '-' || :o);
SQL

# tps of one round on the build in $1
round() {
	make -C "$1" -s >/dev/null
	make -C "$1" -s install >/dev/null
	cqrs_cluster_start "$BENCH_DIR" "$BENCH_PORT" \
		"shared_buffers = '1GB'" "max_wal_size = '16GB'" \
		"checkpoint_timeout = '1h'" "autovacuum = off" \
		"synchronous_commit = off"
	psql_bench -c "CREATE EXTENSION cqrs" >/dev/null
	for _ in $(seq 100); do
		[ "$(psql_bench -c "SELECT state FROM cqrs.status")" = running ] && break
		sleep 0.1
	done
	cqrs_as_pg "$BINDIR/pgbench" -n -h "$BENCH_DIR" -p "$BENCH_PORT" -U postgres \
		-c "$CLIENTS" -j 2 -T "$DURATION" -f "$BENCH_WORK/create_ship.sql" postgres 2>/dev/null |
		awk '/^tps/ { printf "%d\n", $3 }'
	cqrs_cluster_stop "$BENCH_DIR"
}

: > "$base/rev"
: > "$base/this"
for i in $(seq "$ROUNDS"); do
	r=$(round "$base/tree")
	t=$(round "$CQRS_ROOT")
	echo "$r" >> "$base/rev"
	echo "$t" >> "$base/this"
	printf 'round %d: %s %d tx/s, this tree %d tx/s\n' "$i" "$REV" "$r" "$t"
done
r=$(median < "$base/rev")
t=$(median < "$base/this")
printf 'create + ship, %d clients, %d s x %d rounds, median tx/s: %s %d, this tree %d, ratio %s\n' \
	"$CLIENTS" "$DURATION" "$ROUNDS" "$REV" "$r" "$t" "$(ratio "$t" "$r")"
