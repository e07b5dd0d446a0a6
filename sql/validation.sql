-- Bad input: an ERROR with a precise SQLSTATE, and nothing written.
-- Validation happens before the append, so not even a log_id is consumed.
\set VERBOSITY terse

SELECT sequence_id FROM cqrs.submit_order('v-1', 'u-1', 1);
SELECT count(*) AS log_rows FROM cqrs.command_log \gset before_
SELECT last_value AS log_id FROM cqrs.command_log_log_id_seq \gset before_

-- NULL ids: 22004.
SELECT cqrs.submit_order(NULL, 'u', 1);
\echo :SQLSTATE
SELECT cqrs.submit_order('v-2', NULL, 1);
\echo :SQLSTATE
SELECT cqrs.ship_order(NULL);
\echo :SQLSTATE
SELECT cqrs.cancel_order(NULL, 'r');
\echo :SQLSTATE

-- Empty ids: 22023.
SELECT cqrs.submit_order('', 'u', 1);
\echo :SQLSTATE
SELECT cqrs.submit_order('v-2', '', 1);
\echo :SQLSTATE
SELECT cqrs.ship_order('');
\echo :SQLSTATE
SELECT cqrs.cancel_order('');
\echo :SQLSTATE

-- Ids over 256 bytes (multi-byte characters count in bytes): 22023.
SELECT cqrs.submit_order(repeat('x', 257), 'u', 1);
\echo :SQLSTATE
SELECT cqrs.submit_order(repeat('é', 129), 'u', 1);
\echo :SQLSTATE
SELECT cqrs.submit_order('v-2', repeat('u', 257), 1);
\echo :SQLSTATE
SELECT cqrs.ship_order(repeat('x', 257));
\echo :SQLSTATE
SELECT cqrs.cancel_order(repeat('x', 257));
\echo :SQLSTATE

-- Ids with control characters (C0, DEL, C1): 22023.
SELECT cqrs.submit_order(E'v\n2', 'u', 1);
\echo :SQLSTATE
SELECT cqrs.submit_order(E'v\t2', 'u', 1);
\echo :SQLSTATE
SELECT cqrs.submit_order(E'v\x7f2', 'u', 1);
\echo :SQLSTATE
SELECT cqrs.submit_order(E'v\u00852', 'u', 1);
\echo :SQLSTATE
SELECT cqrs.submit_order('v-2', E'u\r', 1);
\echo :SQLSTATE
SELECT cqrs.ship_order(E'\x01');
\echo :SQLSTATE
SELECT cqrs.cancel_order(E'v\x1b');
\echo :SQLSTATE

-- Amounts: NULL, zero, negative, NaN, infinite, over 1e15: 22023.
SELECT cqrs.submit_order('v-2', 'u', NULL);
\echo :SQLSTATE
SELECT cqrs.submit_order('v-2', 'u', 0);
\echo :SQLSTATE
SELECT cqrs.submit_order('v-2', 'u', -0.01);
\echo :SQLSTATE
SELECT cqrs.submit_order('v-2', 'u', 'NaN');
\echo :SQLSTATE
SELECT cqrs.submit_order('v-2', 'u', 'Infinity');
\echo :SQLSTATE
SELECT cqrs.submit_order('v-2', 'u', '-Infinity');
\echo :SQLSTATE
SELECT cqrs.submit_order('v-2', 'u', 1e15 + 0.01);
\echo :SQLSTATE
SELECT cqrs.submit_order('v-2', 'u', 1e16);
\echo :SQLSTATE

-- sequence_id < 1: 22023.
SELECT cqrs.submit_order('v-2', 'u', 1, NULL, 0);
\echo :SQLSTATE
SELECT cqrs.ship_order('v-1', NULL, 0);
\echo :SQLSTATE
SELECT cqrs.ship_order('v-1', NULL, -5);
\echo :SQLSTATE
SELECT cqrs.cancel_order('v-1', NULL, NULL, 0);
\echo :SQLSTATE

-- reason over 1024 bytes: 22023.
SELECT cqrs.cancel_order('v-1', repeat('r', 1025));
\echo :SQLSTATE
SELECT cqrs.cancel_order('v-1', repeat('ж', 513));
\echo :SQLSTATE

-- Nothing of the above reached the log.
SELECT count(*) = :before_log_rows AS nothing_written FROM cqrs.command_log;
SELECT last_value = :before_log_id AS no_log_id_consumed
  FROM cqrs.command_log_log_id_seq;

-- At the limits: a 1024-byte reason and a 256-byte id are accepted.
SELECT sequence_id FROM cqrs.cancel_order('v-1', repeat('r', 1024));
SELECT sequence_id FROM cqrs.submit_order(repeat('x', 256), 'u', 1);
