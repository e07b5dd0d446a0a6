#!/usr/bin/env bash
# test/demo.sh: set everything up and run the demo.
#
# Installs what is missing (as root, with apt), builds and installs cqrs,
# starts a demo cluster with cqrs preloaded in /tmp/cqrs-demo (port 54320,
# unix socket only) and, when redis-server is installed, a Redis on
# 127.0.0.1:54321 the projector writes through to; creates the extension
# and an application role, sends commands through it (including a retry
# and rejected ones), shows the command log, then the read model the
# projector made of it and the same orders in Redis.  The cluster keeps
# running so you can look around; "bash test/demo.sh stop" stops it, and
# "bash test/demo.sh psql [ARGS...]" opens psql on it as the superuser.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

DEMO_DIR=${CQRS_DEMO_DIR:-/tmp/cqrs-demo}
DEMO_PORT=${CQRS_DEMO_PORT:-54320}

REDIS_DIR=$DEMO_DIR-redis
REDIS_PORT=${CQRS_DEMO_REDIS_PORT:-54321}

if [ "${1:-}" = psql ]; then
	# as the cluster's owner, from any user that can become it
	shift
	owner=$(stat -c %U "$DEMO_DIR/data" 2>/dev/null) || {
		cqrs_log "no demo cluster in $DEMO_DIR: start it with bash test/demo.sh"
		exit 1
	}
	cmd=("$("$PG_CONFIG" --bindir)/psql" -X -h "$DEMO_DIR" -p "$DEMO_PORT" -U postgres -d postgres "$@")
	if [ "$(id -un)" = "$owner" ]; then
		exec "${cmd[@]}"
	elif [ "$(id -u)" -eq 0 ]; then
		exec runuser -u "$owner" -- "${cmd[@]}"
	else
		exec sudo -u "$owner" -- "${cmd[@]}"
	fi
fi
cqrs_become_root "$@"

if [ "${1:-}" = stop ]; then
	cqrs_cluster_stop "$DEMO_DIR"
	cqrs_redis_stop "$REDIS_DIR"
	cqrs_log "demo cluster in $DEMO_DIR stopped"
	exit 0
fi

cqrs_install_deps
cqrs_build_install
redis_conf=()
if cqrs_redis_start "$REDIS_DIR" "$REDIS_PORT"; then
	cqrs_log "Redis on 127.0.0.1:$REDIS_PORT: the projector writes orders through to it"
	redis_conf=("cqrs.redis_url = 'redis://127.0.0.1:$REDIS_PORT'")
else
	cqrs_log "no redis-server: the demo runs without Redis write-through"
fi
cqrs_log "starting the demo cluster in $DEMO_DIR (port $DEMO_PORT)"
cqrs_cluster_start "$DEMO_DIR" "$DEMO_PORT" "${redis_conf[@]}"

psql_demo() {
	cqrs_as_pg "$("$PG_CONFIG" --bindir)/psql" -X -h "$DEMO_DIR" -p "$DEMO_PORT" \
		-U postgres -d postgres -v ON_ERROR_STOP=1 "$@"
}

psql_demo -q <<'SQL'
CREATE EXTENSION cqrs;
CREATE ROLE demo_app LOGIN IN ROLE cqrs_writer;
CREATE ROLE demo_report LOGIN IN ROLE cqrs_reader;
SQL

cqrs_log "commands sent by demo_app, a login role that only has cqrs_writer"
psql_demo -U demo_app -e <<'SQL'
-- A new order, a retry of the same command, a ship and a cancel.
SELECT * FROM cqrs.submit_order('order-1001', 'user-7', 249.90,
                                '0193a000-0000-7000-8000-000000001001');
SELECT * FROM cqrs.submit_order('order-1001', 'user-7', 249.90,
                                '0193a000-0000-7000-8000-000000001001');
SELECT * FROM cqrs.ship_order('order-1001');
SELECT * FROM cqrs.submit_order('order-1002', 'user-7', 15);
SELECT * FROM cqrs.cancel_order('order-1002', 'customer request');
-- A producer that cannot order its own submits names the sequence.
SELECT * FROM cqrs.ship_order('order-1003', sequence_id => 2);
SELECT * FROM cqrs.submit_order('order-1003', 'user-9', 80, sequence_id => 1);
-- Commands flowing: a burst of 1000 orders from one statement.
SELECT count(*) AS submitted
  FROM generate_series(1, 1000) AS i,
       LATERAL cqrs.submit_order('bulk-' || i, 'user-' || (i % 50), i * 1.25);
SQL

