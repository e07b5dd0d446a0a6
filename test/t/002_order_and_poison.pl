# Per-order sequence order whatever the arrival order (parking), and poison
# commands: malformed ones written behind the functions' back and ones the
# read model rejects are dead-lettered with their reason while everything
# else is still applied.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = cqrs_node('order');
sub sql { $node->safe_psql('postgres', $_[0]) }

# Sequence 3, then 2, before the create.
sql(q{SELECT cqrs.cancel_order('x1', 'late', NULL, 3)});
sql(q{SELECT cqrs.ship_order('x1', NULL, 2)});
$node->poll_query_until('postgres',
	q{SELECT count(*) = 2 FROM cqrs.parked WHERE aggregate_id = 'x1'})
  or die 'commands were not parked';
is(sql(q{SELECT string_agg(sequence_id || ':' || waiting_for, ',' ORDER BY sequence_id)
	FROM cqrs.parked WHERE aggregate_id = 'x1'}),
	'2:1,3:1', 'sequences 2 and 3 wait for sequence 1');
is(sql(q{SELECT count(*) FROM cqrs.read_model WHERE order_id = 'x1'}), '0',
	'nothing is applied out of order');
is(sql(q{SELECT parked FROM cqrs.status}), '2', 'status shows the parked commands');

sql(q{SELECT cqrs.submit_order('x1', 'u1', 5, NULL, 1)});
wait_projected($node);
is(sql(q{SELECT status || ':' || version FROM cqrs.read_model WHERE order_id = 'x1'}),
	'shipped:3', 'the gap filled: create, ship, then the cancel in order');
is(sql(q{SELECT sequence_id || ':' || reason FROM cqrs.dead_letter WHERE aggregate_id = 'x1'}),
	'3:invalid transition: CANCEL_ORDER on a shipped order',
	'the cancel after the ship is an invalid transition');
is(sql(q{SELECT count(*) FROM cqrs.parked}), '0', 'nothing left parked');

# Commands written behind the functions by a superuser.
sql(q{INSERT INTO cqrs.command_log (command_id, command_type, aggregate_id, sequence_id, payload)
	VALUES (gen_random_uuid(), 'CREATE_ORDER', 'm1', 1, '{"user_id": 5}'),
	       (gen_random_uuid(), 'CREATE_ORDER', 'x1', 4, '{"user_id": "u", "amount": 1}')});
sql(q{SELECT cqrs.submit_order('after-1', 'u', 1)});
sql(q{SELECT cqrs.ship_order('after-1')});
wait_projected($node);
is(sql(q{SELECT reason FROM cqrs.dead_letter WHERE aggregate_id = 'm1'}),
	'malformed CREATE_ORDER payload: it needs a string "user_id" and a numeric "amount"',
	'a malformed create is dead-lettered with its reason');
is(sql(q{SELECT reason FROM cqrs.dead_letter WHERE aggregate_id = 'x1' AND sequence_id = 4}),
	'invalid transition: CREATE_ORDER at sequence 4 of an existing order',
	'a second create of an order is dead-lettered');
is(sql(q{SELECT status || ':' || version FROM cqrs.read_model WHERE order_id = 'after-1'}),
	'shipped:2', 'later commands are still applied');
is(sql(q{SELECT version FROM cqrs.read_model WHERE order_id = 'x1'}), '4',
	'the dead-lettered command still advanced its order');
compare_model($node, 'after malformed commands');

# A command the read model rejects, in one transaction (so one batch) with
# good ones: the batch is split until the poison command is alone.
sql(q{ALTER TABLE cqrs.read_model ADD CONSTRAINT regress_small CHECK (total_amount < 1000000)});
sql(q{BEGIN;
	SET LOCAL cqrs.traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
	SELECT cqrs.submit_order('good-1', 'u', 10);
	SELECT cqrs.submit_order('big-1', 'u', 2000000);
	SELECT cqrs.submit_order('good-2', 'u', 20);
	SELECT cqrs.ship_order('good-1');
	COMMIT});
wait_projected($node);
like(sql(q{SELECT reason FROM cqrs.dead_letter WHERE aggregate_id = 'big-1'}),
	qr/violates check constraint "regress_small"/,
	'the rejected command is dead-lettered with the error text');
is(sql(q{SELECT string_agg(order_id || ':' || status, ',' ORDER BY order_id)
	FROM cqrs.read_model WHERE order_id IN ('good-1', 'good-2', 'big-1')}),
	'good-1:shipped,good-2:created', 'the rest of its batch is applied');
is(sql(q{SELECT string_agg(order_id || ' ' || problem, ',') FROM cqrs.verify()}),
	'big-1 missing from the read model',
	'verify() reports the order the read model refused');
