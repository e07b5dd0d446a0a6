#!/usr/bin/env bash
# test/check.sh: build, install and run every cqrs test (pg_regress,
# isolation and TAP), on throwaway server instances the tests start and
# stop.
# Works as root on a fresh Debian 12 (installs what it needs with apt) or as
# an ordinary user who has the packages and can write the install
# directories.  Exit status 0 means every test passed.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

cqrs_install_deps
cqrs_build_install

work=$(cqrs_test_tree)
[ -n "${CQRS_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
cqrs_log "running the tests in $work as $(cqrs_pg_user)"

# Each suite on its own, so that one failing does not hide the others.
status=0
: > "$work/check.log"
for suite in "ISOLATION= TAP_TESTS=" "REGRESS= TAP_TESTS=" "REGRESS= ISOLATION="; do
	# shellcheck disable=SC2086
	cqrs_as_pg make -C "$work" -s installcheck $suite 2>&1 |
		tee -a "$work/check.log" || status=1
done

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
passed=0
failed=0
while read -r line; do
	case "$line" in
	"All "*" tests passed."*)
		n=${line#All }; passed=$((passed + ${n%% *})) ;;
	*" of "*" tests failed."*)
		f=${line%% of *}; t=${line#* of }; t=${t%% *}
		failed=$((failed + f)); passed=$((passed + t - f)) ;;
	esac
done < <(sed -E 's/^[# ]+//' "$work/check.log" |
	grep -E '^(All [0-9]+ tests passed|[0-9]+ of [0-9]+ tests failed)')

# prove: "Files=5, Tests=45, ..." and "Failed: N" per failing script
tap=$(sed -n -E 's/^Files=[0-9]+, Tests=([0-9]+),.*/\1/p' "$work/check.log" | tail -1)
tap_failed=$(sed -n -E 's/.*\(Wstat: .* Failed: ([0-9]+)\)$/\1/p' "$work/check.log" |
	awk '{ s += $1 } END { print s + 0 }')
if [ -n "$tap" ]; then
	passed=$((passed + tap - tap_failed))
	failed=$((failed + tap_failed))
fi
[ "$status" -ne 0 ] && [ "$failed" -eq 0 ] && failed=1
echo "$passed passed, $failed failed"
exit "$status"
