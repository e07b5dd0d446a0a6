#!/usr/bin/env bash
# test/setup.sh: what the README's two commands do before any test.
#
# They wait for a package manager that holds apt's locks instead of
# failing: the dpkg front-end lock, then the package lists' lock, are held
# for a few seconds each the way apt and dpkg take them (fcntl), while
# cqrs_apt_get runs: it must wait, say so, and succeed once the lock is
# free.  A user with sudo but without root gets them run again through
# sudo: a throwaway user with passwordless sudo (sudo installed for it)
# runs "test/demo.sh stop" from a copy of the tree.  Needs root; closes
# with pg_regress's count line.
set -uo pipefail
. "$(dirname "$0")/lib.sh"

if [ "$(id -u)" -ne 0 ]; then
	echo "apt-wait: skipped (not root)"
	echo "All 0 tests passed."
	exit 0
fi

passed=0
failed=0
check() {
	if [ "$1" -eq 0 ]; then
		passed=$((passed + 1)); echo "ok - $2"
	else
		failed=$((failed + 1)); echo "not ok - $2"; [ -n "${3:-}" ] && sed 's/^/#   /' "$3"
	fi
}

log=$(mktemp)
for what in "install make:/var/lib/dpkg/lock-frontend" "update:/var/lib/apt/lists/lock"; do
	args=${what%%:*}
	lock=${what#*:}
	touch "$lock"
	# the write lock apt and dpkg take (fcntl; struct flock as on 64-bit
	# Linux: short, short, off_t, off_t, pid_t), held for 8 seconds
	( perl -MFcntl -e '
		open(my $fh, "+<", $ARGV[0]) or die "$ARGV[0]: $!";
		my $lk = pack("s s x4 q q l x4", F_WRLCK, SEEK_SET, 0, 0, 0);
		fcntl($fh, F_SETLK, $lk) or die "lock $ARGV[0]: $!";
		sleep $ARGV[1];' "$lock" 8 ) &
	holder=$!
	sleep 1
	t0=$(date +%s)
	# shellcheck disable=SC2086
	if [ "$args" = update ]; then
		CQRS_APT_WAIT=60 cqrs_apt_get update -qq >"$log" 2>&1
	else
		CQRS_APT_WAIT=60 DEBIAN_FRONTEND=noninteractive cqrs_apt_get install -y -qq $(echo "$args" | cut -d' ' -f2) >"$log" 2>&1
	fi
	status=$?
	elapsed=$(($(date +%s) - t0))
	wait "$holder"
	check "$status" "apt-get ${args%% *} succeeds once $lock is free" "$log"
	[ "$elapsed" -ge 5 ]
	check $? "it waited for the lock (${elapsed}s)" "$log"
	grep -q "another package manager holds apt's lock" "$log"
	check $? "and said why" "$log"
done

# a sudo user: the script runs itself again as root
command -v sudo >/dev/null ||
	DEBIAN_FRONTEND=noninteractive cqrs_apt_get install -y -qq --no-install-recommends sudo >/dev/null
user=cqrs_sudo_test
id "$user" >/dev/null 2>&1 || useradd --create-home "$user"
echo "$user ALL=(ALL) NOPASSWD: ALL" > /etc/sudoers.d/cqrs_sudo_test
tree=$(cqrs_test_tree)
chmod -R a+rX "$tree"
(cd "$tree" && CQRS_DEMO_DIR=$tree/no-demo runuser -u "$user" -- bash test/demo.sh stop) >"$log" 2>&1
check $? "a sudo user's demo.sh stop succeeds" "$log"
grep -q "this needs root: running it again with sudo" "$log"
check $? "... run again through sudo" "$log"
grep -q "demo cluster in .* stopped" "$log"
check $? "... and done as root" "$log"
rm -f /etc/sudoers.d/cqrs_sudo_test
userdel --remove "$user" 2>/dev/null
rm -rf "$tree" "$log"

if [ "$failed" -eq 0 ]; then
	echo "All $passed tests passed."
else
	echo "$failed of $((passed + failed)) tests failed."
fi
[ "$failed" -eq 0 ]
