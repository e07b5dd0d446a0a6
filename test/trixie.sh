#!/usr/bin/env bash
# test/trixie.sh: run cqrs's scripts on PostgreSQL 17, in a Debian 13
# ("trixie") system built with debootstrap from Debian's own mirror.
#
#   bash test/trixie.sh build           build the system once (reused after)
#   bash test/trixie.sh run SCRIPT ...  copy this tree in and run
#                                       "bash test/SCRIPT ..." there as root
#   bash test/trixie.sh shell           an interactive shell inside
#
# CI, WITH_HIREDIS, CQRS_KEEP and PG_CONFIG reach the script inside when set.
#
# The system lives in $CQRS_TRIXIE (default /var/cache/cqrs/trixie) and is
# kept between runs: a second build, or a run, only installs what a newer
# version of this tree needs.  proc, /dev and a tmpfs on /dev/shm are
# mounted while a command runs inside, and unmounted after.  Needs root.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ROOT=${CQRS_TRIXIE:-/var/cache/cqrs/trixie}
MIRROR=${CQRS_TRIXIE_MIRROR:-http://deb.debian.org/debian}

if [ "$(id -u)" -ne 0 ]; then
	cqrs_log "test/trixie.sh needs root (debootstrap, chroot and mounts)"
	exit 1
fi

trixie_mount() {
	mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
	mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
	mkdir -p "$ROOT/dev/shm"
	mountpoint -q "$ROOT/dev/shm" || mount -t tmpfs -o mode=1777 shm "$ROOT/dev/shm"
}

trixie_umount() {
	local m
	for m in dev/shm dev proc; do
		mountpoint -q "$ROOT/$m" && umount -l "$ROOT/$m"
	done
	return 0
}

# Processes started inside and still running (servers a failed test left
# behind) would keep the mounts busy: stop them first.
trixie_kill_inside() {
	local p
	for p in /proc/[0-9]*; do
		[ "$(readlink "$p/root" 2>/dev/null)" = "$ROOT" ] || continue
		kill -9 "${p#/proc/}" 2>/dev/null || true
	done
}

trixie_build() {
	if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
		command -v debootstrap >/dev/null || {
			apt-get update -qq
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
		}
		cqrs_log "building Debian 13 in $ROOT (debootstrap --variant=minbase trixie)"
		rm -rf "$ROOT"
		mkdir -p "$ROOT"
		debootstrap --variant=minbase trixie "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 || {
			tail -n 30 "$ROOT.debootstrap.log"
			rm -rf "$ROOT"
			exit 1
		}
	fi
	cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
	# Inside, test/lib.sh installs what the tree needs; the packages stay.
	trixie_mount
	trap 'trixie_kill_inside; trixie_umount' EXIT
	chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
		bash -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ca-certificates procps >/dev/null'
}

trixie_run() {
	local inside=/root/cqrs status=0
	trixie_build
	rm -rf "${ROOT:?}$inside"
	mkdir -p "$ROOT$inside"
	(cd "$CQRS_ROOT" && tar --exclude=.git --exclude='*.o' --exclude='*.bc' \
		--exclude='*.so' --exclude=tmp_check --exclude=tmp_check_regress \
		--exclude=tmp_check_iso --exclude=results --exclude=tools/cqrs-load -cf - .) |
		tar -C "$ROOT$inside" -xf -
	# the settings the scripts read, when set here (an empty WITH_HIREDIS
	# would mean "no" to make)
	local env=(PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8) v
	for v in CI WITH_HIREDIS CQRS_KEEP PG_CONFIG; do
		[ -n "${!v:-}" ] && env+=("$v=${!v}")
	done
	chroot "$ROOT" /usr/bin/env -i "${env[@]}" \
		bash -c 'cd "$0" && exec bash "$@"' "$inside" "$@" || status=$?
	return "$status"
}

case "${1:-}" in
build)
	trixie_build
	cqrs_log "Debian 13 system ready in $ROOT"
	;;
run)
	shift
	[ $# -ge 1 ] || { echo "usage: $0 run SCRIPT [ARGS...]" >&2; exit 2; }
	script=$1
	shift
	trixie_run "test/$script" "$@"
	;;
shell)
	trixie_build
	chroot "$ROOT" /bin/bash
	;;
*)
	echo "usage: $0 build | run SCRIPT [ARGS...] | shell" >&2
	exit 2
	;;
esac
