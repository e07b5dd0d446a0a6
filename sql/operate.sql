-- Operating the projector from SQL: pause and resume record the decision
-- durably, the read-your-writes fences time out cleanly and check their
-- arguments, and each function is open to exactly the roles it is for.
-- (This instance's projector serves another database, so nothing here is
-- ever projected: the fences can only time out.)
\set VERBOSITY terse

-- no row until the first pause: projection runs
SELECT paused FROM cqrs.projector_state;
SELECT cqrs.pause();
SELECT paused, changed_by = current_user AS by_me FROM cqrs.projector_state;
-- a pause that rolls back changes nothing
BEGIN;
SELECT cqrs.resume();
ROLLBACK;
SELECT paused FROM cqrs.projector_state;
SELECT cqrs.resume();
SELECT paused FROM cqrs.projector_state;
-- the table holds one row, whatever a superuser tries
INSERT INTO cqrs.projector_state (singleton) VALUES (false);
\echo :SQLSTATE

-- wait_for: false at the timeout for a command not (yet) processed
SELECT (cqrs.submit_order('op-1', 'u', 1,
        'd0000000-0000-4000-8000-000000000001')).sequence_id;
SELECT cqrs.wait_for('d0000000-0000-4000-8000-000000000001', '50 ms');
-- a command that is not in the log is an error at once, not a wait
SELECT cqrs.wait_for('d0000000-0000-4000-8000-0000000000ff', '1 hour');
\echo :SQLSTATE
-- processed = the order's version reached the command's sequence
INSERT INTO cqrs.read_model (order_id, user_id, total_amount, status, version)
VALUES ('op-1', 'u', 1, 'created', 1);
SELECT cqrs.wait_for('d0000000-0000-4000-8000-000000000001', '1 hour');
-- or the command was dead-lettered
SELECT (cqrs.ship_order('op-1', 'd0000000-0000-4000-8000-000000000002')).sequence_id;
SELECT cqrs.wait_for('d0000000-0000-4000-8000-000000000002', '0');
INSERT INTO cqrs.dead_letter (command_id, reason)
VALUES ('d0000000-0000-4000-8000-000000000002', 'regress');
SELECT cqrs.wait_for('d0000000-0000-4000-8000-000000000002', '1 hour');
SELECT cqrs.wait_for(NULL, '1 hour') IS NULL AS strict;
-- a timeout of centuries is just long (no overflow into a negative one)
SELECT cqrs.wait_for('d0000000-0000-4000-8000-000000000001', '300000 years');
SELECT cqrs.wait_for('d0000000-0000-4000-8000-000000000001', '-1 s');
\echo :SQLSTATE
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT cqrs.wait_for('d0000000-0000-4000-8000-000000000001', '1 s');
\echo :SQLSTATE
ROLLBACK;

-- wait_for_lsn: false at the timeout while nothing is projected here
SELECT cqrs.wait_for_lsn(pg_current_wal_insert_lsn(), '50 ms');
SELECT cqrs.wait_for_lsn('0/1', '-1 day');
\echo :SQLSTATE

-- metrics: the families, with their types, in the exposition format
SELECT line FROM regexp_split_to_table(cqrs.prometheus(), E'\n') AS line
 WHERE line LIKE '# TYPE %' ORDER BY 1;
SELECT count(*) FILTER (WHERE line !~ '^(# (HELP|TYPE) cqrs_[a-z_]+ .+|cqrs_[a-z_]+(\{[a-z]+="[^"]*"\})? (NaN|-?[0-9.e+]+))$') AS malformed,
       count(*) FILTER (WHERE line LIKE '# HELP %') AS helps
  FROM regexp_split_to_table(rtrim(cqrs.prometheus(), E'\n'), E'\n') AS line;
SELECT count(*) AS buckets FROM cqrs.metrics()
 WHERE name = 'cqrs_batch_flush_duration_seconds_bucket';
