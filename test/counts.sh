#!/usr/bin/env bash
# test/counts.sh: the closing count of test/check.sh, checked on the output
# of each kind of run it meets: pg_regress and isolation passing and
# failing, prove passing, a TAP script failing subtests, and one that dies
# after its last passing subtest (it must count as a failure).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

fails=0
expect() {
	local name=$1 want=$2 got
	got=$(cqrs_suite_counts /dev/stdin)
	if [ "$got" = "$want" ]; then
		echo "ok - $name"
	else
		echo "not ok - $name: expected \"$want\", got \"$got\""
		fails=$((fails + 1))
	fi
}

printf '# All 10 tests passed.\n' | expect 'pg_regress, all passed' '10 0'
printf '# 1 of 10 tests failed.\n' | expect 'pg_regress, one failed' '9 1'
printf '%s\n' 'Files=9, Tests=162, 72 wallclock secs' 'Result: PASS' |
	expect 'prove, all passed' '162 0'
printf '%s\n' 'test/t/007_x.pl (Wstat: 256 (exited 1) Tests: 20 Failed: 2)' \
	'Files=2, Tests=40, 9 wallclock secs' | expect 'prove, two subtests failed' '38 2'
printf '%s\n' 'test/t/006_operate.pl         (Wstat: 8192 (exited 32) Tests: 28 Failed: 0)' \
	'  Non-zero exit status: 32' '  Parse errors: No plan found in TAP output' \
	'Files=9, Tests=162, 72 wallclock secs' | expect 'prove, a script died' '162 1'
printf '' | expect 'nothing ran' '0 0'

echo "$((6 - fails)) passed, $fails failed"
[ "$fails" -eq 0 ]
