-- cqrs.submit_order(): append a CREATE_ORDER, idempotent by command_id.
\set VERBOSITY terse

-- A fresh command: a UUIDv7 command_id, sequence 1, not a duplicate.
SELECT (r).command_id IS NOT NULL AS has_id,
       substr((r).command_id::text, 15, 1) AS id_version,
       (r).log_id > 0 AS has_log_id, (r).sequence_id, (r).duplicate
  FROM (SELECT cqrs.submit_order('o-1', 'u-1', 10.50) AS r) s;

-- The row as DESIGN.md fixes it: payload with a JSON number, exact scale.
SELECT command_type, aggregate_id, sequence_id, payload,
       jsonb_typeof(payload -> 'amount') AS amount_type,
       created_at > now() - interval '1 minute' AS created_recently
  FROM cqrs.command_log WHERE aggregate_id = 'o-1';

-- With a caller-chosen command_id, and explicit sequence_id 1.
SELECT * FROM cqrs.submit_order('o-2', 'u-2', 99.99,
                                'a0000000-0000-4000-8000-000000000002', 1);

-- The same command again: nothing written, the original receipt back.
SELECT * FROM cqrs.submit_order('o-2', 'u-2', 99.99,
                                'a0000000-0000-4000-8000-000000000002');
-- Equal amounts spelled differently are the same command.
SELECT * FROM cqrs.submit_order('o-2', 'u-2', 99.990,
                                'a0000000-0000-4000-8000-000000000002');
SELECT count(*) AS rows_for_o2 FROM cqrs.command_log WHERE aggregate_id = 'o-2';

-- The same command_id for a different command: 23505, nothing written.
SELECT * FROM cqrs.submit_order('o-2', 'u-2', 100,
                                'a0000000-0000-4000-8000-000000000002');
\echo :SQLSTATE
SELECT * FROM cqrs.submit_order('o-2', 'u-3', 99.99,
                                'a0000000-0000-4000-8000-000000000002');
\echo :SQLSTATE
SELECT * FROM cqrs.submit_order('o-3', 'u-2', 99.99,
                                'a0000000-0000-4000-8000-000000000002');
\echo :SQLSTATE
SELECT * FROM cqrs.ship_order('o-2', 'a0000000-0000-4000-8000-000000000002');
\echo :SQLSTATE
SELECT count(*) AS rows_for_o2 FROM cqrs.command_log WHERE aggregate_id = 'o-2';
SELECT count(*) AS rows_for_o3 FROM cqrs.command_log WHERE aggregate_id = 'o-3';

-- A second CREATE_ORDER for an order under another command_id: 23505.
SELECT * FROM cqrs.submit_order('o-2', 'u-2', 99.99);
\echo :SQLSTATE
SELECT * FROM cqrs.submit_order('o-2', 'u-2', 99.99,
                                'a0000000-0000-4000-8000-0000000000ff');
\echo :SQLSTATE
SELECT count(*) AS rows_for_o2 FROM cqrs.command_log WHERE aggregate_id = 'o-2';

-- A CREATE_ORDER is always sequence 1 of its order.
SELECT * FROM cqrs.submit_order('o-4', 'u-4', 1, NULL, 2);
\echo :SQLSTATE
SELECT count(*) AS rows_for_o4 FROM cqrs.command_log WHERE aggregate_id = 'o-4';

-- Idempotency holds inside one transaction, and a rolled-back command
-- leaves nothing behind: its command_id can be used again.
BEGIN;
SELECT sequence_id, duplicate FROM cqrs.submit_order('o-5', 'u-5', 5,
                                'a0000000-0000-4000-8000-000000000005');
SELECT sequence_id, duplicate FROM cqrs.submit_order('o-5', 'u-5', 5,
                                'a0000000-0000-4000-8000-000000000005');
ROLLBACK;
SELECT count(*) AS rows_for_o5 FROM cqrs.command_log WHERE aggregate_id = 'o-5';
SELECT sequence_id, duplicate FROM cqrs.submit_order('o-5', 'u-5', 5,
                                'a0000000-0000-4000-8000-000000000005');

-- Unicode identifiers of the maximum length are accepted.
SELECT sequence_id FROM cqrs.submit_order(repeat('é', 128), 'ü', 0.01);
SELECT octet_length(aggregate_id) FROM cqrs.command_log
 WHERE payload ->> 'user_id' = 'ü';

-- The limits themselves are accepted: 1e15 and the smallest positive step.
SELECT sequence_id FROM cqrs.submit_order('o-max', 'u', 1e15);
SELECT sequence_id FROM cqrs.submit_order('o-min', 'u', 0.000001);
SELECT aggregate_id, payload -> 'amount' AS amount FROM cqrs.command_log
 WHERE aggregate_id IN ('o-max', 'o-min') ORDER BY 1;

-- Named arguments work as documented.
SELECT sequence_id, duplicate
  FROM cqrs.submit_order(order_id => 'o-6', user_id => 'u-6', amount => 6,
                         command_id => 'a0000000-0000-4000-8000-000000000006');

-- A command_id the server generates is in no other transaction and not in
-- the log: only the order is locked.  One the caller passes is locked too.
BEGIN;
SELECT sequence_id FROM cqrs.submit_order('lock-1', 'u', 1);
SELECT count(*) AS key_locks
  FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid();
SELECT sequence_id
  FROM cqrs.submit_order('lock-2', 'u', 1, 'a0000000-0000-4000-8000-0000000000f1');
SELECT count(*) AS key_locks
  FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid();
ROLLBACK;

-- A bulk transaction: 20,000 commands with the default
-- max_locks_per_transaction.  Past 256 commands the transaction locks the
-- log instead of each command's keys, so its locks stay few.
BEGIN;
SELECT count(*) AS appended
  FROM (SELECT cqrs.submit_order('bulk-' || i, 'u', 1) FROM generate_series(1, 20000) i) s;
SELECT count(*) BETWEEN 256 AND 2 * 256 AS key_locks_bounded
  FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid();
SELECT mode FROM pg_locks
 WHERE relation = 'cqrs.command_log'::regclass AND pid = pg_backend_pid() ORDER BY 1;
COMMIT;
SELECT count(*) AS bulk_orders FROM cqrs.command_log WHERE aggregate_id LIKE 'bulk-%';
