#!/usr/bin/env bash
# test/check.sh: build, install and run every cqrs test (pg_regress,
# isolation and TAP, on throwaway server instances the tests start and
# stop; the setup's wait for apt's lock; the README's examples, on a fresh
# demo cluster that is stopped afterwards).
# Works as root on a fresh Debian 12 (installs what it needs with apt) or as
# an ordinary user who has the packages and can write the install
# directories.  Exit status 0 means every test passed.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cqrs_become_root "$@"

cqrs_install_deps
cqrs_build_install

work=$(cqrs_test_tree)
[ -n "${CQRS_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
cqrs_log "running the tests in $work as $(cqrs_pg_user)"

# Each suite on its own, so that one failing does not hide the others.  A
# suite that fails without a failed test (it did not run, or a script
# died before its plan) still counts as a failure.
status=0
passed=0
failed=0
: > "$work/check.log"
run_suite() {
	local suite_status=0 p f
	"$@" 2>&1 | tee "$work/suite.log" || suite_status=1
	cat "$work/suite.log" >> "$work/check.log"
	read -r p f < <(cqrs_suite_counts "$work/suite.log")
	if [ "$suite_status" -ne 0 ]; then
		status=1
		[ "$f" -eq 0 ] && f=1
	fi
	passed=$((passed + p))
	failed=$((failed + f))
}
for suite in "ISOLATION= TAP_TESTS=" "REGRESS= TAP_TESTS=" "REGRESS= ISOLATION="; do
	# shellcheck disable=SC2086
	run_suite cqrs_as_pg make -C "$work" -s installcheck $suite
done

# The setup's own behaviour, then the README's examples on a fresh demo
# cluster; neither depends on how cqrs is built, and the examples use
# Redis: not on a build without hiredis.
if [ "${WITH_HIREDIS:-}" != no ]; then
	run_suite bash "$CQRS_ROOT/test/setup.sh"
	run_suite bash "$CQRS_ROOT/test/readme.sh"
fi

# Show what failed: the diffs and the server logs of the test instances.
if [ "$status" -ne 0 ]; then
	for f in "$work/regression.diffs" "$work/output_iso/regression.diffs"; do
		[ -s "$f" ] && { echo "----- $f"; cat "$f"; }
	done
	for f in "$work"/tmp_check*/log/* "$work"/output_iso/log/*.log; do
		[ -s "$f" ] && { echo "----- $f (last 100 lines)"; tail -n 100 "$f"; }
	done
fi

# One closing line with the totals of every suite.
echo "$passed passed, $failed failed"
exit "$status"
