/* cqrs--0.1.0--0.2.0.sql */

\echo Use "ALTER EXTENSION cqrs UPDATE TO '0.2.0'" to load this file. \quit

-- pg_dump leaves an extension's tables out of a dump unless marked: the
-- command log is the source of truth, so a backup made the usual way
-- (pg_dump, pg_dump -Fc with pg_restore) must carry every command and the
-- position of its log_id sequence.  Everything else the projector derives
-- from the log: a restored server's projector folds the log into the
-- read model, the dead letters and the parked commands by itself.
SELECT pg_catalog.pg_extension_config_dump('cqrs.command_log', '');
SELECT pg_catalog.pg_extension_config_dump('cqrs.command_log_log_id_seq', '');

-- The pause (cqrs.pause()) is an operator's decision a restore must keep.
-- The table's row is written by the first pause, not by the installation:
-- a row the installation made would collide with the dumped one.  No row
-- means projection runs, as a row saying so did.
DELETE FROM cqrs.projector_state WHERE NOT paused;
SELECT pg_catalog.pg_extension_config_dump('cqrs.projector_state', '');
COMMENT ON TABLE cqrs.projector_state IS
	'At most one row, written by cqrs.pause() and cqrs.resume(): whether projection is paused, since when and by whom (no row: running)';

-- Whoever changes the table (a pause, a resume, the restore of a dump),
-- the projectors read it again once the change commits.
CREATE FUNCTION cqrs.projector_state_changed()
RETURNS trigger
AS 'MODULE_PATHNAME', 'projector_state_changed'
LANGUAGE C;
REVOKE ALL ON FUNCTION cqrs.projector_state_changed() FROM PUBLIC;
COMMENT ON FUNCTION cqrs.projector_state_changed() IS
	'Trigger telling the projectors that cqrs.projector_state changed, at commit';
CREATE TRIGGER projector_state_changed
	AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON cqrs.projector_state
	FOR EACH STATEMENT EXECUTE FUNCTION cqrs.projector_state_changed();

-- What the functions now say about commands in flight and unknown ids.
COMMENT ON FUNCTION cqrs.wait_for(uuid, interval) IS
	'Wait until the command is processed (applied or dead-lettered); false at the timeout.  A command not in the log is an error on the primary; a standby waits for it';
COMMENT ON FUNCTION cqrs.retry_dead_letter(uuid) IS
	'Project a dead-lettered command again after a fix; true when applied, false when dead-lettered again; an error when it is not dead-lettered';
COMMENT ON FUNCTION cqrs.skip_parked(uuid) IS
	'Stop waiting for the missing predecessor of a parked command: move it to cqrs.dead_letter; an error when it is not parked';
COMMENT ON FUNCTION cqrs.lag_histogram() IS
	'Commit-to-read-model latency of the commands projected from the slot since the server started, per bucket; commands applied by folding the log are not counted';
COMMENT ON FUNCTION cqrs.verify() IS
	'Orders where the read model differs from the fold of the command log, commands not yet projected included; no rows means consistent';

-- Domains declared in SQL.  An aggregate type names a kind of aggregate
-- (orders, accounts); a command type acts on one aggregate type, and
-- "creates" ones come first (sequence 1).  Aggregate ids are one namespace
-- across types, as stream names are in an event store: an aggregate is of
-- the type of its first command.  Rows are written only by the functions
-- below, which record the calling role as the owner: a validator runs as
-- that role.  The built-in orders domain is declared here too.
CREATE TABLE cqrs.aggregate_type (
	name text COLLATE pg_catalog."C" NOT NULL,
	owner pg_catalog.regrole NOT NULL,
	builtin boolean NOT NULL DEFAULT false,
	created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	CONSTRAINT aggregate_type_pkey PRIMARY KEY (name)
);
COMMENT ON TABLE cqrs.aggregate_type IS
	'Kinds of aggregate commands act on; written by cqrs.create_aggregate_type() and cqrs.drop_aggregate_type()';

CREATE TABLE cqrs.command_type (
	name text COLLATE pg_catalog."C" NOT NULL,
	aggregate_type text COLLATE pg_catalog."C" NOT NULL,
	creates boolean NOT NULL,
	-- a type and a function, kept by their qualified names and resolved
	-- when read: pg_upgrade refuses tables with regprocedure columns, and
	-- a type or function dropped and made again is found again
	payload_type text,
	validator text,
	owner pg_catalog.regrole NOT NULL,
	builtin boolean NOT NULL DEFAULT false,
	created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	CONSTRAINT command_type_pkey PRIMARY KEY (name)
);
-- No foreign key to cqrs.aggregate_type: pg_restore -j loads the two
-- tables' dumped rows in parallel, in any order.  The functions keep the
-- reference: a command type names an existing aggregate type, and an
-- aggregate type with command types cannot be dropped.
COMMENT ON TABLE cqrs.command_type IS
	'Commands cqrs.submit() accepts: their aggregate type, whether they create it, the composite type their payload must fit and an optional validator; written by cqrs.create_command_type() and cqrs.drop_command_type()';

