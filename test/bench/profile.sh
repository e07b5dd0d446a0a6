#!/usr/bin/env bash
# test/bench/profile.sh: where the CPU of a command goes.
#
# Three variants, as in make bench: a plain INSERT of the command log's
# row shape and keys, cqrs.submit_order() with the projector (and, with
# REDIS=on, its Redis write-through) running, and an AFTER INSERT trigger
# upserting a read table.  Each runs at the same fixed rate (pgbench -R
# RATE, default 3000 commands/s, below every variant's ceiling, so each
# does the same work) for DURATION s with synchronous_commit off, while
#   - /proc/stat gives the CPU time of the whole machine (user + system,
#     every process: clients, backends, projector, WAL writer, Redis),
#     divided by the commands: microseconds of CPU per command;
#   - perf samples every CPU (software clock, PERF_FREQ Hz): the share of
#     each kind of process (pg_stat_activity's backend_type, or the
#     program), and for cqrs the hottest functions of the backends and of
#     the projector.
# RATE=0 runs each variant flat out instead (then the variants do
# different work: a busy projector makes larger batches).
# Prints a table of microseconds per command, by kind of process, and the
# cqrs-minus-plain and trigger-minus-plain differences.  Starts and stops
# its own cluster.  Needs perf (Debian's linux-perf) for the breakdown;
# without it, only the totals.
#
#   bash test/bench/profile.sh
#   DURATION=15 RATE=3000 REDIS=on TOP=15 bash test/bench/profile.sh
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
cqrs_become_root "$@"
. "$(dirname "$0")/common.sh"

RATE=${RATE:-3000}
REDIS=${REDIS:-on}
TOP=${TOP:-12}
PERF_FREQ=${PERF_FREQ:-999}

have_perf=""
if perf --version >/dev/null 2>&1; then
	have_perf=1
elif [ "$(id -u)" -eq 0 ]; then
	DEBIAN_FRONTEND=noninteractive cqrs_apt_get install -y -qq --no-install-recommends linux-perf >/dev/null 2>&1 || true
	perf --version >/dev/null 2>&1 && have_perf=1
fi
[ -n "$have_perf" ] || cqrs_log "perf is not available: totals only"

bench_start
if [ "$REDIS" = on ]; then
	bench_redis_start
	psql_bench -c "ALTER SYSTEM SET cqrs.redis_url = '$BENCH_REDIS_URL'" -c "SELECT pg_reload_conf()" >/dev/null
fi
{
	echo 'CREATE EXTENSION cqrs;'
	echo 'CREATE SCHEMA bench;'
	echo 'CREATE TABLE bench.plain (LIKE cqrs.command_log INCLUDING ALL);'
	bench_trigger_sql
} | psql_bench >/dev/null
wait_for "SELECT state = 'running' FROM cqrs.status"
bench_scripts
{
	echo '\set r random(1, 4000000000000000000)'
	bench_log_insert bench.trig_log
} | bench_script trigger

rate_opt=()
[ "$RATE" = 0 ] || rate_opt=(-R "$RATE")

# busy jiffies of the whole machine (user, nice, system, irq, softirq)
busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
hz=$(getconf CLK_TCK)

# One run of variant $1 at the fixed rate; prints the commands done.  With
# a second argument, perf samples the run into $BENCH_WORK/$1.data, and
# the backends' kinds are noted halfway through, while they all run.
run() {
	local v=$1 profile=${2:-} perf_pid="" out pg
	psql_bench -c CHECKPOINT
	if [ -n "$profile" ]; then
		perf record -q -a -e cpu-clock -F "$PERF_FREQ" -g -o "$BENCH_WORK/$v.data" \
			-- sleep "$((DURATION + 1))" >/dev/null 2>&1 &
		perf_pid=$!
	fi
	PGOPTIONS="-c synchronous_commit=off" cqrs_as_pg "$BINDIR/pgbench" \
		-h "$BENCH_DIR" -p "$BENCH_PORT" -U postgres -n -M prepared \
		-c "$CLIENTS" -j "$CLIENTS" -T "$DURATION" ${rate_opt[@]+"${rate_opt[@]}"} \
		-f "$BENCH_WORK/$v.sql" postgres > "$BENCH_WORK/$v.out" 2>&1 &
	pg=$!
	if [ -n "$profile" ]; then
		sleep "$((DURATION / 2))"
		psql_bench -c "SELECT pid, replace(backend_type, ' ', '_') FROM pg_stat_activity" |
			tr '|' ' ' > "$BENCH_WORK/$v.pids"
	fi
	wait "$pg"
	# the projector's share of this load ends when it has caught up
	[ "$v" = submit ] && catch_up >/dev/null
	[ -n "$perf_pid" ] && wait "$perf_pid"
	awk '/number of transactions actually processed/ { print $NF }' "$BENCH_WORK/$v.out" | cut -d/ -f1
}

