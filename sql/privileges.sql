-- Least privilege: writers submit through the functions only, readers read
-- the read model only, operators read everything, others get nothing.
\set VERBOSITY terse

CREATE ROLE regress_cqrs_app IN ROLE cqrs_writer;
CREATE ROLE regress_cqrs_report IN ROLE cqrs_reader;
CREATE ROLE regress_cqrs_ops IN ROLE cqrs_admin;
CREATE ROLE regress_cqrs_nobody;

-- The writer submits, ships and cancels through the functions ...
SET ROLE regress_cqrs_app;
SELECT sequence_id, duplicate FROM cqrs.submit_order('p-1', 'u-1', 5,
                                'c0000000-0000-4000-8000-000000000001');
SELECT sequence_id, duplicate FROM cqrs.submit_order('p-1', 'u-1', 5,
                                'c0000000-0000-4000-8000-000000000001');
SELECT sequence_id FROM cqrs.ship_order('p-1');
SELECT sequence_id FROM cqrs.cancel_order('p-1', 'r');
SELECT cqrs.uuidv7() IS NOT NULL AS uuid_ok;
-- ... but cannot touch the log or the other tables directly.
INSERT INTO cqrs.command_log (command_id, command_type, aggregate_id,
                              sequence_id, payload)
VALUES (cqrs.uuidv7(), 'CREATE_ORDER', 'p-forged', 1, '{}');
\echo :SQLSTATE
SELECT count(*) FROM cqrs.command_log;
\echo :SQLSTATE
SELECT count(*) FROM cqrs.dead_letter;
\echo :SQLSTATE
INSERT INTO cqrs.read_model VALUES ('p-forged', 'u', 1, 'created', 1);
\echo :SQLSTATE
-- The owner switch inside the functions does not leak out of them.
SELECT current_user AS still_the_writer;
RESET ROLE;

-- The reader sees the read model and nothing else.
INSERT INTO cqrs.read_model VALUES ('p-1', 'u-1', 5, 'created', 1);
SET ROLE regress_cqrs_report;
SELECT order_id, status FROM cqrs.read_model WHERE order_id = 'p-1';
SELECT count(*) FROM cqrs.command_log;
\echo :SQLSTATE
SELECT cqrs.submit_order('p-2', 'u-2', 1);
\echo :SQLSTATE
UPDATE cqrs.read_model SET status = 'shipped';
\echo :SQLSTATE
RESET ROLE;

-- The operator reads every table but writes none, and submits nothing.
SET ROLE regress_cqrs_ops;
SELECT count(*) > 0 AS sees_log FROM cqrs.command_log;
SELECT count(*) >= 0 AS sees_dead_letter FROM cqrs.dead_letter;
SELECT count(*) >= 0 AS sees_parked FROM cqrs.parked;
SELECT count(*) >= 0 AS sees_offsets FROM cqrs.offset_tracking;
DELETE FROM cqrs.read_model;
\echo :SQLSTATE
SELECT cqrs.submit_order('p-3', 'u-3', 1);
\echo :SQLSTATE
SELECT state IS NOT NULL AS sees_status FROM cqrs.status;
SELECT count(*) AS differences FROM cqrs.verify() WHERE order_id LIKE 'p-%';
RESET ROLE;

-- Status and verify are the operator's, not the reader's or writer's.
SET ROLE regress_cqrs_report;
SELECT state FROM cqrs.status;
\echo :SQLSTATE
SELECT * FROM cqrs.verify();
\echo :SQLSTATE
RESET ROLE;
SET ROLE regress_cqrs_app;
SELECT state FROM cqrs.status;
\echo :SQLSTATE
RESET ROLE;

-- Spans name commands and aggregates: the operator's, not the reader's
-- or writer's.
SET ROLE regress_cqrs_ops;
SELECT count(*) >= 0 AS sees_spans FROM cqrs.spans();
RESET ROLE;
SET ROLE regress_cqrs_report;
SELECT count(*) FROM cqrs.spans();
\echo :SQLSTATE
RESET ROLE;
SET ROLE regress_cqrs_app;
SELECT count(*) FROM cqrs.spans(consume => true);
\echo :SQLSTATE
RESET ROLE;

-- A role with no cqrs role gets nothing at all, not even the schema.
SET ROLE regress_cqrs_nobody;
SELECT cqrs.uuidv7();
\echo :SQLSTATE
SELECT cqrs.submit_order('p-4', 'u-4', 1);
\echo :SQLSTATE
SELECT count(*) FROM cqrs.read_model;
\echo :SQLSTATE
RESET ROLE;

-- What the writer submitted is in the log, and only that.
SELECT aggregate_id, sequence_id, command_type FROM cqrs.command_log
 WHERE aggregate_id LIKE 'p-%' ORDER BY 1, 2;

DROP ROLE regress_cqrs_app, regress_cqrs_report, regress_cqrs_ops,
          regress_cqrs_nobody;
