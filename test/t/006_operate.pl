# Operating the projector: a pause takes effect after the current batch,
# shows in cqrs.status and survives a restart while commands are still
# accepted; resume catches up with nothing lost or applied twice; the
# schema-change procedure (pause, DDL, resume); the read-your-writes fences
# cqrs.wait_for() and cqrs.wait_for_lsn() wake when the projector applies,
# and time out while it is paused; status says "pausing" until the batch
# being applied when cqrs.pause() commits is done.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use IPC::Run;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $node = cqrs_node('operate');
sub sql { $node->safe_psql('postgres', $_[0]) }

# Pause in the middle of a load from 4 clients.
my $script = q{
\set o random(1, 1000000000)
SELECT cqrs.submit_order('pl-' || :o, 'u' || :client_id, 1.5);
};
my $load = start_load($node, $script, 4, 4);
sleep 1;
sql('SELECT cqrs.pause()');
$node->poll_query_until('postgres', q{SELECT state = 'paused' FROM cqrs.status})
  or die 'the projector did not pause';
my $rows = sql('SELECT count(*) FROM cqrs.read_model');
cmp_ok($rows, '>', 0, 'commands were projected before the pause');
sleep 1;
is(sql('SELECT count(*) FROM cqrs.read_model'), $rows,
	'nothing is projected while paused');
my $out = finish_load($load);
like($out, qr/number of failed transactions: 0/,
	'commands are accepted while paused') or diag($out);
cmp_ok(sql('SELECT count(*) FROM cqrs.command_log'), '>', $rows,
	'the log grew past the read model');
cmp_ok(sql('SELECT lag_bytes FROM cqrs.status'), '>', 0,
	'status shows the lag of the pause');
like(slurp_file($node->logfile), qr/LOG:  cqrs projector paused/,
	'the pause is logged');

# The pause survives a restart.
$node->restart;
$node->poll_query_until('postgres', q{SELECT state = 'paused' FROM cqrs.status})
  or die 'the projector is not paused after the restart';
is(sql('SELECT count(*) FROM cqrs.read_model'), $rows,
	'still paused after a restart');

# The fences time out while paused.
my $cmd = sql(q{SELECT command_id FROM cqrs.submit_order('fence-1', 'u', 2)});
my $t0 = time;
is(sql(qq{SELECT cqrs.wait_for('$cmd', '300 ms')}), 'f',
	'wait_for is false at the timeout while paused');
cmp_ok(time - $t0, '>=', 0.29, 'wait_for waited for its timeout');
is(sql(q{SELECT cqrs.wait_for_lsn(pg_current_wal_insert_lsn(), '100 ms')}), 'f',
	'wait_for_lsn is false at the timeout while paused');

# The schema-change procedure: pause (done), DDL, resume.
sql(q{ALTER TABLE cqrs.read_model ADD COLUMN channel text NOT NULL DEFAULT 'web'});
sql(q{CREATE INDEX read_model_status_idx ON cqrs.read_model (status)});

# A session waiting in wait_for() wakes when the projector applies the
# command after resume.
my ($wout, $werr) = ('', '');
my $waiter = IPC::Run::start(
	[
		'psql', '-X', '-At', '-h', $node->host, '-p', $node->port,
		'-d', 'postgres', '-c', qq{SELECT cqrs.wait_for('$cmd', '60 s')}
	],
	'>', \$wout, '2>', \$werr);
$node->poll_query_until('postgres', q{SELECT count(*) = 1 FROM pg_stat_activity
	WHERE query LIKE 'SELECT cqrs.wait_for(%' AND wait_event = 'Extension'})
  or die 'no session waits in cqrs.wait_for()';
pass('wait_for sleeps (wait event Extension), it does not spin');
sql('SELECT cqrs.resume()');
$waiter->finish;
is($wout, "t\n", 'wait_for returns true once the command is applied') or diag($werr);
is(sql(q{SELECT status FROM cqrs.read_model WHERE order_id = 'fence-1'}), 'created',
	'and the caller then reads its write');
like(slurp_file($node->logfile), qr/LOG:  cqrs projector resumed/,
	'the resume is logged');

wait_projected($node);
is(sql(q{SELECT state FROM cqrs.status}), 'running', 'running again after resume');
compare_model($node, 'after pause, restart, DDL and resume');
is(sql(q{SELECT count(*) FROM cqrs.read_model WHERE channel <> 'web'}), '0',
	'the new column took its default for rows projected after the DDL');

# wait_for_lsn: the fence of a client that does not keep command ids.
sql(q{SELECT cqrs.pause()});
$node->poll_query_until('postgres', q{SELECT state = 'paused' FROM cqrs.status})
  or die 'the projector did not pause';
$out = sql(q{SELECT cqrs.submit_order('fence-2', 'u', 3);
	SELECT pg_current_wal_insert_lsn()});
my ($lsn) = $out =~ /(\S+)$/;
my ($lout, $lerr) = ('', '');
my $lwaiter = IPC::Run::start(
	[
		'psql', '-X', '-At', '-h', $node->host, '-p', $node->port,
		'-d', 'postgres', '-c', qq{SELECT cqrs.wait_for_lsn('$lsn', '60 s')},
		'-c', q{SELECT count(*) FROM cqrs.read_model WHERE order_id = 'fence-2'}
	],
	'>', \$lout, '2>', \$lerr);
$node->poll_query_until('postgres', q{SELECT count(*) = 1 FROM pg_stat_activity
	WHERE query LIKE 'SELECT cqrs.wait_for_lsn(%' AND wait_event = 'Extension'})
  or die 'no session waits in cqrs.wait_for_lsn()';
