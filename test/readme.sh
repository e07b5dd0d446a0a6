#!/usr/bin/env bash
# test/readme.sh: the README's examples as a test.  Starts a fresh demo
# cluster with test/demo.sh (replacing one that runs), runs every example
# of README.md against it in order with test/readme.pl, comparing what
# each prints with what the README shows, and stops the demo cluster.
# Exit status 0 means every example gave what the README says.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$CQRS_ROOT"

cqrs_log "starting a fresh demo cluster for the README's examples"
if ! bash test/demo.sh > /tmp/cqrs-readme-demo.log 2>&1; then
	cat /tmp/cqrs-readme-demo.log
	echo "0 of 1 tests failed."
	exit 1
fi
trap 'bash test/demo.sh stop >/dev/null 2>&1 || true' EXIT

as_pg=""
[ "$(id -u)" -eq 0 ] && as_pg="runuser -u postgres --"
CQRS_PSQL="$("$PG_CONFIG" --bindir)/psql" CQRS_AS_PG="$as_pg" \
	perl test/readme.pl README.md
