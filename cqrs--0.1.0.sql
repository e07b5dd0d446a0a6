\echo Use "CREATE EXTENSION cqrs" to load this file. \quit

-- cqrs--0.1.0.sql
--
-- Schema, tables, command functions and privileges of the cqrs extension.
-- Every object is schema-qualified and every operator spelled
-- OPERATOR(pg_catalog.x), so nothing here depends on the installer's
-- search_path.

-- The three roles cqrs grants to.  Roles are cluster-wide and outlive the
-- extension, so they are created only where missing (another database of
-- the cluster may already have created them).  They cannot log in; grant
-- them to login roles.
DO $roles$
BEGIN
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles
				   WHERE rolname OPERATOR(pg_catalog.=) 'cqrs_writer') THEN
		CREATE ROLE cqrs_writer NOLOGIN;
	END IF;
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles
				   WHERE rolname OPERATOR(pg_catalog.=) 'cqrs_reader') THEN
		CREATE ROLE cqrs_reader NOLOGIN;
	END IF;
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles
				   WHERE rolname OPERATOR(pg_catalog.=) 'cqrs_admin') THEN
		CREATE ROLE cqrs_admin NOLOGIN;
	END IF;
END
$roles$;

-- Fails when a schema of that name exists already: the extension never
-- adopts a schema somebody else owns.
CREATE SCHEMA cqrs;
COMMENT ON SCHEMA cqrs IS 'cqrs: command log, read model and their administration';

-- The command log: append-only, idempotent by command_id, ordered per
-- order by sequence_id.  Order and user ids, here and in the other tables,
-- use the "C" collation: they are keys, compared for equality and sorted by
-- bytes, and every index probe is then a memcmp(), not a locale comparison.
CREATE TABLE cqrs.command_log (
	log_id bigint GENERATED ALWAYS AS IDENTITY,
	command_id uuid NOT NULL,
	command_type text NOT NULL,
	aggregate_id text COLLATE pg_catalog."C" NOT NULL,
	sequence_id bigint NOT NULL,
	payload jsonb NOT NULL,
	created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	traceparent text,
	CONSTRAINT command_log_pkey PRIMARY KEY (log_id),
	CONSTRAINT command_log_command_id_key UNIQUE (command_id),
	CONSTRAINT command_log_aggregate_sequence_key
		UNIQUE (aggregate_id, sequence_id),
	CONSTRAINT command_log_command_type_check CHECK (
		command_type OPERATOR(pg_catalog.=) ANY
		(ARRAY['CREATE_ORDER', 'SHIP_ORDER', 'CANCEL_ORDER']::pg_catalog.text[])),
	CONSTRAINT command_log_sequence_id_check CHECK (
		sequence_id OPERATOR(pg_catalog.>=) 1)
);
COMMENT ON TABLE cqrs.command_log IS
	'Append-only log of every accepted command; written only by cqrs.submit_order(), cqrs.ship_order() and cqrs.cancel_order()';
COMMENT ON SEQUENCE cqrs.command_log_log_id_seq IS 'Generates command_log.log_id: the order in which commands were appended';
COMMENT ON COLUMN cqrs.command_log.command_id IS 'Idempotency key of the command';
COMMENT ON COLUMN cqrs.command_log.aggregate_id IS 'The order the command is about';
COMMENT ON COLUMN cqrs.command_log.traceparent IS 'W3C trace context of the session that submitted the command (cqrs.traceparent), or NULL';
COMMENT ON COLUMN cqrs.command_log.sequence_id IS 'Position of the command in its order: 1, 2, 3 ...';

CREATE FUNCTION cqrs.command_log_append_only()
RETURNS trigger
AS 'MODULE_PATHNAME', 'command_log_append_only'
LANGUAGE C;
COMMENT ON FUNCTION cqrs.command_log_append_only() IS
	'Trigger refusing UPDATE, DELETE and TRUNCATE on cqrs.command_log';

-- Statement-level, so it fires even when no row matches; ALWAYS, so
-- session_replication_role = replica does not switch it off.
CREATE TRIGGER command_log_append_only
	BEFORE UPDATE OR DELETE OR TRUNCATE ON cqrs.command_log
	FOR EACH STATEMENT EXECUTE FUNCTION cqrs.command_log_append_only();
