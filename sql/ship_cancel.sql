-- cqrs.ship_order() and cqrs.cancel_order(): server-assigned or explicit
-- sequences, idempotency, and payloads.
\set VERBOSITY terse

SELECT sequence_id FROM cqrs.submit_order('s-1', 'u-1', 20);

-- The server assigns the next sequence of the order.
SELECT sequence_id, duplicate FROM cqrs.ship_order('s-1',
                                'b0000000-0000-4000-8000-000000000001');
SELECT sequence_id, duplicate FROM cqrs.cancel_order('s-1', 'changed my mind',
                                'b0000000-0000-4000-8000-000000000002');
SELECT sequence_id, command_type, payload FROM cqrs.command_log
 WHERE aggregate_id = 's-1' ORDER BY sequence_id;

-- A retry gets its original sequence back, not a new one.
SELECT sequence_id, duplicate FROM cqrs.ship_order('s-1',
                                'b0000000-0000-4000-8000-000000000001');
SELECT sequence_id, duplicate FROM cqrs.cancel_order('s-1', 'changed my mind',
                                'b0000000-0000-4000-8000-000000000002');
-- ... and the same id with another reason is another command.
SELECT sequence_id FROM cqrs.cancel_order('s-1', 'other reason',
                                'b0000000-0000-4000-8000-000000000002');
\echo :SQLSTATE
-- ... as is the same id with another explicit sequence.
SELECT sequence_id FROM cqrs.ship_order('s-1',
                                'b0000000-0000-4000-8000-000000000001', 7);
\echo :SQLSTATE
-- ... while the same id with its own sequence is the same command.
SELECT sequence_id, duplicate FROM cqrs.ship_order('s-1',
                                'b0000000-0000-4000-8000-000000000001', 2);
SELECT count(*) AS rows_for_s1 FROM cqrs.command_log WHERE aggregate_id = 's-1';

-- A NULL reason is a JSON null.
SELECT sequence_id FROM cqrs.submit_order('s-2', 'u-2', 1);
SELECT sequence_id FROM cqrs.cancel_order('s-2');
SELECT payload, jsonb_typeof(payload -> 'reason') FROM cqrs.command_log
 WHERE aggregate_id = 's-2' AND command_type = 'CANCEL_ORDER';

-- Server-assigned sequences need the order to have a command: ERROR, and
-- nothing is written.
SELECT * FROM cqrs.ship_order('no-such-order');
\echo :SQLSTATE
SELECT * FROM cqrs.cancel_order('no-such-order', 'x');
\echo :SQLSTATE
SELECT count(*) AS rows_for_missing FROM cqrs.command_log
 WHERE aggregate_id = 'no-such-order';

-- A rolled-back command leaves no gap in the order's sequences.
BEGIN;
SELECT sequence_id FROM cqrs.ship_order('s-2');
ROLLBACK;
SELECT sequence_id FROM cqrs.ship_order('s-2');
SELECT array_agg(sequence_id ORDER BY sequence_id) AS s2_sequences
  FROM cqrs.command_log WHERE aggregate_id = 's-2';

-- Explicit sequences: accepted with predecessors missing, in any order.
SELECT sequence_id FROM cqrs.cancel_order('s-3', 'late', NULL, 3);
SELECT sequence_id FROM cqrs.ship_order('s-3', NULL, 2);
SELECT sequence_id FROM cqrs.submit_order('s-3', 'u-3', 3, NULL, 1);
SELECT array_agg(command_type ORDER BY sequence_id) AS s3_commands
  FROM cqrs.command_log WHERE aggregate_id = 's-3';

-- The server continues after the highest sequence, gaps or not.
SELECT sequence_id FROM cqrs.ship_order('s-4', NULL, 5);
SELECT sequence_id FROM cqrs.ship_order('s-4');

-- A taken sequence is 23505, nothing written.
SELECT * FROM cqrs.ship_order('s-3', NULL, 2);
\echo :SQLSTATE
SELECT * FROM cqrs.cancel_order('s-3', NULL, NULL, 3);
\echo :SQLSTATE
SELECT count(*) AS rows_for_s3 FROM cqrs.command_log WHERE aggregate_id = 's-3';

-- The largest sequence_id is accepted; after it the order has none left:
-- 22003, with no internal statement in the error, and nothing written.
SELECT sequence_id FROM cqrs.ship_order('s-4', NULL, 9223372036854775807);
SELECT nextval('cqrs.command_log_log_id_seq') AS log_id_before \gset
\set VERBOSITY default
SELECT * FROM cqrs.ship_order('s-4');
\set VERBOSITY terse
\echo :SQLSTATE
SELECT count(*) AS rows_for_s4 FROM cqrs.command_log WHERE aggregate_id = 's-4';
SELECT nextval('cqrs.command_log_log_id_seq') = :log_id_before + 1 AS no_log_id_consumed;

-- Sequence 1 belongs to the CREATE_ORDER.
SELECT * FROM cqrs.ship_order('s-5', NULL, 1);
\echo :SQLSTATE
SELECT * FROM cqrs.cancel_order('s-5', NULL, NULL, 1);
\echo :SQLSTATE
SELECT count(*) AS rows_for_s5 FROM cqrs.command_log WHERE aggregate_id = 's-5';

-- Several commands on one order in one transaction get consecutive numbers.
BEGIN;
SELECT sequence_id FROM cqrs.submit_order('s-6', 'u-6', 6);
SELECT sequence_id FROM cqrs.ship_order('s-6');
SELECT sequence_id FROM cqrs.cancel_order('s-6');
COMMIT;

-- Every order's sequences are unique (the log enforces it).
SELECT aggregate_id, sequence_id, count(*) FROM cqrs.command_log
 GROUP BY 1, 2 HAVING count(*) > 1;
