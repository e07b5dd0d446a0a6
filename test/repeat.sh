#!/usr/bin/env bash
# test/repeat.sh: run TAP scripts again and again, for failures that show
# only in some runs (crashes that depend on timing).
#
#   bash test/repeat.sh N SCRIPT...     e.g. bash test/repeat.sh 5 006_operate.pl
#
# Builds and installs cqrs like test/check.sh, runs each script N times,
# and closes with "P passed, F failed" counting runs; exit status 0 means
# every run passed.  A failed run's server logs are printed.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cqrs_become_root "$@"

if [ $# -lt 2 ] || ! [ "$1" -gt 0 ] 2>/dev/null; then
	echo "usage: $0 N SCRIPT..." >&2
	exit 2
fi
runs=$1
shift

cqrs_install_deps
cqrs_build_install
work=$(cqrs_test_tree)
[ -n "${CQRS_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT

passed=0
failed=0
for script in "$@"; do
	[ -f "$CQRS_ROOT/test/t/$script" ] || { cqrs_log "no test/t/$script"; exit 2; }
	for i in $(seq "$runs"); do
		rm -rf "$work/tmp_check"
		if cqrs_as_pg make -C "$work" -s installcheck REGRESS= ISOLATION= \
			PROVE_TESTS="test/t/$script" > "$work/run.log" 2>&1; then
			echo "ok - $script, run $i"
			passed=$((passed + 1))
		else
			echo "not ok - $script, run $i"
			failed=$((failed + 1))
			tail -n 30 "$work/run.log"
			for f in "$work"/tmp_check/log/*.log; do
				[ -s "$f" ] && { echo "----- $f (last 40 lines)"; tail -n 40 "$f"; }
			done
		fi
	done
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
