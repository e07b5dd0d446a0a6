-- The output plugin "cqrs", read synchronously through the SQL interface:
-- command_log inserts only, one line each, a COMMIT line per transaction,
-- nothing for other tables, rolled-back or empty transactions, or changes
-- made under a replication origin (the projector's own writes).
\set VERBOSITY terse

-- A fresh log, so that log_id values are stable.
DROP EXTENSION cqrs;
CREATE EXTENSION cqrs;

-- Servers that restrict output plugins must trust this one for the session.
DO $$
BEGIN
	IF EXISTS (SELECT FROM pg_settings WHERE name = 'output_plugin_libraries') THEN
		PERFORM set_config('output_plugin_libraries',
						   current_setting('output_plugin_libraries') || ', cqrs',
						   false);
	END IF;
END
$$;

SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'cqrs');

SELECT sequence_id FROM cqrs.submit_order('d-1', 'u-1', 12.50,
                                'e1000000-0000-4000-8000-000000000001');
BEGIN;
SELECT sequence_id FROM cqrs.ship_order('d-1',
                                'e1000000-0000-4000-8000-000000000002');
SELECT sequence_id FROM cqrs.cancel_order('d-1', E'too "late"',
                                'e1000000-0000-4000-8000-000000000003');
COMMIT;

-- Not emitted: other tables, the read model, rolled-back commands,
-- duplicates (nothing is written for them).
CREATE TABLE decoder_other (x int);
INSERT INTO decoder_other VALUES (1);
INSERT INTO cqrs.read_model VALUES ('d-1', 'u-1', 12.50, 'created', 1);
BEGIN;
SELECT sequence_id FROM cqrs.submit_order('d-2', 'u-2', 1);
ROLLBACK;
SELECT duplicate FROM cqrs.submit_order('d-1', 'u-1', 12.50,
                                'e1000000-0000-4000-8000-000000000001');

SELECT data FROM pg_logical_slot_peek_changes('regression_slot', NULL, NULL);

-- The plugin takes no options.
SELECT data FROM pg_logical_slot_peek_changes('regression_slot', NULL, NULL,
                                              'format', 'json');

-- Consumed changes are gone.
SELECT count(*) > 0 AS consumed
  FROM pg_logical_slot_get_changes('regression_slot', NULL, NULL);
SELECT count(*) AS left_over
  FROM pg_logical_slot_peek_changes('regression_slot', NULL, NULL);

-- Changes made under a replication origin are filtered out.
SELECT 'origin' FROM pg_replication_origin_create('regress_cqrs_origin');
SELECT pg_replication_origin_session_setup('regress_cqrs_origin');
SELECT sequence_id FROM cqrs.submit_order('d-3', 'u-3', 3,
                                'e1000000-0000-4000-8000-000000000004');
SELECT pg_replication_origin_session_reset();
SELECT sequence_id FROM cqrs.submit_order('d-4', 'u-4', 4,
                                'e1000000-0000-4000-8000-000000000005');
SELECT data FROM pg_logical_slot_get_changes('regression_slot', NULL, NULL);

-- The trace context travels with the command.
SET cqrs.traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
SELECT sequence_id FROM cqrs.submit_order('d-5', 'u-5', 5,
                                'e1000000-0000-4000-8000-000000000006');
RESET cqrs.traceparent;
SELECT data FROM pg_logical_slot_get_changes('regression_slot', NULL, NULL);

SELECT pg_replication_origin_drop('regress_cqrs_origin');
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
DROP TABLE decoder_other;
