# Repair and rebuild from psql: a dead-lettered command retried after the
# fix (its parked successor follows), the refusals of retry_dead_letter(),
# skip_parked(), and cqrs.rebuild() under a write load and a read load:
# readers never fail or see an empty table, nothing committed is lost or
# applied twice, and the table stays the same object.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = cqrs_node('repair');
sub sql { $node->safe_psql('postgres', $_[0]) }

# A command the read model refuses, and its successor parked behind it.
sql(q{ALTER TABLE cqrs.read_model ADD CONSTRAINT regress_small CHECK (total_amount < 1000)});
my $create = sql(q{SELECT command_id FROM cqrs.submit_order('big-1', 'u', 5000)});
my $ship = sql(q{SELECT command_id FROM cqrs.ship_order('big-1')});
wait_projected($node);
like(sql(qq{SELECT reason FROM cqrs.dead_letter WHERE command_id = '$create'}),
	qr/regress_small/, 'the create is dead-lettered');
is(sql(q{SELECT count(*) FROM cqrs.parked WHERE aggregate_id = 'big-1'}), '1',
	'the ship waits behind it');

# Retrying before the fix dead-letters it again, with the new reason.
is(sql(qq{SELECT cqrs.retry_dead_letter('$create')}), 'f',
	'a retry that fails again returns false');
is(sql(qq{SELECT count(*) FROM cqrs.dead_letter WHERE command_id = '$create'}), '1',
	'and the command is dead-lettered (once)');

# After the fix it is applied, and the parked ship with it.
sql(q{ALTER TABLE cqrs.read_model DROP CONSTRAINT regress_small});
is(sql(qq{SELECT cqrs.retry_dead_letter('$create')}), 't',
	'the retry after the fix applies the command');
is(sql(q{SELECT status || ':' || version || ':' || total_amount FROM cqrs.read_model WHERE order_id = 'big-1'}),
	'shipped:2:5000', 'the order is created and its parked ship applied');
is(sql(q{SELECT count(*) FROM cqrs.dead_letter WHERE aggregate_id = 'big-1'}) .
	sql(q{SELECT count(*) FROM cqrs.parked WHERE aggregate_id = 'big-1'}), '00',
	'nothing of the order is left dead-lettered or parked');
my ($rc, $out, $err) = $node->psql('postgres',
	qq{SELECT cqrs.retry_dead_letter('$create')}, extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:  42704: command $create is not dead-lettered/,
	'a command that is not dead-lettered is not retried: an error says so');

# An invalid transition stays invalid; a command whose order moved on is
# refused.
sql(q{SELECT cqrs.submit_order('t-1', 'u', 1)});
sql(q{SELECT cqrs.cancel_order('t-1')});
my $bad = sql(q{SELECT command_id FROM cqrs.ship_order('t-1')});
wait_projected($node);
is(sql(qq{SELECT cqrs.retry_dead_letter('$bad')}), 'f',
	'an invalid transition is dead-lettered again');
like(sql(qq{SELECT reason FROM cqrs.dead_letter WHERE command_id = '$bad'}),
	qr/invalid transition: SHIP_ORDER on a cancelled order/, 'with its reason');
sql(q{ALTER TABLE cqrs.read_model ADD CONSTRAINT regress_no_ship CHECK (order_id <> 't-2' OR status <> 'shipped')});
sql(q{SELECT cqrs.submit_order('t-2', 'u', 1)});
my $poisoned = sql(q{SELECT command_id FROM cqrs.ship_order('t-2')});
wait_projected($node);
sql(q{ALTER TABLE cqrs.read_model DROP CONSTRAINT regress_no_ship});
sql(q{SELECT cqrs.cancel_order('t-2', NULL, NULL, 3)});
wait_projected($node);
my ($ret, $stdout, $stderr) = $node->psql('postgres',
	qq{SELECT cqrs.retry_dead_letter('$poisoned')});
like($stderr, qr/order "t-2" has moved past sequence 2/,
	'a command whose order moved on is not retried');

