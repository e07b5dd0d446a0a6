-- Projections declared in SQL: their definitions and the errors that
-- refuse a bad one, the fill from the log when one is created, verify and
-- rebuild, dead letters of a failing apply function, and the role apply
-- functions run as.  (No projector runs in this database: every fold here
-- is the creating or rebuilding session's own.)
\set VERBOSITY default
SET client_min_messages = warning;

CREATE ROLE regress_proj_admin IN ROLE cqrs_admin;
CREATE ROLE regress_proj_other IN ROLE cqrs_admin;
CREATE ROLE regress_proj_app IN ROLE cqrs_writer;
CREATE SCHEMA regress_ledger AUTHORIZATION regress_proj_admin;
GRANT USAGE ON SCHEMA regress_ledger TO PUBLIC;

SET ROLE regress_proj_admin;
SELECT cqrs.create_aggregate_type('ledger');
SELECT cqrs.create_command_type('OPEN_LEDGER', 'ledger', true);
SELECT cqrs.create_command_type('POST', 'ledger', false);
CREATE TABLE regress_ledger.totals (
	ledger_id text PRIMARY KEY,
	total numeric NOT NULL CHECK (total < 1000),
	entries integer NOT NULL,
	applied_by name
);
CREATE FUNCTION regress_ledger.apply_total(state regress_ledger.totals,
		command cqrs.command_log)
RETURNS regress_ledger.totals LANGUAGE plpgsql AS $$
BEGIN
	IF command.command_type = 'OPEN_LEDGER' THEN
		state := ROW(command.aggregate_id, 0, 0, current_user);
		RETURN state;
	END IF;
	IF command.payload ? 'close' THEN
		RETURN NULL;
	END IF;
	IF command.payload ->> 'amount' = 'boom' THEN
		RAISE EXCEPTION 'boom at sequence %', command.sequence_id;
	END IF;
	state.total := state.total + (command.payload ->> 'amount')::numeric;
	state.entries := state.entries + 1;
	state.applied_by := current_user;
	RETURN state;
END $$;
RESET ROLE;

-- Commands logged before the projection exists are folded when it is made.
SET ROLE regress_proj_app;
SELECT (cqrs.submit('OPEN_LEDGER', 'L1', '{}')).sequence_id;
SELECT (cqrs.submit('POST', 'L1', '{"amount": 10}')).sequence_id;
-- the apply function raises: dead-lettered, the others still apply
SELECT (cqrs.submit('POST', 'L1', '{"amount": "boom"}')).sequence_id;
SELECT (cqrs.submit('POST', 'L1', '{"amount": 5}')).sequence_id;
-- the table's CHECK refuses the row the apply function returns
SELECT (cqrs.submit('POST', 'L1', '{"amount": 2000}')).sequence_id;
SELECT (cqrs.submit('POST', 'L1', '{"amount": 1}')).sequence_id;
SELECT (cqrs.submit('OPEN_LEDGER', 'L2', '{}')).sequence_id;
-- a NULL result deletes the row, and the version stays
SELECT (cqrs.submit('POST', 'L2', '{"close": true}')).sequence_id;
-- a row for no aggregate (the state was NULL) is refused
SELECT (cqrs.submit('POST', 'L2', '{"amount": 1}')).sequence_id;
SELECT (cqrs.submit('OPEN_LEDGER', 'L3', '{}')).sequence_id;
-- a gap: sequence 3 waits for 2
SELECT (cqrs.submit('POST', 'L3', '{"amount": 7}', sequence_id => 3)).sequence_id;
RESET ROLE;

-- Only cqrs_admin declares projections.
SET ROLE regress_proj_app;
SELECT cqrs.create_projection('ledger_totals', 'ledger', 'regress_ledger.totals',
	'ledger_id', 'regress_ledger.apply_total(regress_ledger.totals, cqrs.command_log)');
\echo :SQLSTATE
RESET ROLE;

SET ROLE regress_proj_admin;
-- What a definition must be.
CREATE TABLE regress_ledger.int_key (ledger_id integer PRIMARY KEY, total numeric);
CREATE TABLE regress_ledger.no_key (ledger_id text, total numeric);
CREATE VIEW regress_ledger.a_view AS SELECT * FROM regress_ledger.totals;
CREATE FUNCTION regress_ledger.wrong_shape(state regress_ledger.totals, command jsonb)
RETURNS regress_ledger.totals LANGUAGE sql AS 'SELECT state';
CREATE FUNCTION regress_ledger.strict_apply(state regress_ledger.totals, command cqrs.command_log)
RETURNS regress_ledger.totals LANGUAGE sql STRICT AS 'SELECT state';
CREATE FUNCTION regress_ledger.int_apply(state regress_ledger.int_key, command cqrs.command_log)
RETURNS regress_ledger.int_key LANGUAGE sql AS 'SELECT state';
CREATE FUNCTION regress_ledger.no_key_apply(state regress_ledger.no_key, command cqrs.command_log)
RETURNS regress_ledger.no_key LANGUAGE sql AS 'SELECT state';
SELECT cqrs.create_projection('p', 'ledger', 'regress_ledger.totals', 'ledger_id',
	'regress_ledger.wrong_shape(regress_ledger.totals, jsonb)');
\echo :SQLSTATE
SELECT cqrs.create_projection('p', 'ledger', 'regress_ledger.totals', 'ledger_id',
	'regress_ledger.strict_apply(regress_ledger.totals, cqrs.command_log)');
\echo :SQLSTATE
SELECT cqrs.create_projection('p', 'ledger', 'regress_ledger.int_key', 'ledger_id',
	'regress_ledger.int_apply(regress_ledger.int_key, cqrs.command_log)');
\echo :SQLSTATE
SELECT cqrs.create_projection('p', 'ledger', 'regress_ledger.no_key', 'ledger_id',
	'regress_ledger.no_key_apply(regress_ledger.no_key, cqrs.command_log)');
\echo :SQLSTATE
SELECT cqrs.create_projection('p', 'ledger', 'regress_ledger.totals', 'nope',
	'regress_ledger.apply_total(regress_ledger.totals, cqrs.command_log)');
\echo :SQLSTATE
SELECT cqrs.create_projection('p', 'ledger', 'regress_ledger.a_view', 'ledger_id',
	'regress_ledger.apply_total(regress_ledger.totals, cqrs.command_log)');
\echo :SQLSTATE
SELECT cqrs.create_projection('p', 'nope', 'regress_ledger.totals', 'ledger_id',
	'regress_ledger.apply_total(regress_ledger.totals, cqrs.command_log)');
\echo :SQLSTATE
SELECT cqrs.create_projection('p', 'order', 'regress_ledger.totals', 'ledger_id',
	'regress_ledger.apply_total(regress_ledger.totals, cqrs.command_log)');
\echo :SQLSTATE
SELECT cqrs.create_projection('Bad Name', 'ledger', 'regress_ledger.totals', 'ledger_id',
	'regress_ledger.apply_total(regress_ledger.totals, cqrs.command_log)');
\echo :SQLSTATE
SELECT cqrs.create_projection(NULL, 'ledger', 'regress_ledger.totals', 'ledger_id',
	'regress_ledger.apply_total(regress_ledger.totals, cqrs.command_log)');
\echo :SQLSTATE
-- nothing was written by the refused definitions
SELECT count(*) FROM cqrs.projection WHERE NOT builtin;

-- The projection is made and filled from the log in one go.
SELECT cqrs.create_projection('ledger_totals', 'ledger', 'regress_ledger.totals',
	'ledger_id', 'regress_ledger.apply_total(regress_ledger.totals, cqrs.command_log)');
SELECT cqrs.create_projection('ledger_totals', 'ledger', 'regress_ledger.totals',
	'ledger_id', 'regress_ledger.apply_total(regress_ledger.totals, cqrs.command_log)');
\echo :SQLSTATE
SELECT * FROM regress_ledger.totals ORDER BY ledger_id;
SELECT aggregate_id, version FROM cqrs.projection_version
 WHERE projection = 'ledger_totals' ORDER BY aggregate_id;
RESET ROLE;
-- wait_for: processed once every projection of its type has applied it
-- (or dead-lettered it); a parked command is not.
SELECT command_id AS applied FROM cqrs.command_log
 WHERE aggregate_id = 'L1' AND sequence_id = 6 \gset
SELECT command_id AS parked FROM cqrs.command_log
 WHERE aggregate_id = 'L3' AND sequence_id = 3 \gset
SELECT cqrs.wait_for(:'applied', '1 s') AS applied,
       cqrs.wait_for(:'parked', '0.2 s') AS parked;
SELECT command_type, aggregate_id, sequence_id, projection, sqlstate, reason
  FROM cqrs.dead_letter ORDER BY aggregate_id, sequence_id;
SELECT aggregate_id, sequence_id, waiting_for FROM cqrs.parked ORDER BY 1, 2;
-- (the orders' counts depend on what earlier tests left in the read model)
SELECT name, aggregate_type, target, key_column, owner, builtin,
       CASE WHEN NOT builtin THEN aggregates END AS aggregates,
       CASE WHEN NOT builtin THEN dead_letters END AS dead_letters
  FROM cqrs.projections ORDER BY name;
SELECT name, labels, value FROM cqrs.metrics()
 WHERE name LIKE 'cqrs_projection_%' AND name <> 'cqrs_projection_lag_seconds'
   AND labels ->> 'projection' <> 'orders' ORDER BY 1, 2;

-- Another cqrs_admin may not point a projection at a table it cannot write.
SET ROLE regress_proj_other;
CREATE FUNCTION pg_temp.steal(state regress_ledger.totals, command cqrs.command_log)
RETURNS regress_ledger.totals LANGUAGE sql AS 'SELECT state';
SELECT cqrs.create_projection('stolen', 'ledger', 'regress_ledger.totals', 'ledger_id',
	'pg_temp.steal(regress_ledger.totals, cqrs.command_log)');
\echo :SQLSTATE
RESET ROLE;

-- A cqrs_admin who is not a superuser gains no superuser right through an
-- apply function: it runs as its declaring role even when a superuser
-- rebuilds, and what that role may not do dead-letters the command.
GRANT CREATE ON SCHEMA public TO regress_proj_other;
SET ROLE regress_proj_other;
CREATE TABLE public.regress_ledger_spy (ledger_id text PRIMARY KEY, secret text);
CREATE FUNCTION public.regress_ledger_peek(state public.regress_ledger_spy, command cqrs.command_log)
RETURNS public.regress_ledger_spy LANGUAGE plpgsql AS $$
BEGIN
	RETURN ROW(command.aggregate_id,
			   current_user || ':' || pg_catalog.pg_read_file('postgresql.conf', 0, 10));
END $$;
SELECT cqrs.create_projection('spy', 'ledger', 'public.regress_ledger_spy', 'ledger_id',
	'public.regress_ledger_peek(public.regress_ledger_spy, cqrs.command_log)');
RESET ROLE;
SELECT cqrs.rebuild('spy');
SELECT count(*) AS rows_written FROM public.regress_ledger_spy;
SELECT DISTINCT projection, sqlstate, reason FROM cqrs.dead_letter
 WHERE projection = 'spy';
SELECT cqrs.drop_projection('spy');

-- verify names an aggregate whose row differs from the fold of the log,
-- and a row of an aggregate the log does not have.
UPDATE regress_ledger.totals SET total = 999 WHERE ledger_id = 'L1';
INSERT INTO regress_ledger.totals VALUES ('L9', 1, 1, NULL);
SELECT * FROM cqrs.verify('ledger_totals') ORDER BY aggregate_id;
SET ROLE regress_proj_app;
SELECT * FROM cqrs.verify('ledger_totals');
\echo :SQLSTATE
RESET ROLE;
SELECT * FROM cqrs.verify('orders');
\echo :SQLSTATE
SELECT * FROM cqrs.verify('nope');
\echo :SQLSTATE

-- rebuild puts it right, run by a superuser yet applied as the owner.
SELECT cqrs.rebuild('ledger_totals');
SELECT * FROM regress_ledger.totals ORDER BY ledger_id;
SELECT count(*) FROM cqrs.verify('ledger_totals');
SELECT count(*) FROM cqrs.dead_letter WHERE projection = 'ledger_totals';

-- retry_dead_letter: only the latest command of its aggregate for that
-- projection; after a fix of the apply function it applies.
SELECT command_id AS boom FROM cqrs.dead_letter
 WHERE aggregate_id = 'L1' AND sequence_id = 3 \gset
SELECT cqrs.retry_dead_letter(:'boom');
\echo :SQLSTATE
SET ROLE regress_proj_app;
SELECT (cqrs.submit('OPEN_LEDGER', 'L4', '{}')).sequence_id;
SELECT (cqrs.submit('POST', 'L4', '{"amount": "boom"}')).command_id AS boom4 \gset
RESET ROLE;
SELECT cqrs.rebuild('ledger_totals');
SELECT sqlstate, reason FROM cqrs.dead_letter WHERE command_id = :'boom4';
SELECT cqrs.retry_dead_letter(:'boom4');
SET ROLE regress_proj_admin;
CREATE OR REPLACE FUNCTION regress_ledger.apply_total(state regress_ledger.totals,
		command cqrs.command_log)
RETURNS regress_ledger.totals LANGUAGE plpgsql AS $$
BEGIN
	IF command.command_type = 'OPEN_LEDGER' THEN
		state := ROW(command.aggregate_id, 0, 0, current_user);
		RETURN state;
	END IF;
	IF command.payload ? 'close' THEN
		RETURN NULL;
	END IF;
	state.total := state.total + coalesce(nullif(command.payload ->> 'amount', 'boom'), '0')::numeric;
	state.entries := state.entries + 1;
	RETURN state;
END $$;
RESET ROLE;
SELECT cqrs.retry_dead_letter(:'boom4');
SELECT * FROM regress_ledger.totals WHERE ledger_id = 'L4';
SELECT count(*) FROM cqrs.dead_letter WHERE command_id = :'boom4';

-- Dropping: not the built-in one; the table stays, the versions go.
SELECT cqrs.drop_projection('orders');
\echo :SQLSTATE
SELECT cqrs.drop_projection('nope');
\echo :SQLSTATE
SELECT cqrs.drop_projection('ledger_totals');
SELECT count(*) AS rows_kept FROM regress_ledger.totals;
SELECT count(*) AS versions FROM cqrs.projection_version WHERE projection = 'ledger_totals';
SELECT count(*) AS dead FROM cqrs.dead_letter WHERE projection = 'ledger_totals';

-- The built-in projection is registered with its C apply function, which
-- folds in SQL as any other does.
SELECT name, apply_function, builtin FROM cqrs.projection WHERE builtin;
SELECT order_id, user_id, total_amount, status, version
  FROM cqrs.apply_order(cqrs.apply_order(NULL,
		ROW(1, 'e0000000-0000-4000-8000-0000000000a1', 'CREATE_ORDER', 'o-fold', 1,
			'{"user_id": "u1", "amount": 9.5}', now(), NULL)::cqrs.command_log),
		ROW(2, 'e0000000-0000-4000-8000-0000000000a2', 'SHIP_ORDER', 'o-fold', 2,
			'{}', now(), NULL)::cqrs.command_log);
SELECT cqrs.apply_order(NULL,
	ROW(1, 'e0000000-0000-4000-8000-0000000000a3', 'SHIP_ORDER', 'o-none', 1,
		'{}', now(), NULL)::cqrs.command_log);
\echo :SQLSTATE
SELECT cqrs.apply_order(NULL,
	ROW(1, 'e0000000-0000-4000-8000-0000000000a4', 'CREATE_ORDER', 'o-bad', 1,
		'{"user_id": 5}', now(), NULL)::cqrs.command_log);
\echo :SQLSTATE

DROP SCHEMA regress_ledger CASCADE;
DROP FUNCTION public.regress_ledger_peek;
DROP TABLE public.regress_ledger_spy;
REVOKE CREATE ON SCHEMA public FROM regress_proj_other;