INSERT INTO cqrs.aggregate_type (name, owner, builtin)
	VALUES ('order', CAST(CAST(CURRENT_USER AS text) AS pg_catalog.regrole), true);
INSERT INTO cqrs.command_type (name, aggregate_type, creates, owner, builtin)
	VALUES ('CREATE_ORDER', 'order', true, CAST(CAST(CURRENT_USER AS text) AS pg_catalog.regrole), true),
		   ('SHIP_ORDER', 'order', false, CAST(CAST(CURRENT_USER AS text) AS pg_catalog.regrole), true),
		   ('CANCEL_ORDER', 'order', false, CAST(CAST(CURRENT_USER AS text) AS pg_catalog.regrole), true);

-- Users' definitions go into dumps; the built-in ones come with the
-- extension.
SELECT pg_catalog.pg_extension_config_dump('cqrs.aggregate_type', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('cqrs.command_type', 'WHERE NOT builtin');

-- Whoever changes the definitions, every backend reads them again from
-- its next command once the change commits.
CREATE FUNCTION cqrs.command_type_changed()
RETURNS trigger
AS 'MODULE_PATHNAME', 'command_type_changed'
LANGUAGE C;
REVOKE ALL ON FUNCTION cqrs.command_type_changed() FROM PUBLIC;
COMMENT ON FUNCTION cqrs.command_type_changed() IS
	'Trigger making every backend read cqrs.command_type again, at commit';
CREATE TRIGGER command_type_changed
	AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON cqrs.command_type
	FOR EACH STATEMENT EXECUTE FUNCTION cqrs.command_type_changed();

-- The log takes any declared command type; cqrs.submit() checks it.
ALTER TABLE cqrs.command_log DROP CONSTRAINT command_log_command_type_check;
COMMENT ON TABLE cqrs.command_log IS
	'Append-only log of every accepted command; written only by the command functions';
COMMENT ON COLUMN cqrs.command_log.aggregate_id IS
	'The aggregate the command is about (for the built-in commands, the order)';

CREATE FUNCTION cqrs.create_aggregate_type(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'create_aggregate_type'
LANGUAGE C;
COMMENT ON FUNCTION cqrs.create_aggregate_type(text) IS
	'Declare a kind of aggregate, owned by the calling role';

CREATE FUNCTION cqrs.create_command_type(name text, aggregate_type text,
		creates boolean, payload_type pg_catalog.regtype DEFAULT NULL,
		validator pg_catalog.regprocedure DEFAULT NULL)
RETURNS void
AS 'MODULE_PATHNAME', 'create_command_type'
LANGUAGE C;
COMMENT ON FUNCTION cqrs.create_command_type(text, text, boolean, pg_catalog.regtype, pg_catalog.regprocedure) IS
	'Declare a command type: its aggregate type, whether it creates the aggregate, the composite type its payload must fit, and a validator (aggregate_id text, payload jsonb) RETURNS void run as the calling role';

CREATE FUNCTION cqrs.drop_command_type(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'drop_command_type'
LANGUAGE C;
COMMENT ON FUNCTION cqrs.drop_command_type(text) IS
	'Drop a declared command type that no command in the log has';

CREATE FUNCTION cqrs.drop_aggregate_type(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'drop_aggregate_type'
LANGUAGE C;
COMMENT ON FUNCTION cqrs.drop_aggregate_type(text) IS
	'Drop a declared aggregate type that no command type acts on';

CREATE FUNCTION cqrs.submit(command_type text, aggregate_id text,
		payload jsonb, command_id uuid DEFAULT NULL,
		sequence_id bigint DEFAULT NULL)
RETURNS cqrs.receipt
AS 'MODULE_PATHNAME', 'submit'
LANGUAGE C;
COMMENT ON FUNCTION cqrs.submit(text, text, jsonb, uuid, bigint) IS
	'Validate a command of any declared type and append it to cqrs.command_log';

REVOKE ALL ON cqrs.aggregate_type, cqrs.command_type FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs.create_aggregate_type(text),
	cqrs.create_command_type(text, text, boolean, pg_catalog.regtype, pg_catalog.regprocedure),
	cqrs.drop_command_type(text), cqrs.drop_aggregate_type(text),
	cqrs.submit(text, text, jsonb, uuid, bigint) FROM PUBLIC;
GRANT SELECT ON cqrs.aggregate_type, cqrs.command_type TO cqrs_admin, cqrs_writer;
GRANT EXECUTE ON FUNCTION cqrs.create_aggregate_type(text),
	cqrs.create_command_type(text, text, boolean, pg_catalog.regtype, pg_catalog.regprocedure),
	cqrs.drop_command_type(text), cqrs.drop_aggregate_type(text) TO cqrs_admin;
GRANT EXECUTE ON FUNCTION cqrs.submit(text, text, jsonb, uuid, bigint) TO cqrs_writer;

-- Declared projections.  A projection folds the commands of one aggregate
-- type into a table of its own, one row per aggregate keyed by the
-- aggregate id, with an apply function (state, command) RETURNS state
-- called for each command in sequence order, as the role that declared
-- it.  The built-in orders projection (cqrs.read_model) is listed too; its
-- apply function is compiled into the projector.
CREATE TABLE cqrs.projection (
	name text COLLATE pg_catalog."C" NOT NULL,
	aggregate_type text COLLATE pg_catalog."C" NOT NULL,
	-- qualified names, resolved when read (as in cqrs.command_type)
	target text NOT NULL,
	key_column name NOT NULL,
	apply_function text NOT NULL,
	owner pg_catalog.regrole NOT NULL,
	builtin boolean NOT NULL DEFAULT false,
	created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	CONSTRAINT projection_pkey PRIMARY KEY (name)
);
COMMENT ON TABLE cqrs.projection IS
	'Projections the projector maintains: the aggregate type each follows, its target table and key column, and the apply function folded over each aggregate''s commands; written by cqrs.create_projection() and cqrs.drop_projection()';

-- How far each declared projection has applied each aggregate's commands:
-- kept apart from the target table, so that an apply function returning
-- NULL (the row deleted) keeps its aggregate's place in the sequence.  A
-- row with the aggregate id '' marks a projection whose versions are
-- there: a restore may load the definition before them.
CREATE TABLE cqrs.projection_version (
	projection text COLLATE pg_catalog."C" NOT NULL,
	aggregate_id text COLLATE pg_catalog."C" NOT NULL,
	version bigint NOT NULL,
	CONSTRAINT projection_version_pkey PRIMARY KEY (projection, aggregate_id)
);
COMMENT ON TABLE cqrs.projection_version IS
	'The sequence_id up to which each declared projection has applied each aggregate''s commands';

-- The built-in projection's rules as an apply function, registered like
-- any other; the projector runs the same rules in its set-based C fold.
CREATE FUNCTION cqrs.apply_order(state cqrs.read_model, command cqrs.command_log)
RETURNS cqrs.read_model
AS 'MODULE_PATHNAME', 'apply_order'
LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION cqrs.apply_order(cqrs.read_model, cqrs.command_log) IS
	'The orders'' projection rules as an apply function: the order after the command (an error for a command the rules refuse)';
REVOKE ALL ON FUNCTION cqrs.apply_order(cqrs.read_model, cqrs.command_log) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs.apply_order(cqrs.read_model, cqrs.command_log)
	TO cqrs_admin, cqrs_reader;

INSERT INTO cqrs.projection (name, aggregate_type, target, key_column, apply_function, owner, builtin)
	VALUES ('orders', 'order', 'cqrs.read_model', 'order_id',
			'cqrs.apply_order(cqrs.read_model,cqrs.command_log)',
			CAST(CAST(CURRENT_USER AS text) AS pg_catalog.regrole), true);

-- A declared projection's table is the user's, and pg_dump dumps it: its
-- versions must come along, consistent with it (one snapshot).
SELECT pg_catalog.pg_extension_config_dump('cqrs.projection', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('cqrs.projection_version', '');

COMMENT ON FUNCTION cqrs.command_type_changed() IS
	'Trigger making every backend read the definitions in the table it is on again, at commit';
CREATE TRIGGER projection_changed
	AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON cqrs.projection
	FOR EACH STATEMENT EXECUTE FUNCTION cqrs.command_type_changed();

-- What a declared projection's apply function gets: the command's
-- created_at, for a parked command too.
ALTER TABLE cqrs.parked ADD COLUMN created_at timestamptz;

-- Redis keys of declared projections wait in the backlog too.
ALTER TABLE cqrs.redis_backlog ADD COLUMN projection text;
COMMENT ON COLUMN cqrs.redis_backlog.projection IS
	'The declared projection whose key <projection>:<aggregate id> is to be written; NULL for an order (key order:<order_id>)';
COMMENT ON TABLE cqrs.redis_backlog IS
	'Keys the projector still has to write to Redis (cqrs.redis_url), oldest first: orders, and aggregates of declared projections';

-- Which projection refused a command, and with which SQLSTATE.
ALTER TABLE cqrs.dead_letter ADD COLUMN projection text,
	ADD COLUMN sqlstate text;
COMMENT ON COLUMN cqrs.dead_letter.projection IS
	'The declared projection whose apply function or table refused the command; NULL for the built-in orders projection';
COMMENT ON COLUMN cqrs.dead_letter.sqlstate IS
	'SQLSTATE of the error that refused the command; NULL for a rule of the built-in orders projection';

CREATE FUNCTION cqrs.create_projection(name text, aggregate_type text,
		target pg_catalog.regclass, key_column name,
		apply_function pg_catalog.regprocedure)
RETURNS bigint
AS 'MODULE_PATHNAME', 'create_projection'
LANGUAGE C;
COMMENT ON FUNCTION cqrs.create_projection(text, text, pg_catalog.regclass, name, pg_catalog.regprocedure) IS
	'Declare a projection of an aggregate type into a table, owned by the calling role, and fill the table from the whole command log; returns the number of commands folded';

CREATE FUNCTION cqrs.drop_projection(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'drop_projection'
LANGUAGE C;
COMMENT ON FUNCTION cqrs.drop_projection(text) IS
	'Stop maintaining a declared projection; its table and rows stay, its versions and dead letters go';

CREATE FUNCTION cqrs.rebuild(projection text)
RETURNS bigint
AS 'MODULE_PATHNAME', 'rebuild_projection'
LANGUAGE C;
COMMENT ON FUNCTION cqrs.rebuild(text) IS
	'Replay the command log into one projection''s table in one transaction; returns the number of commands replayed';

CREATE FUNCTION cqrs.verify(projection text)
RETURNS TABLE (aggregate_id text, expected text, actual text)
AS 'MODULE_PATHNAME', 'verify_projection'
LANGUAGE C;
COMMENT ON FUNCTION cqrs.verify(text) IS
	'Aggregates whose row in a projection''s table differs from the fold of the command log (as text, NULL for no row); no rows means consistent';

CREATE VIEW cqrs.projections AS
	SELECT p.name, p.aggregate_type, p.target, p.key_column, p.apply_function,
		   p.owner, p.builtin,
		   CASE WHEN p.builtin
				THEN (SELECT pg_catalog.count(*) FROM cqrs.read_model)
				ELSE (SELECT pg_catalog.count(*) FROM cqrs.projection_version AS v
					  WHERE v.projection OPERATOR(pg_catalog.=) p.name
					  AND v.aggregate_id OPERATOR(pg_catalog.<>) '')
		   END AS aggregates,
		   (SELECT pg_catalog.count(*) FROM cqrs.dead_letter AS d
			WHERE d.projection OPERATOR(pg_catalog.=) p.name
			   OR (p.builtin AND d.projection IS NULL)) AS dead_letters
	FROM cqrs.projection AS p;
COMMENT ON VIEW cqrs.projections IS
	'Every projection, with how many aggregates it has folded and how many of its commands are dead-lettered';

REVOKE ALL ON cqrs.projection, cqrs.projection_version, cqrs.projections FROM PUBLIC;
REVOKE ALL ON FUNCTION cqrs.create_projection(text, text, pg_catalog.regclass, name, pg_catalog.regprocedure),
	cqrs.drop_projection(text), cqrs.rebuild(text), cqrs.verify(text) FROM PUBLIC;
GRANT SELECT ON cqrs.projection, cqrs.projection_version, cqrs.projections TO cqrs_admin;
GRANT SELECT ON cqrs.projection, cqrs.projections TO cqrs_reader;
GRANT EXECUTE ON FUNCTION cqrs.create_projection(text, text, pg_catalog.regclass, name, pg_catalog.regprocedure),
	cqrs.drop_projection(text), cqrs.rebuild(text), cqrs.verify(text) TO cqrs_admin;

-- OpenTelemetry: the finished spans waiting in shared memory (trace.c).
-- They name commands and aggregates, so only cqrs_admin reads them.
CREATE FUNCTION cqrs.spans(consume boolean DEFAULT false,
	OUT trace_id text, OUT span_id text, OUT parent_span_id text,
	OUT name text, OUT kind text, OUT start_time timestamptz,
	OUT end_time timestamptz, OUT status text, OUT attributes jsonb,
	OUT links jsonb)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'spans'
LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION cqrs.spans(boolean) IS
	'Finished OpenTelemetry spans not exported yet, oldest first; consume => true takes them out';
REVOKE ALL ON FUNCTION cqrs.spans(boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs.spans(boolean) TO cqrs_admin;
