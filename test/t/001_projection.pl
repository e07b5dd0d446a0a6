# The projector keeps cqrs.read_model equal to the fold of the command log
# under a random mix of creates, ships and cancels from several clients,
# invalid transitions included, while a column is added to the read model;
# cqrs.enabled = off stops projection without losing the position.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = cqrs_node('projection');

$node->safe_psql('postgres', q{
CREATE FUNCTION random_command(o int, k int) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	IF k <= 4 THEN
		PERFORM cqrs.submit_order('o' || o, 'u' || (o % 17), (o % 997 + 1) * 1.25);
	ELSIF k <= 7 THEN
		PERFORM cqrs.ship_order('o' || o);
	ELSE
		PERFORM cqrs.cancel_order('o' || o, 'reason ' || k);
	END IF;
EXCEPTION WHEN unique_violation OR foreign_key_violation THEN
	NULL;	-- order exists already / does not exist yet
END
$$;
});

my $script = q{
\set o random(1, 3000)
\set k random(1, 10)
SELECT random_command(:o, :k);
};

# Load from 4 clients while 2 others scan the read model over and over
# (a scan must never take a row of a batch in progress for an aborted
# one); a command parked for good makes every batch look for parked
# commands too.  Halfway, a column is added to the read model.
$node->safe_psql('postgres', q{SELECT cqrs.cancel_order('gap-1', NULL, NULL, 3)});
my $load = start_load($node, $script, 4, 6);
my $scans = start_load($node, q{SELECT count(*) FROM cqrs.read_model;}, 2, 6);
sleep 3;
$node->safe_psql('postgres',
	'ALTER TABLE cqrs.read_model ADD COLUMN note text DEFAULT NULL');
my $out = finish_load($load);
like($out, qr/number of failed transactions: 0/, 'the load ran without errors')
  or diag($out);
finish_load($scans);

wait_projected($node);
my $exp = compare_model($node, 'random mix');
cmp_ok(scalar(keys %{ $exp->{orders} }), '>', 1000, 'the mix created many orders');
cmp_ok($exp->{dead}, '>', 50, 'the mix included invalid transitions');
is($node->safe_psql('postgres', q{SELECT count(*) FROM cqrs.dead_letter
	WHERE reason LIKE 'invalid transition:%'}),
	$exp->{dead}, 'dead letters name the invalid transition');
is($node->safe_psql('postgres', 'SELECT last_error IS NULL FROM cqrs.status'),
	't', 'no error while the column was added');
cmp_ok($node->safe_psql('postgres', 'SELECT applied_total FROM cqrs.status'),
	'>', 0, 'status counts applied commands');

# The position is in cqrs.offset_tracking, and the slot is confirmed.
is($node->safe_psql('postgres', q{
	SELECT o.last_lsn <= s.confirmed_flush_lsn
	  FROM cqrs.offset_tracking o JOIN pg_replication_slots s USING (slot_name)}),
	't', 'offset recorded and slot confirmed up to it');

# cqrs.enabled = off: nothing is applied, the position is kept.
$node->append_conf('postgresql.conf', 'cqrs.enabled = off');
$node->reload;
$node->poll_query_until('postgres', "SELECT state = 'disabled' FROM cqrs.status")
  or die 'projection did not stop';
$node->safe_psql('postgres', q{SELECT cqrs.submit_order('off-1', 'u', 1)});
sleep 1;
is($node->safe_psql('postgres',
	q{SELECT count(*) FROM cqrs.read_model WHERE order_id = 'off-1'}),
	'0', 'with cqrs.enabled off the command is not projected');
is($node->safe_psql('postgres',
	q{SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'cqrs' AND NOT active}),
	'1', 'the slot is kept, inactive');

$node->append_conf('postgresql.conf', 'cqrs.enabled = on');
$node->reload;
$node->poll_query_until('postgres',
	q{SELECT count(*) = 1 FROM cqrs.read_model WHERE order_id = 'off-1'})
  or die 'projection did not resume';
compare_model($node, 'after re-enabling');

# DROP EXTENSION: the slot goes with it.
$node->safe_psql('postgres', 'DROP EXTENSION cqrs');
ok($node->poll_query_until('postgres',
	q{SELECT count(*) = 0 FROM pg_replication_slots WHERE slot_name = 'cqrs'}),
	'DROP EXTENSION leaves no replication slot holding WAL');

# CREATE EXTENSION again: the worker resumes without a restart.
$node->safe_psql('postgres', 'CREATE EXTENSION cqrs');
$node->safe_psql('postgres', q{SELECT cqrs.submit_order('again-1', 'u', 1)});
ok($node->poll_query_until('postgres',
	q{SELECT count(*) = 1 FROM cqrs.read_model WHERE order_id = 'again-1'}),
	'after CREATE EXTENSION the projector resumes');

# Dropped and created again at once: the old log never reaches the new model.
$node->safe_psql('postgres', q{SELECT cqrs.submit_order('old-' || i, 'u', 1) FROM generate_series(1, 50) i});
$node->safe_psql('postgres', 'DROP EXTENSION cqrs; CREATE EXTENSION cqrs');
$node->safe_psql('postgres', q{SELECT cqrs.submit_order('new-1', 'u', 1)});
$node->poll_query_until('postgres',
	q{SELECT count(*) = 1 FROM cqrs.read_model WHERE order_id = 'new-1'})
  or die 'projection did not resume after DROP and CREATE';
wait_projected($node);
compare_model($node, 'after DROP and CREATE EXTENSION');

# Commands of a declared domain, mixed in the same transactions with
# orders, streamed and then folded again by cqrs.rebuild(): the
# orders' projection skips them, dead-letters none and parks none.
$node->safe_psql('postgres', q{
	SELECT cqrs.create_aggregate_type('account');
	SELECT cqrs.create_command_type('OPEN_ACCOUNT', 'account', true);
	SELECT cqrs.create_command_type('DEPOSIT', 'account', false);
	BEGIN;
	SELECT cqrs.submit('OPEN_ACCOUNT', 'acct-' || i, '{}') FROM generate_series(1, 200) i;
	SELECT cqrs.submit_order('mix-' || i, 'u', 1) FROM generate_series(1, 200) i;
	SELECT cqrs.submit('DEPOSIT', 'acct-' || i, '{"amount": 1}') FROM generate_series(1, 200) i;
	SELECT cqrs.ship_order('mix-' || i) FROM generate_series(1, 200) i;
	COMMIT;
});
wait_projected($node);
is($node->safe_psql('postgres', q{SELECT count(*) FROM cqrs.read_model WHERE order_id LIKE 'acct-%'}),
	'0', 'no read-model row for an account');
is($node->safe_psql('postgres', q{SELECT count(*) FROM cqrs.dead_letter WHERE aggregate_id LIKE 'acct-%'})
	. $node->safe_psql('postgres', q{SELECT count(*) FROM cqrs.parked WHERE aggregate_id LIKE 'acct-%'}),
	'00', 'no account command dead-lettered or parked');
compare_model($node, 'with a declared domain beside the orders');
is($node->safe_psql('postgres', q{SELECT cqrs.rebuild() > 0}), 't',
	'a rebuild folds the log with both domains');
compare_model($node, 'after a rebuild with a declared domain');

$node->stop;
done_testing();
