# cqrs.workers = 2: one leads, the other stands by and takes over within a
# second when the leader is terminated; projection goes on.  A streaming
# standby runs no projector.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::Local;
use Time::HiRes;

my $node = cqrs_node('leader', conf => 'cqrs.workers = 2');
sub sql { $node->safe_psql('postgres', $_[0]) }

is(sql(q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs projector'}),
	'2', 'two projector processes run');
sql(q{SELECT cqrs.submit_order('l-' || i, 'u', i) FROM generate_series(1, 100) i});
wait_projected($node);

my $leader = sql('SELECT leader_pid FROM cqrs.status');
my $offset = -s $node->logfile;
sql("SELECT pg_terminate_backend($leader)");
$node->poll_query_until('postgres',
	"SELECT leader_pid IS NOT NULL AND leader_pid <> $leader FROM cqrs.status")
  or die 'no follower took over';
my $new = sql('SELECT leader_pid FROM cqrs.status');

# Measure in the server log: from the leader's exit to the new leader.
my $log = slurp_file($node->logfile, $offset);
sub stamp
{
	my ($re) = @_;
	$log =~ /^(\d+)-(\d+)-(\d+) (\d+):(\d+):(\d+\.\d+) UTC \[\d+\] .*$re/m
	  or return undef;
	return timegm(0, $5, $4, $3, $2 - 1, $1) + $6;
}
my $gone = stamp(qr/terminating background worker "cqrs projector" due to administrator command/);
my $took = stamp(qr/cqrs projector $new is now the leader/);
ok(defined $gone && defined $took, 'both events are in the log');
my $gap = $took - $gone;
note sprintf('takeover took %.3f s', $gap);
cmp_ok($gap, '<', 1.0, 'the follower took over within a second');

sql(q{SELECT cqrs.ship_order('l-' || i) FROM generate_series(1, 100) i});
wait_projected($node);
compare_model($node, 'after the takeover');

# The terminated worker comes back as the follower.
$node->poll_query_until('postgres',
	q{SELECT count(*) = 2 FROM pg_stat_activity WHERE backend_type = 'cqrs projector'})
  or die 'the terminated worker did not come back';

# A streaming standby: read model replicated, no projector running.
$node->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($node, 'b', has_streaming => 1);
$standby->start;
sql(q{SELECT cqrs.cancel_order('l-1')});
wait_projected($node);
$node->wait_for_catchup($standby);
is($standby->safe_psql('postgres',
	q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cqrs projector'}),
	'0', 'no projector runs on a standby');
is($standby->safe_psql('postgres',
	q{SELECT count(*) FROM cqrs.read_model WHERE status = 'shipped'}),
	'100', 'the standby serves the replicated read model');

# Read-your-writes on the standby: wait_for() looks at replicated state.
sql(q{SELECT cqrs.pause()});
$node->poll_query_until('postgres', q{SELECT state = 'paused' FROM cqrs.status})
  or die 'the projector did not pause';
my $cmd = sql(q{SELECT command_id FROM cqrs.submit_order('sb-1', 'u', 1)});
$node->wait_for_catchup($standby);
is($standby->safe_psql('postgres', qq{SELECT cqrs.wait_for('$cmd', '200 ms')}), 'f',
	'on the standby, wait_for is false while the primary has not projected');
sql(q{SELECT cqrs.resume()});
is($standby->safe_psql('postgres', qq{SELECT cqrs.wait_for('$cmd', '60 s')}), 't',
	'on the standby, wait_for returns once the projection is replayed');
is($standby->safe_psql('postgres', q{SELECT count(*) FROM cqrs.read_model WHERE order_id = 'sb-1'}),
	'1', 'and the standby serves the write');
my ($ret, $stdout, $stderr) = $standby->psql('postgres',
	q{SELECT cqrs.wait_for_lsn('0/1', '1 s')});
like($stderr, qr/cannot be used during recovery/,
	'wait_for_lsn refuses on a standby, pointing at wait_for');

$standby->stop;

# A leader that fails lets go of its replication origin before the leader
# lock: with a slot of another plugin in the way, the leader errors and
# steps down, and the follower that takes over can set up the origin (it
# used to fail with "replication origin ... is already active").  Once the
# slot is out of the way, a new slot is made and the log refolded.
$node->append_conf('postgresql.conf', 'cqrs.enabled = off');
$node->reload;
$node->poll_query_until('postgres', q{SELECT state = 'disabled' FROM cqrs.status})
  or die 'projection was not switched off';
$node->poll_query_until('postgres',
	q{SELECT NOT active FROM pg_replication_slots WHERE slot_name = 'cqrs'})
  or die 'the slot is still in use';
sql(q{SELECT pg_drop_replication_slot('cqrs')});
sql(q{SELECT pg_create_logical_replication_slot('cqrs', 'test_decoding')});
sql(q{SELECT cqrs.submit_order('le-' || i, 'u', 1) FROM generate_series(1, 50) i});
$offset = -s $node->logfile;
$node->append_conf('postgresql.conf', 'cqrs.enabled = on');
$node->reload;
# both workers lead, fail and step down in turn
my %pids;
for (my $t = 0; $t < 300 && keys %pids < 2; $t++)
{
	%pids = map { $_ => 1 } slurp_file($node->logfile, $offset) =~
	  /\[(\d+)\] ERROR:  replication slot "cqrs" exists but is not a cqrs slot/g;
	Time::HiRes::sleep(0.1);
}
is(scalar(keys %pids), 2, 'both workers led and failed on the slot in turn');
unlike(slurp_file($node->logfile, $offset), qr/already active/,
	'no worker found the origin held by the one before');
sql(q{SELECT pg_drop_replication_slot('cqrs')});
wait_projected($node);
is(sql(q{SELECT count(*) FROM cqrs.read_model WHERE order_id LIKE 'le-%'}), '50',
	'after the failures, the commands sent meanwhile are projected');
compare_model($node, 'after leaders that failed');

$node->stop;
done_testing();