ALTER TABLE cqrs.command_log ENABLE ALWAYS TRIGGER command_log_append_only;

-- The read model: one row per order, the fold of its commands.
CREATE TABLE cqrs.read_model (
	order_id text COLLATE pg_catalog."C" NOT NULL,
	user_id text COLLATE pg_catalog."C" NOT NULL,
	total_amount numeric NOT NULL,
	status text NOT NULL,
	version bigint NOT NULL,
	updated_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	CONSTRAINT read_model_pkey PRIMARY KEY (order_id),
	CONSTRAINT read_model_status_check CHECK (
		status OPERATOR(pg_catalog.=) ANY
		(ARRAY['created', 'shipped', 'cancelled']::pg_catalog.text[]))
);
CREATE INDEX read_model_user_id_idx ON cqrs.read_model (user_id);
COMMENT ON TABLE cqrs.read_model IS
	'Query side: one row per order, maintained by the cqrs projector';
COMMENT ON COLUMN cqrs.read_model.version IS
	'sequence_id of the last command applied to this order';

-- Where the projector stands, written in the transaction of the read-model
-- changes it covers.
CREATE TABLE cqrs.offset_tracking (
	slot_name text NOT NULL,
	last_lsn pg_catalog.pg_lsn NOT NULL,
	updated_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	CONSTRAINT offset_tracking_pkey PRIMARY KEY (slot_name)
);
COMMENT ON TABLE cqrs.offset_tracking IS
	'Position of the projector in the WAL, committed with the read-model changes';

-- Commands the projection could not apply.
CREATE TABLE cqrs.dead_letter (
	command_id uuid NOT NULL,
	command_type text,
	aggregate_id text COLLATE pg_catalog."C",
	sequence_id bigint,
	reason text NOT NULL,
	failed_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	traceparent text,
	CONSTRAINT dead_letter_pkey PRIMARY KEY (command_id)
);
COMMENT ON TABLE cqrs.dead_letter IS
	'Commands the projection could not apply, with the reason';

-- Commands waiting for a missing predecessor in their order.
CREATE TABLE cqrs.parked (
	aggregate_id text COLLATE pg_catalog."C" NOT NULL,
	sequence_id bigint NOT NULL,
	command_id uuid NOT NULL,
	waiting_for bigint NOT NULL,
	parked_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	log_id bigint,
	command_type text,
	payload jsonb,
	traceparent text,
	CONSTRAINT parked_pkey PRIMARY KEY (aggregate_id, sequence_id)
);
COMMENT ON TABLE cqrs.parked IS
	'Commands held back until the sequence_id they wait for is applied';

-- Operator decisions the projector obeys, kept in a table so that they
-- survive restarts.  One row.
CREATE TABLE cqrs.projector_state (
	singleton boolean NOT NULL DEFAULT true,
	paused boolean NOT NULL DEFAULT false,
	changed_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	changed_by name NOT NULL DEFAULT CURRENT_USER,
	CONSTRAINT projector_state_pkey PRIMARY KEY (singleton),
	CONSTRAINT projector_state_singleton_check CHECK (singleton)
);
INSERT INTO cqrs.projector_state DEFAULT VALUES;
COMMENT ON TABLE cqrs.projector_state IS
	'One row: whether projection is paused (cqrs.pause(), cqrs.resume()), since when and by whom';

-- Orders whose Redis key must be rewritten from the read model: recorded
-- in the transaction that changes the row when the projector cannot write
-- it through itself (Redis down, or a repair in another session), and
-- drained by the projector once Redis answers.
CREATE TABLE cqrs.redis_backlog (
	id bigint GENERATED ALWAYS AS IDENTITY,
	order_id text COLLATE pg_catalog."C" NOT NULL,
	queued_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	CONSTRAINT redis_backlog_pkey PRIMARY KEY (id)
);
COMMENT ON TABLE cqrs.redis_backlog IS
	'Orders whose Redis key the projector still has to write (cqrs.redis_url), oldest first';
COMMENT ON SEQUENCE cqrs.redis_backlog_id_seq IS 'Generates redis_backlog.id: the order in which entries were recorded';

CREATE TYPE cqrs.receipt AS (
	command_id uuid,
	log_id bigint,
	sequence_id bigint,
	duplicate boolean
);
COMMENT ON TYPE cqrs.receipt IS
	'What a command function returns: the command, its place in the log, and whether it was a repeat';