cqrs_log "rejected commands: clear errors, nothing written"
psql_demo -U demo_app -v ON_ERROR_STOP=0 -v VERBOSITY=default -e <<'SQL'
\set VERBOSITY default
SELECT * FROM cqrs.submit_order('order-1004', 'user-7', -5);
SELECT * FROM cqrs.submit_order('order-1001', 'user-8', 1);
INSERT INTO cqrs.command_log (command_id, command_type, aggregate_id, sequence_id, payload)
VALUES (cqrs.uuidv7(), 'CREATE_ORDER', 'forged', 1, '{}');
SQL

cqrs_log "the command log, as an administrator sees it"
psql_demo -e <<'SQL'
SELECT log_id, command_type, aggregate_id, sequence_id, payload
  FROM cqrs.command_log WHERE aggregate_id NOT LIKE 'bulk-%' ORDER BY log_id;
SELECT command_type, count(*) FROM cqrs.command_log GROUP BY 1 ORDER BY 1;
SQL

cqrs_log "waiting for the projector to apply everything committed so far"
lsn=$(psql_demo -At -c 'SELECT pg_current_wal_flush_lsn()')
for _ in $(seq 100); do
	[ "$(psql_demo -At -c "SELECT coalesce(applied_lsn >= '$lsn', false) FROM cqrs.status")" = t ] && break
	sleep 0.1
done

cqrs_log "the read model, as demo_report (cqrs_reader) sees it"
psql_demo -U demo_report -e <<'SQL'
SELECT order_id, user_id, total_amount, status, version
  FROM cqrs.read_model WHERE order_id NOT LIKE 'bulk-%' ORDER BY order_id;
SELECT status, count(*), sum(total_amount) FROM cqrs.read_model GROUP BY 1 ORDER BY 1;
SQL

cqrs_log "a cancel after the ship: refused by the projection, not lost"
psql_demo -U demo_app -q -c "SELECT sequence_id FROM cqrs.cancel_order('order-1001', 'too late')" >/dev/null
lsn=$(psql_demo -At -c 'SELECT pg_current_wal_flush_lsn()')
for _ in $(seq 100); do
	[ "$(psql_demo -At -c "SELECT coalesce(applied_lsn >= '$lsn', false) FROM cqrs.status")" = t ] && break
	sleep 0.1
done
psql_demo -e <<'SQL'
SELECT order_id, status, version FROM cqrs.read_model WHERE order_id = 'order-1001';
SELECT command_type, aggregate_id, sequence_id, reason FROM cqrs.dead_letter;
SELECT state, leader_pid, applied_lsn, lag_bytes, applied_total, parked, dead_letter, redis
  FROM cqrs.status;
SELECT count(*) AS differences FROM cqrs.verify();
SQL

if [ ${#redis_conf[@]} -gt 0 ]; then
	cqrs_log "the same orders in Redis, for cache-aside reads (GET order:<id>)"
	for id in order-1001 order-1002 order-1003; do
		echo "GET order:$id"
		redis-cli -p "$REDIS_PORT" GET "order:$id"
	done
	echo "keys written: $(redis-cli -p "$REDIS_PORT" --scan --pattern 'order:*' | wc -l)"
fi

cqrs_log "a second domain, declared in SQL only: bank accounts (examples/accounts.sql)"
psql_demo -q < "$CQRS_ROOT/examples/accounts.sql" >/dev/null
psql_demo -U demo_app -e <<'SQL'
SELECT sequence_id FROM cqrs.submit('OPEN_ACCOUNT', 'acct-100', '{"holder": "Grace"}');
SELECT sequence_id FROM cqrs.submit('DEPOSIT', 'acct-100', '{"amount": 120}');
SELECT sequence_id FROM cqrs.submit('WITHDRAW', 'acct-100', '{"amount": 20}');
-- more than the balance: refused by the account_balance projection
SELECT sequence_id FROM cqrs.submit('WITHDRAW', 'acct-100', '{"amount": 500}');
SELECT cqrs.wait_for_lsn(pg_current_wal_insert_lsn());
SQL
psql_demo -e <<'SQL'
SELECT account_id, holder, balance FROM bank.balance;
SELECT * FROM bank.activity;
SELECT command_type, aggregate_id, projection, sqlstate, reason
  FROM cqrs.dead_letter WHERE projection IS NOT NULL;
SELECT name, aggregate_type, target, aggregates, dead_letters FROM cqrs.projections;
SQL

cat <<EOF2

The demo cluster is running.  Connect with:
  bash test/demo.sh psql
Stop it with:
  bash test/demo.sh stop
EOF2
if [ ${#redis_conf[@]} -gt 0 ]; then
	echo "Redis: redis-cli -p $REDIS_PORT"
fi
