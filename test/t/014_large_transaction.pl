# One transaction of many commands: the projector's memory stays within
# cqrs.projector_work_mem, the commands beyond it spilled to a temporary
# file, and the transaction is applied in parts of at most
# cqrs.batch_size_max commands.  Only the last part records the position,
# so a projector killed between parts applies the whole transaction again
# after the restart, and the version rule makes that harmless: every
# command takes effect exactly once.
#
# The budget is the smallest allowed, so that a few thousand commands
# spill.  The parts are made visible by holding a row lock on an order the
# transaction's last command ships: the earlier parts commit, the last one
# waits.  A projector that applied the transaction at once would commit
# nothing while it waits.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use IPC::Run;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = cqrs_node('large_transaction', conf => qq{
restart_after_crash = on
cqrs.projector_work_mem = '64kB'
cqrs.batch_size_max = 500
});
sub sql { $node->safe_psql('postgres', $_[0]) }
sub metric
{
	sql(qq{SELECT value FROM cqrs.metrics() WHERE name = '$_[0]'});
}

# What a spilled command must keep: its order, user and amount, explicit
# sequences (a gap is parked), the traceparent (kept with a dead letter),
# a NULL reason.
my $tp = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
sql(q{SELECT cqrs.submit_order('lt-early', 'u', 1)});
wait_projected($node);
sql(qq{
BEGIN;
SELECT cqrs.submit_order('lt-a-' || i, 'user-' || i, i) FROM generate_series(1, 6000) i;
SELECT cqrs.ship_order('lt-a-' || i) FROM generate_series(1, 6000, 3) i;
SELECT cqrs.cancel_order('lt-a-' || i) FROM generate_series(2, 6000, 3) i;
SELECT cqrs.ship_order('lt-a-5', sequence_id => 4);
SET LOCAL cqrs.traceparent = '$tp';
SELECT cqrs.ship_order('lt-a-2');
SELECT cqrs.cancel_order('lt-early');
COMMIT;
});
wait_projected($node);
cmp_ok(metric('cqrs_spilled_total'), '>', 5000,
	'commands beyond the budget were spilled');
is(sql(q{SELECT last_batch_size FROM cqrs.status}), '10003',
	'the transaction was one batch');
is(sql(q{SELECT traceparent FROM cqrs.dead_letter WHERE aggregate_id = 'lt-a-2'}), $tp,
	'a spilled command keeps its traceparent into the dead letter');
is(sql(q{SELECT count(*) FROM cqrs.parked WHERE aggregate_id = 'lt-a-5'}), '1',
	'a spilled command with a gap is parked');
is(sql(q{SELECT status || ',' || version FROM cqrs.read_model WHERE order_id = 'lt-early'}),
	'cancelled,2', 'the order from before the transaction moved on');
compare_model($node, 'one spilled transaction');

# Parts: an order whose row a session keeps locked, shipped by the last
# command of the transaction.
sql(q{SELECT cqrs.submit_order('lt-last', 'u', 1)});
wait_projected($node);
my ($out, $err) = ('', '');
my $locker = IPC::Run::start(
	[ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'),
	  '-c', q{BEGIN; SELECT order_id FROM cqrs.read_model WHERE order_id = 'lt-last' FOR UPDATE; SELECT pg_sleep(600)} ],
	'>', \$out, '2>', \$err);
$node->poll_query_until('postgres', q{
	SELECT count(*) > 0 FROM pg_stat_activity
	 WHERE wait_event = 'PgSleep' AND pid <> pg_backend_pid()})
  or die 'the locking session did not start';

sql(q{
BEGIN;
SELECT cqrs.submit_order('lt-b-' || i, 'u', i) FROM generate_series(1, 5000) i;
SELECT cqrs.ship_order('lt-b-' || i) FROM generate_series(1, 5000, 2) i;
SELECT cqrs.ship_order('lt-last');
COMMIT;
});
$node->poll_query_until('postgres', q{
	SELECT count(*) = 5000 FROM cqrs.read_model WHERE order_id LIKE 'lt-b-%'})
  or die 'the parts before the last were not applied';
my $leader = sql(q{SELECT leader_pid FROM cqrs.status});
$node->poll_query_until('postgres', qq{
	SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $leader})
  or die 'the last part does not wait for the lock';
is(sql(q{SELECT status FROM cqrs.read_model WHERE order_id = 'lt-last'}), 'created',
	'the last part waits, uncommitted');
cmp_ok(sql(q{SELECT count(*) FROM cqrs.read_model
	WHERE order_id LIKE 'lt-b-%' AND status = 'shipped'}), '<', 2500,
	'... while the parts before it are committed');

# kill -9 between parts: the postmaster restarts everything, the locker too
kill 'KILL', $leader;
$locker->finish;
$node->poll_query_until('postgres', qq{
	SELECT leader_pid IS NOT NULL AND leader_pid <> $leader AND state = 'running'
	  FROM cqrs.status})
  or die 'the projector did not come back after kill -9';
wait_projected($node);
is(sql(q{SELECT status || ',' || version FROM cqrs.read_model WHERE order_id = 'lt-last'}),
	'shipped,2', 'the transaction was applied in full after the restart');
cmp_ok(metric('cqrs_spilled_total'), '>', 5000,
	'... spilled again by the new projector (the counters restart with the server)');
is(sql(q{SELECT count(*) FROM cqrs.dead_letter
	WHERE aggregate_id LIKE 'lt-b-%' OR aggregate_id = 'lt-last'}), '0',
	'no command of it was applied twice (a second SHIP would be dead-lettered)');
compare_model($node, 'after a kill -9 between parts');

unlike(slurp_file($node->logfile), qr/could not read from cqrs spill file/,
	'the spill file was read back whole');
$node->stop;
done_testing();