# One session folds twice: what it learnt of cqrs.parked the first time
# (nothing parked) must not hide the command the projector parks before
# the second.
my $bad2 = sql(q{SELECT command_id FROM cqrs.ship_order('t-1')});
wait_projected($node);
sql(q{ALTER TABLE cqrs.read_model ADD CONSTRAINT regress_small CHECK (order_id <> 'big-2' OR total_amount < 1000)});
is($node->safe_psql('postgres', qq{
	SELECT cqrs.retry_dead_letter('$bad2');
	SELECT cqrs.submit_order('big-2', 'u', 5000);
	SELECT cqrs.ship_order('big-2');
	DO \$\$ BEGIN
		WHILE NOT EXISTS (SELECT FROM cqrs.parked WHERE aggregate_id = 'big-2') LOOP
			PERFORM pg_sleep(0.01);
		END LOOP;
	END \$\$;
	ALTER TABLE cqrs.read_model DROP CONSTRAINT regress_small;
	SELECT cqrs.retry_dead_letter(command_id) FROM cqrs.dead_letter WHERE aggregate_id = 'big-2';
	SELECT status FROM cqrs.read_model WHERE order_id = 'big-2';
}) =~ s/.*\n//sr, 'shipped', 'a session that folded before still releases the parked successor');

# skip_parked: give up on a missing predecessor.
sql(q{SELECT cqrs.submit_order('g-1', 'u', 1)});
my $late = sql(q{SELECT command_id FROM cqrs.cancel_order('g-1', NULL, NULL, 3)});
wait_projected($node);
is(sql(q{SELECT waiting_for FROM cqrs.parked WHERE aggregate_id = 'g-1'}), '2',
	'sequence 3 waits for 2');
is(sql(qq{SELECT cqrs.skip_parked('$late')}), 't', 'skip_parked takes it');
like(sql(qq{SELECT reason FROM cqrs.dead_letter WHERE command_id = '$late'}),
	qr/skipped with cqrs.skip_parked\(\) by postgres while waiting for sequence 2/,
	'the dead letter says who skipped it and what it waited for');
($rc, $out, $err) = $node->psql('postgres',
	qq{SELECT cqrs.skip_parked('$late')}, extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:  42704: command $late is not parked/,
	'a command not parked is not skipped: an error says so');

# A read model damaged by hand: one row changed, one deleted, one added.
sql(q{UPDATE cqrs.read_model SET status = 'shipped' WHERE order_id = 'g-1'});
sql(q{DELETE FROM cqrs.read_model WHERE order_id = 't-1'});
sql(q{INSERT INTO cqrs.read_model (order_id, user_id, total_amount, status, version) VALUES ('ghost', 'u', 1, 'created', 1)});
cmp_ok(sql(q{SELECT count(*) FROM cqrs.verify()}), '>=', 3,
	'verify() sees the damage (and the repairs that departed from the log)');

my $bad_failed_at = sql(qq{SELECT failed_at FROM cqrs.dead_letter WHERE command_id = '$bad'});

# cqrs.rebuild() under load: writers keep submitting, readers keep reading.
sql(q{CREATE ROLE regress_reader LOGIN IN ROLE cqrs_reader});
my $model_oid = sql(q{SELECT 'cqrs.read_model'::regclass::oid});
my $writes = start_load($node, q{
SELECT cqrs.submit_order('rb-' || cqrs.uuidv7(), 'u', 2);
}, 2, 6);
my $reads = start_load($node, q{
SELECT 1 / (count(*) > 0)::int FROM cqrs.read_model;
SELECT 1 / count(*)::int FROM cqrs.read_model WHERE order_id = 'big-1';
}, 2, 6, '-U', 'regress_reader');
sleep 2;
my $replayed = sql(q{SELECT cqrs.rebuild()});
my $w = finish_load($writes);
my $r = finish_load($reads);
cmp_ok($replayed, '>', 100, "rebuild replayed the log ($replayed commands)");
like($r, qr/number of failed transactions: 0/,
	'readers never failed nor saw an empty table during the rebuild') or diag($r);
like($w, qr/number of failed transactions: 0/, 'writers were not disturbed')
  or diag($w);
wait_projected($node);
is(sql(q{SELECT count(*) FROM cqrs.verify()}), '0',
	'after the rebuild and catch-up the read model is the fold of the log');
my $exp = expected_model($node);
is(sql(q{SELECT count(*) FROM cqrs.read_model WHERE order_id LIKE 'rb-%'}),
	scalar(grep { /^rb-/ } keys %{ $exp->{orders} }),
	'every order submitted during the rebuild is there');
is(sql(q{SELECT 'cqrs.read_model'::regclass::oid}), $model_oid,
	'the read model is the same table, with its indexes, privileges and triggers');
is($node->safe_psql('postgres', q{SELECT count(*) > 0 FROM cqrs.read_model},
	extra_params => [ '-U', 'regress_reader' ]), 't', 'readers keep their privilege');
is(sql(q{SELECT state FROM cqrs.status}), 'running', 'the projector runs on after the rebuild');
is(sql(qq{SELECT failed_at FROM cqrs.dead_letter WHERE command_id = '$bad'}), $bad_failed_at,
	'a dead letter the replay derives again is kept as it was');
is(sql(qq{SELECT count(*) FROM cqrs.dead_letter WHERE command_id = '$late'}) .
	sql(qq{SELECT count(*) FROM cqrs.parked WHERE command_id = '$late'}), '01',
	'the skipped command waits for its predecessor again, no longer dead-lettered');
like(slurp_file($node->logfile), qr/LOG:  cqrs.rebuild\(\) replayed \d+ commands/,
	'the rebuild is logged');
# Meanwhile the projector retried its batch with backoff: every commit of
# the writers set its latch, and a backoff that woke on it would have
# retried hundreds of times.
my $retries = () = slurp_file($node->logfile) =~ /could not apply a batch of \d+ commands: cqrs.rebuild\(\) or a repair function is running/g;
cmp_ok($retries, '<', 30, "the projector backed off while the rebuild ran ($retries retries)");

# A row the read model now refuses: the rebuild falls back to rewriting
# every row, and the refused command is dead-lettered as the projector
# would have done.
sql(q{UPDATE cqrs.read_model SET status = 'shipped' WHERE order_id = 'g-1'});
sql(q{ALTER TABLE cqrs.read_model ADD CONSTRAINT regress_rb CHECK (order_id <> 'g-1' OR status <> 'created') NOT VALID});
cmp_ok(sql(q{SELECT cqrs.rebuild()}), '>', 100, 'a rebuild with a refused command still completes');
like(slurp_file($node->logfile), qr/LOG:  cqrs.rebuild\(\) rewrites the whole read model: new row for relation "read_model" violates check constraint "regress_rb"/,
	'after saying why it rewrites everything');
like(sql(q{SELECT reason FROM cqrs.dead_letter WHERE aggregate_id = 'g-1' AND sequence_id = 1}),
	qr/regress_rb/, 'the refused command is dead-lettered');
is(sql(q{SELECT string_agg(order_id || ' ' || problem, ',') FROM cqrs.verify()}),
	'g-1 missing from the read model', 'and everything else is the fold of the log');
sql(q{ALTER TABLE cqrs.read_model DROP CONSTRAINT regress_rb});
sql(q{SELECT cqrs.rebuild()});
is(sql(q{SELECT count(*) FROM cqrs.verify()}), '0', 'the next rebuild repairs that order too');
is(sql(q{SELECT count(*) FROM cqrs.dead_letter WHERE aggregate_id = 'g-1' AND sequence_id = 1}),
	'0', 'and deletes the dead letter of the command it now applies');

# Rebuilding in REPEATABLE READ would fold a stale snapshot: refused.
($ret, $stdout, $stderr) = $node->psql('postgres',
	q{BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT cqrs.rebuild(); COMMIT});
like($stderr, qr/cqrs.rebuild\(\) cannot run in a REPEATABLE READ transaction/,
	'rebuild refuses REPEATABLE READ');

$node->stop;
done_testing();
