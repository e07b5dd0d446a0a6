# test/bench/common.sh: what the benchmarks share.  Source it after
# test/lib.sh.  Starts nothing by itself.

BENCH_DIR=${CQRS_BENCH_DIR:-/tmp/cqrs-bench}
BENCH_PORT=${CQRS_BENCH_PORT:-54330}
BINDIR=$("$PG_CONFIG" --bindir)
BENCH_REDIS_DIR=$BENCH_DIR-redis
BENCH_REDIS_PORT=${CQRS_BENCH_REDIS_PORT:-54331}
BENCH_REDIS_URL="redis://127.0.0.1:$BENCH_REDIS_PORT"
BENCH_BOUNCER_DIR=$BENCH_DIR-pgbouncer
BENCH_BOUNCER_PORT=${CQRS_BENCH_BOUNCER_PORT:-54332}
# server connections PgBouncer keeps for the benchmark's clients
BENCH_BOUNCER_POOL=${BOUNCER_POOL:-4}
BENCH_WORK=$(mktemp -d /tmp/cqrs-bench-scripts.XXXXXX)
chmod 755 "$BENCH_WORK"
# Defaults of every benchmark: seconds per load, pgbench clients.
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-4}

# Install, build and start the benchmark cluster, sized so that no
# checkpoint or autovacuum falls into a measurement; stopped on exit.
# wal_compression as recommended in the README: random keys (order ids)
# make every first change of an index page after a checkpoint a full-page
# image.  WAL_COMPRESSION=off measures without it.  BENCH_CONF adds a
# postgresql.conf line (such as "cqrs.batch_delay = 0", to measure a
# setting's effect).
bench_start() {
	cqrs_install_deps
	cqrs_build_install
	cqrs_cluster_start "$BENCH_DIR" "$BENCH_PORT" \
		"shared_buffers = '1GB'" "max_wal_size = '16GB'" \
		"checkpoint_timeout = '1h'" "autovacuum = off" \
		"wal_compression = ${WAL_COMPRESSION:-lz4}" \
		${BENCH_CONF:+"$BENCH_CONF"} "$@"
	trap 'cqrs_cluster_stop "$BENCH_DIR"; cqrs_redis_stop "$BENCH_REDIS_DIR"; bench_pgbouncer_stop; rm -rf "$BENCH_WORK"' EXIT
}

# Debian's pgbouncer in front of the benchmark cluster, in transaction
# pooling mode with BENCH_BOUNCER_POOL server connections, listening on
# 127.0.0.1:$BENCH_BOUNCER_PORT; stopped with the cluster.
bench_pgbouncer_start() {
	cqrs_pgbouncer_start "$BENCH_BOUNCER_DIR" "$BENCH_BOUNCER_PORT" "$BENCH_DIR" \
		"$BENCH_PORT" "$BENCH_BOUNCER_POOL"
}
bench_pgbouncer_stop() { cqrs_pgbouncer_stop "$BENCH_BOUNCER_DIR"; }

# A redis-server beside the benchmark cluster ($BENCH_REDIS_URL), stopped
# with it.
bench_redis_start() {
	cqrs_redis_start "$BENCH_REDIS_DIR" "$BENCH_REDIS_PORT" || {
		cqrs_log "redis-server is needed"
		exit 1
	}
}

psql_bench() {
	cqrs_as_pg "$BINDIR/psql" -X -q -At -h "$BENCH_DIR" -p "$BENCH_PORT" \
		-U postgres -d postgres -v ON_ERROR_STOP=1 "$@"
}

# Fill the command log with $1 orders written straight into it, in three
# statements: every order created, half of them shipped, a quarter
# cancelled, and half of the shipped ones cancelled afterwards (an invalid
# transition, so a dead letter): 2 commands per order.
bench_fill_log() {
	psql_bench <<-SQL
	INSERT INTO cqrs.command_log (command_id, command_type, aggregate_id, sequence_id, payload)
	SELECT cqrs.uuidv7(), 'CREATE_ORDER', 'o' || g, 1,
	       jsonb_build_object('order_id', 'o' || g, 'user_id', 'u' || (g % 1000), 'amount', (g % 997 + 1) * 1.25)
	  FROM generate_series(1, $1) g;
	INSERT INTO cqrs.command_log (command_id, command_type, aggregate_id, sequence_id, payload)
	SELECT cqrs.uuidv7(), CASE WHEN g % 2 = 0 THEN 'SHIP_ORDER' ELSE 'CANCEL_ORDER' END, 'o' || g, 2,
	       CASE WHEN g % 2 = 0 THEN jsonb_build_object('order_id', 'o' || g)
	            ELSE jsonb_build_object('order_id', 'o' || g, 'reason', NULL) END
	  FROM generate_series(1, $1) g WHERE g % 4 <> 3;
	INSERT INTO cqrs.command_log (command_id, command_type, aggregate_id, sequence_id, payload)
	SELECT cqrs.uuidv7(), 'CANCEL_ORDER', 'o' || g, 3, jsonb_build_object('order_id', 'o' || g, 'reason', 'late')
	  FROM generate_series(1, $1) g WHERE g % 4 = 0;
	SQL
}

