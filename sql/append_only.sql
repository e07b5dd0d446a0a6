-- cqrs.command_log is append-only for every role, superusers included.
\set VERBOSITY terse

SELECT sequence_id FROM cqrs.submit_order('a-1', 'u-1', 1);
SELECT count(*) AS log_rows FROM cqrs.command_log \gset before_

UPDATE cqrs.command_log SET payload = '{}' WHERE aggregate_id = 'a-1';
\echo :SQLSTATE
-- Refused even when no row matches: the statement itself is refused.
UPDATE cqrs.command_log SET payload = '{}' WHERE false;
\echo :SQLSTATE
DELETE FROM cqrs.command_log WHERE aggregate_id = 'a-1';
\echo :SQLSTATE
DELETE FROM cqrs.command_log;
\echo :SQLSTATE
TRUNCATE cqrs.command_log;
\echo :SQLSTATE
TRUNCATE cqrs.command_log, cqrs.read_model;
\echo :SQLSTATE
-- An upsert is an UPDATE too.
INSERT INTO cqrs.command_log (command_id, command_type, aggregate_id,
                              sequence_id, payload)
SELECT command_id, command_type, aggregate_id, sequence_id, '{}'
  FROM cqrs.command_log WHERE aggregate_id = 'a-1'
ON CONFLICT (command_id) DO UPDATE SET payload = excluded.payload;
\echo :SQLSTATE

-- Replication mode, which silences ordinary triggers, does not help.
SET session_replication_role = replica;
DELETE FROM cqrs.command_log;
\echo :SQLSTATE
TRUNCATE cqrs.command_log;
\echo :SQLSTATE
RESET session_replication_role;

-- The message says why.
\set VERBOSITY default
DELETE FROM cqrs.command_log;
\set VERBOSITY terse

SELECT count(*) = :before_log_rows AS log_intact,
       bool_and(payload <> '{}') AS payloads_intact
  FROM cqrs.command_log;

-- Appending is still possible, and the trigger cannot be called directly.
SELECT sequence_id FROM cqrs.ship_order('a-1');
SELECT cqrs.command_log_append_only();
\echo :SQLSTATE