# CPU per command from /proc/stat, in a run without perf (whose sampling
# costs CPU of its own); then a run under perf for the breakdown.
declare -A us rows prows
for v in plain submit trigger; do
	b0=$(busy)
	rows[$v]=$(run "$v")
	b1=$(busy)
	us[$v]=$(awk -v b="$((b1 - b0))" -v hz="$hz" -v n="${rows[$v]}" 'BEGIN { printf "%.1f", b / hz * 1e6 / n }')
	[ -n "$have_perf" ] && prows[$v]=$(run "$v" profile)
done

echo "cqrs CPU profile: $CLIENTS clients at $([ "$RATE" = 0 ] && echo "full speed" || echo "$RATE commands/s") for ${DURATION}s, synchronous_commit off, Redis $REDIS, $(nproc) cores"
printf '%-44s %10s %12s\n' "" commands "CPU us/cmd"
printf '%-44s %10s %12s\n' "plain INSERT" "${rows[plain]}" "${us[plain]}"
printf '%-44s %10s %12s\n' "cqrs.submit_order() + projector" "${rows[submit]}" "${us[submit]}"
printf '%-44s %10s %12s\n' "AFTER INSERT trigger upserting a read table" "${rows[trigger]}" "${us[trigger]}"
printf 'over plain: cqrs %s us, trigger %s us per command\n' \
	"$(awk -v a="${us[submit]}" -v b="${us[plain]}" 'BEGIN { printf "%.1f", a - b }')" \
	"$(awk -v a="${us[trigger]}" -v b="${us[plain]}" 'BEGIN { printf "%.1f", a - b }')"
[ -n "$have_perf" ] || exit 0

# Microseconds per command by kind of process: each sample is 1/PERF_FREQ s.
kinds() {
	local v=$1
	perf report -i "$BENCH_WORK/$v.data" --no-children --sort pid --stdio -F overhead,sample,pid 2>/dev/null |
		awk -v pids="$BENCH_WORK/$v.pids" -v f="$PERF_FREQ" -v n="${prows[$v]}" '
			BEGIN { while ((getline l < pids) > 0) { split(l, a, " "); kind[a[1]] = a[2] } }
			/^ *[0-9.]+%/ {
				split($3, p, ":"); pid = p[1]; comm = p[2]
				k = (pid in kind) ? kind[pid] : (comm == "postgres" ? "postgres_other" : comm)
				s[k] += $2
			}
			END { for (k in s) printf "%s %.1f\n", k, s[k] / f * 1e6 / n }' | sort -k2 -rn
}
echo
echo "CPU us per command, by kind of process (perf samples):"
for v in plain submit trigger; do
	echo "  $v: $(kinds "$v" | awk '{ printf "%s %s; ", $1, $2 }')"
done

# Microseconds per command of each function in the processes of kind $2
# during the run of variant $1, the TOP highest.
functions() {
	local v=$1 kind=$2 list
	list=$(awk -v k="$kind" '$2 == k { printf "%s%s", sep, $1; sep = "," }' "$BENCH_WORK/$v.pids")
	[ -n "$list" ] || return 0
	perf report -i "$BENCH_WORK/$v.data" --no-children --pid="$list" --sort dso,sym -n --stdio 2>/dev/null |
		awk -v n="${prows[$v]}" -v f="$PERF_FREQ" '
			/^ *[0-9.]+% +[0-9]+ / { c = $2; $1 = ""; $2 = ""; sub(/^ +/, ""); printf "%8.2f  %s\n", c / f * 1e6 / n, $0 }' |
		sort -rn | head -n "$TOP"
}
echo
echo "client backends, CPU us per command by function: plain INSERT"
functions plain client_backend
echo
echo "client backends, CPU us per command by function: cqrs.submit_order()"
functions submit client_backend
echo
echo "client backends, CPU us per command by function: AFTER INSERT trigger"
functions trigger client_backend
echo
echo "the cqrs projector, CPU us per command by function"
functions submit cqrs_projector