# Wait until the projector has applied everything committed so far.
bench_wait_projected() {
	until [ "$(psql_bench -c "SELECT applied_lsn >= pg_current_wal_flush_lsn() FROM cqrs.status")" = t ]; do
		sleep 0.2
	done
}

# The SQL of what users would build instead of cqrs: a log and a read
# table kept in step by an AFTER INSERT trigger (schema bench must exist).
bench_trigger_sql() {
	cat <<'SQL'
CREATE TABLE bench.trig_log (LIKE cqrs.command_log INCLUDING ALL);
CREATE TABLE bench.trig_model (LIKE cqrs.read_model INCLUDING ALL);
CREATE FUNCTION bench.upsert_model() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO bench.trig_model (order_id, user_id, total_amount, status, version, updated_at)
	VALUES (NEW.aggregate_id, NEW.payload ->> 'user_id', (NEW.payload ->> 'amount')::numeric,
	        'created', NEW.sequence_id, now())
	ON CONFLICT (order_id) DO UPDATE
	   SET status = excluded.status, version = excluded.version, updated_at = excluded.updated_at
	 WHERE bench.trig_model.version < excluded.version;
	RETURN NULL;
END $$;
CREATE TRIGGER upsert_model AFTER INSERT ON bench.trig_log
	FOR EACH ROW EXECUTE FUNCTION bench.upsert_model();
SQL
}

# Write a pgbench script named $1 from stdin.
bench_script() {
	cat > "$BENCH_WORK/$1.sql"
	chmod a+r "$BENCH_WORK/$1.sql"
}

# The INSERT of a new order into table $1 of the command log's row shape,
# for a pgbench script that set :r.
bench_log_insert() {
	cat <<SQL
INSERT INTO $1 (command_id, command_type, aggregate_id, sequence_id, payload)
VALUES (cqrs.uuidv7(), 'CREATE_ORDER', 'o' || :r, 1,
        jsonb_build_object('order_id', 'o' || :r, 'user_id', 'u' || :client_id, 'amount', 10.50));
SQL
}

# The baseline: a plain INSERT of the command log's row shape.
bench_scripts() {
	{
		echo '\set r random(1, 4000000000000000000)'
		bench_log_insert bench.plain
	} | bench_script plain
	bench_script submit <<'SQL'
\set r random(1, 4000000000000000000)
SELECT cqrs.submit_order('o' || :r, 'u' || :client_id, 10.50);
SQL
}

# A fresh log and baseline table, flushed.
bench_reset() {
	psql_bench <<'SQL'
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS cqrs;
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
 WHERE slot_name = 'cqrs' AND NOT active;
CREATE EXTENSION cqrs;
DROP SCHEMA IF EXISTS bench CASCADE;
CREATE SCHEMA bench;
CREATE TABLE bench.plain (LIKE cqrs.command_log INCLUDING ALL);
CHECKPOINT;
SQL
}

# Rate of one pgbench run: script $1, synchronous_commit $2, $DURATION s,
# $CLIENTS clients; further arguments go to pgbench.
bench_run() {
	local script=$1 sc=$2
	shift 2
	PGOPTIONS="-c synchronous_commit=$sc" cqrs_as_pg "$BINDIR/pgbench" \
		-h "$BENCH_DIR" -p "$BENCH_PORT" -U postgres -n -M prepared \
		-c "$CLIENTS" -j "$CLIENTS" -T "$DURATION" "$@" \
		-f "$BENCH_WORK/$script.sql" postgres 2>&1 |
		awk '/^tps = / { printf "%.0f\n", $3 }'
}

# Wait until the query $1 returns true.
wait_for() {
	until [ "$(psql_bench -c "$1")" = t ]; do sleep 0.02; done
}

# Seconds until everything committed up to now is projected.
catch_up() {
	local lsn t0
	lsn=$(psql_bench -c 'SELECT pg_current_wal_flush_lsn()')
	t0=$(date +%s.%N)
	wait_for "SELECT applied_lsn >= '$lsn' FROM cqrs.status"
	awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
verdict() { awk -v r="$1" -v t="$2" -v op="${3:->=}" 'BEGIN { ok = (op == "<=") ? r <= t : r >= t; print ok ? "met" : "MISSED" }'; }