-- Command functions: validate in C, append, return.  They run the append
-- as the owner of cqrs.command_log, so callers need EXECUTE only, never a
-- privilege on the table.
CREATE FUNCTION cqrs.uuidv7()
RETURNS uuid
AS 'MODULE_PATHNAME', 'uuidv7'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION cqrs.uuidv7() IS
	'RFC 9562 version 7 UUID, monotonic within a session';

CREATE FUNCTION cqrs.submit_order(order_id text, user_id text, amount numeric,
								  command_id uuid DEFAULT NULL,
								  sequence_id bigint DEFAULT NULL)
RETURNS cqrs.receipt
AS 'MODULE_PATHNAME', 'submit_order'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs.submit_order(text, text, numeric, uuid, bigint) IS
	'Append a CREATE_ORDER command (sequence 1 of the order)';

CREATE FUNCTION cqrs.ship_order(order_id text,
								command_id uuid DEFAULT NULL,
								sequence_id bigint DEFAULT NULL)
RETURNS cqrs.receipt
AS 'MODULE_PATHNAME', 'ship_order'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs.ship_order(text, uuid, bigint) IS
	'Append a SHIP_ORDER command; sequence_id NULL takes the order''s next one';

CREATE FUNCTION cqrs.cancel_order(order_id text, reason text DEFAULT NULL,
								  command_id uuid DEFAULT NULL,
								  sequence_id bigint DEFAULT NULL)
RETURNS cqrs.receipt
AS 'MODULE_PATHNAME', 'cancel_order'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs.cancel_order(text, text, uuid, bigint) IS
	'Append a CANCEL_ORDER command; sequence_id NULL takes the order''s next one';

