-- No cqrs function can be hijacked through search_path: a schema ahead of
-- pg_catalog that shadows the functions and operators cqrs uses is never
-- called, neither by the command functions nor by CREATE EXTENSION.
\set VERBOSITY terse

CREATE SCHEMA evil;
CREATE TABLE evil.calls (what text);
GRANT ALL ON SCHEMA evil TO PUBLIC;
GRANT ALL ON evil.calls TO PUBLIC;

CREATE FUNCTION evil.note(what text) RETURNS void LANGUAGE sql
	AS $$ INSERT INTO evil.calls VALUES (what) $$;

CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql
	AS $$ SELECT evil.note('now'); SELECT 'epoch'::timestamptz $$;
CREATE FUNCTION evil.jsonb_build_object(VARIADIC "any") RETURNS jsonb
	LANGUAGE sql AS $$ SELECT evil.note('jsonb_build_object'); SELECT '{}'::jsonb $$;
CREATE FUNCTION evil.max(bigint) RETURNS bigint LANGUAGE sql
	AS $$ SELECT evil.note('max'); SELECT 0::bigint $$;
CREATE FUNCTION evil.int8(bigint) RETURNS bigint LANGUAGE sql
	AS $$ SELECT evil.note('int8'); SELECT $1 $$;

CREATE FUNCTION evil.text_eq(text, text) RETURNS boolean LANGUAGE sql
	AS $$ SELECT evil.note('text ='); SELECT true $$;
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.text_eq);
CREATE FUNCTION evil.uuid_eq(uuid, uuid) RETURNS boolean LANGUAGE sql
	AS $$ SELECT evil.note('uuid ='); SELECT true $$;
CREATE OPERATOR evil.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = evil.uuid_eq);
CREATE FUNCTION evil.jsonb_eq(jsonb, jsonb) RETURNS boolean LANGUAGE sql
	AS $$ SELECT evil.note('jsonb ='); SELECT true $$;
CREATE OPERATOR evil.= (LEFTARG = jsonb, RIGHTARG = jsonb, FUNCTION = evil.jsonb_eq);
CREATE FUNCTION evil.int8_eq(bigint, bigint) RETURNS boolean LANGUAGE sql
	AS $$ SELECT evil.note('int8 ='); SELECT true $$;
CREATE OPERATOR evil.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = evil.int8_eq);
CREATE FUNCTION evil.int8_ge(bigint, integer) RETURNS boolean LANGUAGE sql
	AS $$ SELECT evil.note('int8 >='); SELECT true $$;
CREATE OPERATOR evil.>= (LEFTARG = bigint, RIGHTARG = integer, FUNCTION = evil.int8_ge);

-- The hostile path, for an ordinary writer and for a superuser.
CREATE ROLE regress_cqrs_victim IN ROLE cqrs_writer;
GRANT USAGE ON SCHEMA evil TO regress_cqrs_victim;

-- The shadows work: an unqualified query would call them.
SET search_path = evil, pg_catalog;
SELECT 'a'::text = 'b'::text AS shadowed;
DELETE FROM evil.calls;

-- First use in this session, so the command plans are prepared under the
-- hostile path, and every path through the command functions is taken.
SET ROLE regress_cqrs_victim;
SELECT sequence_id, duplicate FROM cqrs.submit_order('h-1', 'u-1', 1,
                                'd0000000-0000-4000-8000-000000000001');
SELECT sequence_id, duplicate FROM cqrs.submit_order('h-1', 'u-1', 1,
                                'd0000000-0000-4000-8000-000000000001');
SELECT cqrs.submit_order('h-1', 'u-1', 2,
                         'd0000000-0000-4000-8000-000000000001');
SELECT cqrs.submit_order('h-1', 'u-1', 1);
SELECT sequence_id FROM cqrs.ship_order('h-1');
SELECT sequence_id FROM cqrs.cancel_order('h-1', 'r');
SELECT cqrs.ship_order('h-1', NULL, 2);
SELECT cqrs.ship_order('h-missing');
SELECT sequence_id FROM cqrs.cancel_order('h-2', NULL, NULL, 4);
RESET ROLE;
SET search_path = evil, pg_catalog;
SELECT sequence_id FROM cqrs.ship_order('h-1');
UPDATE cqrs.command_log SET payload = '{}';
RESET search_path;

SELECT what, count(*) FROM evil.calls GROUP BY what ORDER BY what;

-- The stored values are the real ones (now(), not the shadow's epoch).
SELECT count(*) FILTER (WHERE created_at = 'epoch') AS forged_times,
       count(*) FILTER (WHERE payload = '{}') AS forged_payloads
  FROM cqrs.command_log WHERE aggregate_id LIKE 'h-%';

-- CREATE EXTENSION under the hostile path calls none of the shadows either.
RESET search_path;
DROP EXTENSION cqrs;
SET search_path = evil, pg_catalog;
CREATE EXTENSION cqrs;
SELECT sequence_id FROM cqrs.submit_order('h-3', 'u-3', 3);
RESET search_path;
SELECT what, count(*) FROM evil.calls GROUP BY what ORDER BY what;

DROP SCHEMA evil CASCADE;
DROP ROLE regress_cqrs_victim;