like(slurp_file($node->logfile), qr/CONTEXT:  cqrs projector applying CREATE_ORDER command .* order "big-1", sequence 1, traceparent 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\)/,
	'the error context names the command and its trace context');
like(slurp_file($node->logfile), qr/LOG:  cqrs projector dead-lettered command .*\n.*DETAIL:  traceparent 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01/,
	'so does the log line of the dead letter');
is(sql(q{SELECT traceparent FROM cqrs.dead_letter WHERE aggregate_id = 'big-1'}),
	'00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01',
	'the dead letter keeps the trace context');
is(sql(q{SELECT state FROM cqrs.status}), 'running', 'the projector keeps running');
sql(q{ALTER TABLE cqrs.read_model DROP CONSTRAINT regress_small});

# A transient error (here a serialization failure raised by a trigger on
# the read model while a switch is on) is retried with backoff: nothing is
# dead-lettered, status shows the error, and the batch goes in once the
# cause is gone.
sql(q{CREATE TABLE regress_switch (fail boolean);
	INSERT INTO regress_switch VALUES (true);
	CREATE FUNCTION regress_flaky() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
		IF (SELECT fail FROM regress_switch) THEN
			RAISE EXCEPTION 'simulated conflict' USING ERRCODE = 'serialization_failure';
		END IF;
		RETURN NEW;
	END $$;
	CREATE TRIGGER regress_flaky BEFORE INSERT OR UPDATE ON cqrs.read_model
		FOR EACH ROW EXECUTE FUNCTION regress_flaky()});
my $dead_before = sql(q{SELECT count(*) FROM cqrs.dead_letter});
sql(q{SELECT cqrs.submit_order('retry-1', 'u', 1)});
$node->poll_query_until('postgres',
	q{SELECT state = 'error' AND last_error = 'simulated conflict' FROM cqrs.status})
  or die 'the transient error did not show in cqrs.status';
sleep 1;
is(sql(q{SELECT count(*) FROM cqrs.read_model WHERE order_id = 'retry-1'}), '0',
	'while the error lasts the command is not applied');
is(sql(q{SELECT count(*) FROM cqrs.dead_letter}), $dead_before,
	'a transient error dead-letters nothing');
sql(q{UPDATE regress_switch SET fail = false});
$node->poll_query_until('postgres',
	q{SELECT count(*) = 1 FROM cqrs.read_model WHERE order_id = 'retry-1'})
  or die 'the batch was not retried';
$node->poll_query_until('postgres', q{SELECT state = 'running' FROM cqrs.status})
  or die 'the projector did not return to running';
like(slurp_file($node->logfile),
	qr/WARNING:  cqrs projector could not apply a batch of 1 commands: simulated conflict/,
	'the retry is logged');
pass('the projector retried the batch after the transient error');

# A create for an order that already has a read-model row, as after a
# catch-up from the log that overlapped the slot.  New orders are not
# looked up, so the insert fails; the batch is folded again with lookups:
# the create counts as applied already, nothing is dead-lettered, and the
# rest of the batch goes in.
sql(q{INSERT INTO cqrs.read_model (order_id, user_id, total_amount, status, version)
	VALUES ('pre-1', 'u', 1, 'created', 1)});
sql(q{BEGIN;
	SELECT cqrs.submit_order('pre-1', 'u', 5);
	SELECT cqrs.submit_order('pre-2', 'u', 6);
	SELECT cqrs.ship_order('pre-1');
	COMMIT});
wait_projected($node);
is(sql(q{SELECT count(*) FROM cqrs.dead_letter WHERE aggregate_id IN ('pre-1', 'pre-2')}),
	'0', 'a create whose row exists is not dead-lettered');
is(sql(q{SELECT string_agg(order_id || ':' || status || ':' || version || ':' || total_amount, ',' ORDER BY order_id)
	FROM cqrs.read_model WHERE order_id IN ('pre-1', 'pre-2')}),
	'pre-1:shipped:2:1,pre-2:created:1:6',
	'the existing row counts as the create; the rest of the batch is applied');

# The same for a command alone in its batch (a batch of one is not split).
sql(q{INSERT INTO cqrs.read_model (order_id, user_id, total_amount, status, version)
	VALUES ('pre-3', 'u', 1, 'created', 1)});
sql(q{SELECT cqrs.submit_order('pre-3', 'u', 5)});
wait_projected($node);
is(sql(q{SELECT count(*) FROM cqrs.dead_letter WHERE aggregate_id = 'pre-3'}),
	'0', 'a lone create whose row exists is not dead-lettered either');

$node->stop;
done_testing();