-- The projector's state, as the shared memory of this server has it.
CREATE FUNCTION cqrs.worker_status(
	OUT state text, OUT slot_name text, OUT leader_pid integer,
	OUT applied_lsn pg_catalog.pg_lsn, OUT lag_seconds double precision,
	OUT batch_size integer, OUT last_batch_size integer,
	OUT last_batch_ms double precision, OUT applied_total bigint,
	OUT batches_total bigint, OUT redis text, OUT last_error text,
	OUT last_error_at timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'worker_status'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION cqrs.worker_status() IS
	'Raw state of the cqrs projector; use the cqrs.status view';

CREATE FUNCTION cqrs.lag_histogram(OUT le_ms double precision, OUT commands bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'lag_histogram'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION cqrs.lag_histogram() IS
	'Commit-to-read-model latency of the commands projected since the server started, per bucket';

-- Operating the projector.
CREATE FUNCTION cqrs.pause()
RETURNS void
AS 'MODULE_PATHNAME', 'pause_projection'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs.pause() IS
	'Stop projecting after the current batch, until cqrs.resume(), across restarts; commands are still accepted';

CREATE FUNCTION cqrs.resume()
RETURNS void
AS 'MODULE_PATHNAME', 'resume_projection'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs.resume() IS
	'Project again after cqrs.pause(), catching up from where it stopped';

-- Read-your-writes fences.
CREATE FUNCTION cqrs.wait_for(command_id uuid,
							  timeout interval DEFAULT '5 seconds')
RETURNS boolean
AS 'MODULE_PATHNAME', 'wait_for'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs.wait_for(uuid, interval) IS
	'Wait until the command is processed (applied or dead-lettered); false at the timeout.  Works on a standby';

CREATE FUNCTION cqrs.wait_for_lsn(lsn pg_catalog.pg_lsn,
								  timeout interval DEFAULT '5 seconds')
RETURNS boolean
AS 'MODULE_PATHNAME', 'wait_for_lsn'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs.wait_for_lsn(pg_catalog.pg_lsn, interval) IS
	'Wait until every command committed up to the LSN is projected; false at the timeout';

-- Repair and rebuild.
CREATE FUNCTION cqrs.retry_dead_letter(command_id uuid)
RETURNS boolean
AS 'MODULE_PATHNAME', 'retry_dead_letter'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs.retry_dead_letter(uuid) IS
	'Project a dead-lettered command again after a fix; true when applied, false when dead-lettered again';

CREATE FUNCTION cqrs.skip_parked(command_id uuid)
RETURNS boolean
AS 'MODULE_PATHNAME', 'skip_parked'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs.skip_parked(uuid) IS
	'Stop waiting for the missing predecessor of a parked command: move it to cqrs.dead_letter';

CREATE FUNCTION cqrs.rebuild()
RETURNS bigint
AS 'MODULE_PATHNAME', 'rebuild'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs.rebuild() IS
	'Replay the whole command log into the read model in one transaction (readers see the old rows until it commits); returns the commands replayed';

-- Metrics, for psql and for Prometheus.
CREATE FUNCTION cqrs.metrics(OUT name text, OUT labels jsonb,
							 OUT value double precision)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'metrics'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs.metrics() IS
	'Counters and gauges of the command path and the projector, one row per sample';

CREATE FUNCTION cqrs.prometheus()
RETURNS text
AS 'MODULE_PATHNAME', 'prometheus'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION cqrs.prometheus() IS
	'cqrs.metrics() in the Prometheus text exposition format, with HELP and TYPE lines';

CREATE VIEW cqrs.status AS
SELECT w.state,
	   w.leader_pid,
	   w.slot_name,
	   w.applied_lsn,
	   CASE WHEN w.applied_lsn IS NOT NULL THEN
		   pg_catalog.int8(GREATEST(0::pg_catalog.numeric,
			   pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_flush_lsn(),
										  w.applied_lsn)))
	   END AS lag_bytes,
	   w.lag_seconds,
	   w.batch_size,
	   w.last_batch_size,
	   w.last_batch_ms,
	   w.applied_total,
	   (SELECT pg_catalog.count(*) FROM cqrs.parked) AS parked,
	   (SELECT pg_catalog.count(*) FROM cqrs.dead_letter) AS dead_letter,
	   w.redis,
	   w.last_error,
	   w.last_error_at
  FROM cqrs.worker_status() AS w;
COMMENT ON VIEW cqrs.status IS
	'One row: what the cqrs projector is doing, how far behind it is, and its last error';

-- Recompute every order from the log, set-based and independently of the
-- projector's code, and report where the read model differs.
CREATE FUNCTION cqrs.verify()
RETURNS TABLE (order_id text, problem text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
	SELECT COALESCE(e.order_id, r.order_id),
		   CASE
			   WHEN r.order_id IS NULL THEN 'missing from the read model'
			   WHEN e.order_id IS NULL THEN 'in the read model but not created by the log'
			   ELSE pg_catalog.concat_ws('; ',
				   CASE WHEN r.status IS DISTINCT FROM e.status THEN
					   pg_catalog.format('status is %s, the log says %s', r.status, e.status) END,
				   CASE WHEN r.version IS DISTINCT FROM e.version THEN
					   pg_catalog.format('version is %s, the log says %s', r.version, e.version) END,
				   CASE WHEN r.user_id IS DISTINCT FROM e.user_id THEN
					   pg_catalog.format('user_id is %s, the log says %s', r.user_id, e.user_id) END,
				   CASE WHEN r.total_amount IS DISTINCT FROM e.total_amount THEN
					   pg_catalog.format('total_amount is %s, the log says %s', r.total_amount, e.total_amount) END)
		   END
	  FROM (
		-- per order: the commands up to the first gap (its applied
		-- prefix), folded: created by a valid sequence 1, status set by the
		-- first ship or cancel after it, version the prefix's last sequence
		SELECT f.aggregate_id AS order_id,
			   f.user_id,
			   CAST(f.amount AS pg_catalog.numeric) AS total_amount,
			   CASE f.first_transition
				   WHEN 'SHIP_ORDER' THEN 'shipped'
				   WHEN 'CANCEL_ORDER' THEN 'cancelled'
				   ELSE 'created'
			   END AS status,
			   f.version
		  FROM (
			SELECT n.aggregate_id,
				   pg_catalog.bool_or(n.sequence_id OPERATOR(pg_catalog.=) 1
					   AND n.command_type OPERATOR(pg_catalog.=) 'CREATE_ORDER'
					   AND pg_catalog.jsonb_typeof(n.payload OPERATOR(pg_catalog.->) 'user_id')
						   OPERATOR(pg_catalog.=) 'string'
					   AND pg_catalog.jsonb_typeof(n.payload OPERATOR(pg_catalog.->) 'amount')
						   OPERATOR(pg_catalog.=) 'number') AS created,
				   pg_catalog.max(n.payload OPERATOR(pg_catalog.->>) 'user_id')
					   FILTER (WHERE n.sequence_id OPERATOR(pg_catalog.=) 1) AS user_id,
				   pg_catalog.max(n.payload OPERATOR(pg_catalog.->>) 'amount')
					   FILTER (WHERE n.sequence_id OPERATOR(pg_catalog.=) 1) AS amount,
				   (pg_catalog.array_agg(n.command_type ORDER BY n.sequence_id)
					   FILTER (WHERE n.sequence_id OPERATOR(pg_catalog.>) 1
						   AND n.command_type OPERATOR(pg_catalog.=) ANY
							   (ARRAY['SHIP_ORDER', 'CANCEL_ORDER']::pg_catalog.text[])))[1]
					   AS first_transition,
				   pg_catalog.max(n.sequence_id) AS version
			  FROM (
				SELECT l.aggregate_id, l.sequence_id, l.command_type, l.payload,
					   l.sequence_id OPERATOR(pg_catalog.=) pg_catalog.row_number()
						   OVER (PARTITION BY l.aggregate_id ORDER BY l.sequence_id)
						   AS in_prefix
				  FROM cqrs.command_log AS l
			  ) AS n
			 WHERE n.in_prefix
			 GROUP BY n.aggregate_id
		  ) AS f
		 WHERE f.created
	  ) AS e
	  FULL JOIN cqrs.read_model AS r ON r.order_id OPERATOR(pg_catalog.=) e.order_id
	 WHERE r.order_id IS NULL OR e.order_id IS NULL
		OR r.status IS DISTINCT FROM e.status
		OR r.version IS DISTINCT FROM e.version
		OR r.user_id IS DISTINCT FROM e.user_id
		OR r.total_amount IS DISTINCT FROM e.total_amount
	 ORDER BY 1;
END;
COMMENT ON FUNCTION cqrs.verify() IS
	'Orders where the read model differs from the fold of the command log; no rows means consistent';

-- Privileges: nothing for PUBLIC, then exactly what each role needs.
REVOKE ALL ON SCHEMA cqrs FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA cqrs FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA cqrs FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA cqrs FROM PUBLIC;
REVOKE ALL ON TYPE cqrs.receipt FROM PUBLIC;

GRANT USAGE ON SCHEMA cqrs TO cqrs_writer, cqrs_reader, cqrs_admin;
GRANT USAGE ON TYPE cqrs.receipt TO cqrs_writer, cqrs_admin;

-- Writers submit through the functions only.
GRANT EXECUTE ON FUNCTION
	cqrs.uuidv7(),
	cqrs.submit_order(text, text, numeric, uuid, bigint),
	cqrs.ship_order(text, uuid, bigint),
	cqrs.cancel_order(text, text, uuid, bigint)
	TO cqrs_writer;

-- Readers see the query side only.
GRANT SELECT ON cqrs.read_model TO cqrs_reader;

-- Any client may wait for its own writes to be projected.
GRANT EXECUTE ON FUNCTION
	cqrs.wait_for(uuid, interval),
	cqrs.wait_for_lsn(pg_catalog.pg_lsn, interval)
	TO cqrs_writer, cqrs_reader, cqrs_admin;

-- Operators see everything and repair through functions; they do not
-- write the log directly either.
GRANT SELECT ON ALL TABLES IN SCHEMA cqrs TO cqrs_admin;
GRANT EXECUTE ON FUNCTION cqrs.uuidv7(), cqrs.worker_status(), cqrs.verify(),
	cqrs.lag_histogram(), cqrs.pause(), cqrs.resume(), cqrs.metrics(),
	cqrs.prometheus(), cqrs.retry_dead_letter(uuid), cqrs.skip_parked(uuid),
	cqrs.rebuild() TO cqrs_admin;

-- Monitoring agents (pg_monitor, as for the server's own statistics) read
-- the metrics and nothing else.
GRANT USAGE ON SCHEMA cqrs TO pg_monitor;
GRANT EXECUTE ON FUNCTION cqrs.metrics(), cqrs.prometheus() TO pg_monitor;