sql('SELECT cqrs.resume()');
$lwaiter->finish;
is($lout, "t\n1\n", 'wait_for_lsn returns true and the write is visible') or diag($lerr);

# A dead-lettered command counts as processed.
sql(q{SELECT cqrs.cancel_order('fence-2')});
$cmd = sql(q{SELECT command_id FROM cqrs.ship_order('fence-2')});
is(sql(qq{SELECT cqrs.wait_for('$cmd', '30 s')}), 't',
	'wait_for returns true for a dead-lettered command');
is(sql(qq{SELECT count(*) FROM cqrs.dead_letter WHERE command_id = '$cmd'}), '1',
	'that command is in dead_letter');

# Backpressure: past cqrs.max_lag the command functions refuse commands,
# saying why, and accept them again once the projector has caught up.
$node->append_conf('postgresql.conf', "cqrs.max_lag = '1MB'");
$node->reload;
sql(q{CREATE TABLE filler (x text)});
sql(q{SELECT cqrs.pause()});
$node->poll_query_until('postgres', q{SELECT state = 'paused' FROM cqrs.status})
  or die 'the projector did not pause';
my $refused = sql(q{SELECT value FROM cqrs.metrics()
	WHERE name = 'cqrs_command_errors_total' AND labels->>'kind' = 'backpressure'});
sql(q{INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 3000)});
my ($ret, $stdout, $stderr) = $node->psql('postgres',
	q{SELECT cqrs.submit_order('bp-1', 'u', 1)},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
isnt($ret, 0, 'a command is refused while the projector is too far behind');
like($stderr, qr/ERROR:  53400: cqrs refuses new commands: the projection is \d+ [kM]B of WAL behind/,
	'with SQLSTATE 53400 and the size of the lag');
like($stderr, qr/HINT:  Projection is paused; call cqrs.resume\(\) to catch up/,
	'and a hint naming the cause');
is(sql(q{SELECT count(*) FROM cqrs.command_log WHERE aggregate_id = 'bp-1'}), '0',
	'nothing was written');
is(sql(q{SELECT value FROM cqrs.metrics()
	WHERE name = 'cqrs_command_errors_total' AND labels->>'kind' = 'backpressure'}),
	$refused + 1, 'the refusal is counted although its transaction rolled back');
sql(q{SELECT cqrs.resume()});
$node->poll_query_until('postgres', q{SELECT cqrs.wait_for_lsn(pg_current_wal_insert_lsn(), '10 s')})
  or die 'the projector did not catch up';
$node->poll_query_until('postgres', q{SELECT value < 1048576 FROM cqrs.metrics()
	WHERE name = 'cqrs_slot_lag_bytes'})
  or die 'the slot was not confirmed';
is(sql(q{SELECT (cqrs.submit_order('bp-1', 'u', 1)).sequence_id}), '1',
	'commands are accepted again once the projector caught up');

# Metrics count what happened.
my %m = map { my ($k, $v) = split /\|/; ($k => $v) } split /\n/, sql(q{
	SELECT name || coalesce(labels->>'type', labels->>'kind', ''), value
	  FROM cqrs.metrics()});
cmp_ok($m{cqrs_commands_totalCREATE_ORDER}, '>=', 3, 'commands are counted by type');
is($m{cqrs_commands_totalSHIP_ORDER}, '1', 'one ship since the restart');
cmp_ok($m{cqrs_projected_total}, '>', 0, 'projected commands are counted');
cmp_ok($m{cqrs_dead_letter_total}, '>=', 1, 'dead letters are counted');
cmp_ok($m{cqrs_batch_flush_duration_seconds_count}, '>', 0, 'batches are timed');
is($m{cqrs_paused}, '0', 'not paused');

# Between cqrs.pause() and the projector stopping, status says "pausing":
# here the batch being applied waits for a row a session holds locked.
sql(q{SELECT cqrs.submit_order('pz-1', 'u', 1)});
wait_projected($node);
my ($lout, $lerr) = ('', '');
my $locker = IPC::Run::start(
	[ 'psql', '-X', '-q', '-d', $node->connstr('postgres'),
	  '-c', q{BEGIN; SELECT FROM cqrs.read_model WHERE order_id = 'pz-1' FOR UPDATE; SELECT pg_sleep(60)} ],
	'>', \$lout, '2>', \$lerr);
$node->poll_query_until('postgres', q{SELECT count(*) > 0 FROM pg_stat_activity
	WHERE wait_event = 'PgSleep' AND pid <> pg_backend_pid()})
  or die 'the locking session did not start';
sql(q{SELECT cqrs.ship_order('pz-1')});
$node->poll_query_until('postgres', q{SELECT a.wait_event_type = 'Lock'
	FROM cqrs.status s JOIN pg_stat_activity a ON a.pid = s.leader_pid})
  or die 'the batch does not wait for the lock';
sql(q{SELECT cqrs.pause()});
is(sql(q{SELECT state FROM cqrs.status}), 'pausing',
	'right after cqrs.pause(), with a batch still being applied: pausing');
$node->safe_psql('postgres', q{SELECT pg_terminate_backend(pid) FROM pg_stat_activity
	WHERE wait_event = 'PgSleep'});
$locker->finish;
$node->poll_query_until('postgres', q{SELECT state = 'paused' FROM cqrs.status})
  or die 'the projector did not pause after its batch';
is(sql(q{SELECT status FROM cqrs.read_model WHERE order_id = 'pz-1'}), 'shipped',
	'the batch it was applying was finished first');
sql(q{SELECT cqrs.resume()});
$node->poll_query_until('postgres', q{SELECT state = 'running' FROM cqrs.status})
  or die 'the projector did not resume';

$node->stop;
done_testing();