-- a refused command is counted although its transaction rolls back
CREATE TEMP TABLE m0 AS SELECT name, labels, value FROM cqrs.metrics();
SELECT cqrs.submit_order('', 'u', 1);
SELECT cqrs.ship_order('op-missing');
SELECT (cqrs.submit_order('op-m', 'u', 1)).sequence_id;
SELECT m.name, m.labels, m.value - m0.value AS delta
  FROM cqrs.metrics() AS m JOIN m0 USING (name, labels)
 WHERE m.value <> m0.value AND m.name LIKE 'cqrs_command%'
 ORDER BY 1, 2::text;

-- trace context: checked when set, stored with each command of the session
SET cqrs.traceparent = 'not-a-traceparent';
\echo :SQLSTATE
SET cqrs.traceparent = '00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01';
SET cqrs.traceparent = '00-00000000000000000000000000000000-00f067aa0ba902b7-01';
SET cqrs.traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01';
SET cqrs.traceparent = 'ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
SET cqrs.traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra';
SET cqrs.traceparent = '01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x y';
-- a later version may carry more fields
SET cqrs.traceparent = '01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-ab';
RESET cqrs.traceparent;
SHOW cqrs.traceparent;
SET cqrs.traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
SELECT (cqrs.submit_order('op-tp', 'u', 1)).sequence_id;
RESET cqrs.traceparent;
SELECT (cqrs.ship_order('op-tp')).sequence_id;
SELECT sequence_id, traceparent FROM cqrs.command_log
 WHERE aggregate_id = 'op-tp' ORDER BY 1;

-- who may call what
CREATE ROLE regress_op_app IN ROLE cqrs_writer;
CREATE ROLE regress_op_report IN ROLE cqrs_reader;
CREATE ROLE regress_op_ops IN ROLE cqrs_admin;
CREATE ROLE regress_op_nobody;
CREATE ROLE regress_op_monitor IN ROLE pg_monitor;
SET ROLE regress_op_report;
SELECT cqrs.wait_for('d0000000-0000-4000-8000-000000000001', '0');
SELECT cqrs.wait_for_lsn('0/1', '0') IS NOT NULL AS callable;
SELECT cqrs.pause();
\echo :SQLSTATE
SET ROLE regress_op_app;
SELECT cqrs.wait_for('d0000000-0000-4000-8000-000000000001', '0');
SELECT cqrs.resume();
\echo :SQLSTATE
SELECT cqrs.rebuild();
\echo :SQLSTATE
SELECT cqrs.retry_dead_letter('d0000000-0000-4000-8000-000000000002');
\echo :SQLSTATE
SET ROLE regress_op_monitor;
SELECT count(*) > 0 AS sees_metrics FROM cqrs.metrics();
SELECT cqrs.prometheus() LIKE '# HELP %' AS scrapes;
SELECT count(*) FROM cqrs.read_model;
\echo :SQLSTATE
SELECT cqrs.pause();
\echo :SQLSTATE
SET ROLE regress_op_nobody;
SELECT cqrs.metrics();
\echo :SQLSTATE
SELECT cqrs.wait_for('d0000000-0000-4000-8000-000000000001', '0');
\echo :SQLSTATE
SET ROLE regress_op_ops;
SELECT cqrs.pause();
SELECT cqrs.resume();
-- a pause in a prepared transaction could never reach the projector
BEGIN;
SELECT cqrs.pause();
PREPARE TRANSACTION 'regress_pause';
\echo :SQLSTATE
-- repairs of commands that are neither dead-lettered nor parked are errors
SELECT cqrs.retry_dead_letter('d0000000-0000-4000-8000-0000000000ff');
\echo :SQLSTATE
SELECT cqrs.skip_parked('d0000000-0000-4000-8000-0000000000ff');
\echo :SQLSTATE
SELECT paused, changed_by FROM cqrs.projector_state;
RESET ROLE;
DROP ROLE regress_op_app, regress_op_report, regress_op_ops, regress_op_nobody,
	regress_op_monitor;
DELETE FROM cqrs.read_model WHERE order_id = 'op-1';
DROP TABLE m0;
DELETE FROM cqrs.dead_letter;
