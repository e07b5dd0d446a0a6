-- Domains declared in SQL: aggregate and command types managed by
-- cqrs_admin, and cqrs.submit() validating a payload against the declared
-- composite type (each error naming the key, with PostgreSQL's SQLSTATE),
-- then the validator, run as the role that declared the type.
\set VERBOSITY default
SET client_min_messages = warning;

CREATE ROLE regress_dom_admin IN ROLE cqrs_admin;
CREATE ROLE regress_dom_app IN ROLE cqrs_writer;
CREATE SCHEMA regress_bank AUTHORIZATION regress_dom_admin;
GRANT USAGE ON SCHEMA regress_bank TO PUBLIC;

-- The built-in domain is declared in the same catalog.
SELECT name, aggregate_type, creates, builtin FROM cqrs.command_type ORDER BY name;

-- Only cqrs_admin declares.
SET ROLE regress_dom_app;
SELECT cqrs.create_aggregate_type('account');
\echo :SQLSTATE
RESET ROLE;

SET ROLE regress_dom_admin;
CREATE DOMAIN regress_bank.money_amount AS numeric(12, 2)
	NOT NULL CHECK (VALUE > 0);
CREATE DOMAIN regress_bank.holder AS varchar(20) NOT NULL;
CREATE TYPE regress_bank.open_payload AS (holder regress_bank.holder, note text);
CREATE TYPE regress_bank.move_payload AS (amount regress_bank.money_amount, memo text, urgent boolean);
CREATE FUNCTION regress_bank.no_round_sums(aggregate_id text, payload jsonb)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	IF (payload ->> 'amount')::numeric % 1000 = 0 THEN
		RAISE EXCEPTION 'round sums need a second signature'
			USING ERRCODE = 'P0001', HINT = 'Ask a manager.';
	END IF;
	-- runs as the declaring role, not as the submitting one
	IF current_user <> 'regress_dom_admin' THEN
		RAISE EXCEPTION 'validator runs as %', current_user;
	END IF;
END $$;
CREATE FUNCTION regress_bank.wrong_shape(payload jsonb)
RETURNS boolean LANGUAGE sql AS 'SELECT true';

SELECT cqrs.create_aggregate_type('account');
SELECT cqrs.create_aggregate_type('account');
\echo :SQLSTATE
SELECT cqrs.create_aggregate_type('Bad Name');
\echo :SQLSTATE
SELECT cqrs.create_command_type('OPEN_ACCOUNT', 'account', true, 'regress_bank.open_payload');
SELECT cqrs.create_command_type('DEPOSIT', 'account', false, 'regress_bank.move_payload',
	'regress_bank.no_round_sums(text, jsonb)');
SELECT cqrs.create_command_type('NOTE', 'account', false);
-- refused definitions
SELECT cqrs.create_command_type('WITHDRAW', 'ledger', false);
\echo :SQLSTATE
SELECT cqrs.create_command_type('DEPOSIT', 'account', false);
\echo :SQLSTATE
SELECT cqrs.create_command_type('CREATE_ORDER', 'account', true);
\echo :SQLSTATE
SELECT cqrs.create_command_type('WITHDRAW', 'account', false, 'regress_bank.holder');
\echo :SQLSTATE
SELECT cqrs.create_command_type('WITHDRAW', 'account', false, NULL,
	'regress_bank.wrong_shape(jsonb)');
\echo :SQLSTATE
SELECT cqrs.create_command_type('lower', 'account', false);
\echo :SQLSTATE
SELECT name, aggregate_type, creates, payload_type, validator, owner, builtin
  FROM cqrs.command_type WHERE NOT builtin ORDER BY name;
RESET ROLE;

-- Submitting: the writer needs no right on the domain's objects.
SET ROLE regress_dom_app;
SELECT sequence_id, duplicate FROM cqrs.submit('OPEN_ACCOUNT', 'acct-1',
	'{"holder": "Ada"}', 'e0000000-0000-4000-8000-000000000001');
-- the same command again: the original receipt
SELECT sequence_id, duplicate FROM cqrs.submit('OPEN_ACCOUNT', 'acct-1',
	'{"holder": "Ada"}', 'e0000000-0000-4000-8000-000000000001');
-- the same id for another command (terse: the detail names a log_id)
\set VERBOSITY terse
SELECT cqrs.submit('OPEN_ACCOUNT', 'acct-1', '{"holder": "Bob"}',
	'e0000000-0000-4000-8000-000000000001');
\echo :SQLSTATE
\set VERBOSITY default
-- a second create of the aggregate
SELECT cqrs.submit('OPEN_ACCOUNT', 'acct-1', '{"holder": "Bob"}');
\echo :SQLSTATE
SELECT sequence_id FROM cqrs.submit('DEPOSIT', 'acct-1', '{"amount": 12.5, "memo": "pay"}');
SELECT sequence_id FROM cqrs.submit('DEPOSIT', 'acct-1', '{"amount": 3}');
SELECT sequence_id FROM cqrs.submit('NOTE', 'acct-1', '{"anything": [1, 2]}');
-- explicit sequences: a gap is accepted, 1 is the create's
SELECT sequence_id FROM cqrs.submit('DEPOSIT', 'acct-1', '{"amount": 1}', NULL, 9);
SELECT cqrs.submit('DEPOSIT', 'acct-1', '{"amount": 1}', NULL, 1);
\echo :SQLSTATE
SELECT cqrs.submit('OPEN_ACCOUNT', 'acct-2', '{"holder": "Cy"}', NULL, 2);
\echo :SQLSTATE

-- Bad payloads: each refused with the key and PostgreSQL's SQLSTATE, and
-- nothing written.
RESET ROLE;
SELECT count(*) AS before FROM cqrs.command_log WHERE aggregate_id LIKE 'acct-%' \gset
SET ROLE regress_dom_app;
SELECT cqrs.submit('DEPOSIT', 'acct-1', '[1]');
\echo :SQLSTATE
SELECT cqrs.submit('DEPOSIT', 'acct-1', '{"amount": 5, "color": "red"}');
\echo :SQLSTATE
SELECT cqrs.submit('DEPOSIT', 'acct-1', '{"memo": "no amount"}');
\echo :SQLSTATE
SELECT cqrs.submit('DEPOSIT', 'acct-1', '{"amount": -5}');
\echo :SQLSTATE
SELECT cqrs.submit('DEPOSIT', 'acct-1', '{"amount": "5"}');
\echo :SQLSTATE
SELECT cqrs.submit('DEPOSIT', 'acct-1', '{"amount": 5, "urgent": "yes"}');
\echo :SQLSTATE
SELECT cqrs.submit('DEPOSIT', 'acct-1', '{"amount": 12345678901234}');
\echo :SQLSTATE
SELECT cqrs.submit('OPEN_ACCOUNT', 'acct-3', '{"holder": "a name far longer than twenty"}');
\echo :SQLSTATE
SELECT cqrs.submit('DEPOSIT', 'acct-1', NULL);
\echo :SQLSTATE
-- what the validator raises reaches the client unchanged
SELECT cqrs.submit('DEPOSIT', 'acct-1', '{"amount": 2000}');
\echo :SQLSTATE
-- unknown and built-in types, bad ids
SELECT cqrs.submit('WITHDRAW', 'acct-1', '{}');
\echo :SQLSTATE
-- the built-in commands take the order functions' path: same checks, same
-- payload, so a retry through either function is a duplicate
SELECT sequence_id, duplicate FROM cqrs.submit('CREATE_ORDER', 'dom-o-2',
	'{"user_id": "u", "amount": 10}', 'e0000000-0000-4000-8000-0000000000a1');
SELECT sequence_id, duplicate FROM cqrs.submit_order('dom-o-2', 'u', 10,
	'e0000000-0000-4000-8000-0000000000a1');
SELECT sequence_id FROM cqrs.submit('SHIP_ORDER', 'dom-o-2', '{"order_id": "dom-o-2"}');
SELECT sequence_id FROM cqrs.submit('CANCEL_ORDER', 'dom-o-2', '{"reason": "late"}');
SELECT cqrs.submit('CANCEL_ORDER', 'dom-o-2', '{"reason": 5}');
\echo :SQLSTATE
SELECT cqrs.submit('CREATE_ORDER', 'dom-o-3', '{"user_id": "u", "amount": -1}');
\echo :SQLSTATE
SELECT cqrs.submit('CREATE_ORDER', 'dom-o-3', '{"user_id": "u"}');
\echo :SQLSTATE
SELECT cqrs.submit('CREATE_ORDER', 'dom-o-3', '{"user_id": "u", "amount": 1, "x": 1}');
\echo :SQLSTATE
SELECT cqrs.submit('SHIP_ORDER', 'dom-o-2', '{"order_id": "another"}');
\echo :SQLSTATE
SELECT cqrs.submit(NULL, 'acct-1', '{}');
\echo :SQLSTATE
SELECT cqrs.submit('NOTE', '', '{}');
\echo :SQLSTATE
-- an aggregate is of the type of its first command
SELECT cqrs.submit('DEPOSIT', 'acct-none', '{"amount": 1}');
\echo :SQLSTATE
SELECT sequence_id FROM cqrs.submit_order('dom-o-1', 'u', 1);
SELECT cqrs.submit('DEPOSIT', 'dom-o-1', '{"amount": 1}');
\echo :SQLSTATE
SELECT cqrs.ship_order('acct-1');
\echo :SQLSTATE
SELECT cqrs.ship_order('acct-1', sequence_id => 20);
\echo :SQLSTATE
SELECT cqrs.submit('DEPOSIT', 'dom-o-1', '{"amount": 1}', NULL, 5);
\echo :SQLSTATE
RESET ROLE;
SELECT count(*) - :before AS written FROM cqrs.command_log WHERE aggregate_id LIKE 'acct-%';

SELECT command_type, sequence_id, payload FROM cqrs.command_log
 WHERE aggregate_id IN ('acct-1', 'dom-o-2') ORDER BY aggregate_id, sequence_id;

-- A definition takes effect from the next command, in this session too.
SET ROLE regress_dom_admin;
SELECT cqrs.create_command_type('CLOSE_ACCOUNT', 'account', false);
RESET ROLE;
SELECT sequence_id FROM cqrs.submit('CLOSE_ACCOUNT', 'acct-1', '{}');
SET ROLE regress_dom_admin;
-- a type with commands in the log stays; one without goes
SELECT cqrs.drop_command_type('CLOSE_ACCOUNT');
\echo :SQLSTATE
SELECT cqrs.create_command_type('FREEZE', 'account', false);
SELECT cqrs.drop_command_type('FREEZE');
SELECT cqrs.drop_command_type('FREEZE');
\echo :SQLSTATE
SELECT cqrs.drop_command_type('SHIP_ORDER');
\echo :SQLSTATE
SELECT cqrs.drop_aggregate_type('account');
\echo :SQLSTATE
SELECT cqrs.drop_aggregate_type('order');
\echo :SQLSTATE
RESET ROLE;
SELECT cqrs.submit('FREEZE', 'acct-1', '{}');
\echo :SQLSTATE

-- No projection follows these: processed as soon as logged.
SELECT cqrs.wait_for('e0000000-0000-4000-8000-000000000001', '1 s');

-- A validator runs as the (non-superuser) role that declared it, also
-- when a superuser submits: it gains no right of the caller's.
SET ROLE regress_dom_admin;
CREATE FUNCTION regress_bank.escalate(aggregate_id text, payload jsonb)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE 'ALTER ROLE regress_dom_admin SUPERUSER';
END $$;
SELECT cqrs.create_command_type('ESCALATE', 'account', false, NULL,
	'regress_bank.escalate(text, jsonb)');
RESET ROLE;
\set VERBOSITY sqlstate
SELECT cqrs.submit('ESCALATE', 'acct-1', '{}');
\set VERBOSITY default
SELECT rolsuper FROM pg_roles WHERE rolname = 'regress_dom_admin';
-- a validator the declaring role may not execute is refused
REVOKE EXECUTE ON FUNCTION regress_bank.no_round_sums(text, jsonb) FROM PUBLIC;
CREATE ROLE regress_dom_admin2 IN ROLE cqrs_admin;
SET ROLE regress_dom_admin2;
SELECT cqrs.create_command_type('WITHDRAW', 'account', false, NULL,
	'regress_bank.no_round_sums(text, jsonb)');
\echo :SQLSTATE
RESET ROLE;

-- A payload type dropped: a clear error; made again: found again.
SET ROLE regress_dom_admin;
CREATE TYPE regress_bank.note_payload AS (text text);
SELECT cqrs.create_command_type('REMARK', 'account', false, 'regress_bank.note_payload');
RESET ROLE;
SELECT sequence_id FROM cqrs.submit('REMARK', 'acct-1', '{"text": "a"}');
DROP TYPE regress_bank.note_payload;
SELECT cqrs.submit('REMARK', 'acct-1', '{"text": "b"}');
\echo :SQLSTATE
CREATE TYPE regress_bank.note_payload AS (text text, mood text);
SELECT sequence_id FROM cqrs.submit('REMARK', 'acct-1', '{"text": "c", "mood": "ok"}');
-- the declaring role dropped: its validator cannot run as anyone else
CREATE ROLE regress_dom_gone IN ROLE cqrs_admin;
SET ROLE regress_dom_gone;
SELECT cqrs.create_command_type('ORPHAN', 'account', false);
RESET ROLE;
DROP ROLE regress_dom_gone;
SELECT cqrs.submit('ORPHAN', 'acct-1', '{}');
\echo :SQLSTATE
SELECT cqrs.submit('ORPHAN', 'acct-1', '{}');
\echo :SQLSTATE
-- the declaring role lost the right to execute its validator: refused
REVOKE EXECUTE ON FUNCTION regress_bank.no_round_sums(text, jsonb) FROM regress_dom_admin;
ALTER FUNCTION regress_bank.no_round_sums(text, jsonb) OWNER TO CURRENT_USER;
SELECT cqrs.submit('DEPOSIT', 'acct-1', '{"amount": 7}');
\echo :SQLSTATE
-- a payload over 64 kB, and a validator dropped
SELECT cqrs.submit('NOTE', 'acct-1', jsonb_build_object('text', repeat('x', 70000)));
\echo :SQLSTATE
DROP FUNCTION regress_bank.no_round_sums(text, jsonb);
SELECT cqrs.submit('DEPOSIT', 'acct-1', '{"amount": 7}');
\echo :SQLSTATE
