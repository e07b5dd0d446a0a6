# Through PgBouncer in transaction pooling mode, started by this test on
# 127.0.0.1 (a free port) in front of the node: the command functions,
# the declared ones, wait_for and wait_for_lsn, the administration
# functions, a trace context set with SET LOCAL, and a load from 4
# clients sharing 2 server connections.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $pgbouncer = '/usr/sbin/pgbouncer';
plan skip_all => 'pgbouncer is not installed' unless -x $pgbouncer;

my $node = cqrs_node('pgbouncer');
sub sql { $node->safe_psql('postgres', $_[0]) }
declare_accounts($node);

my $bport = PostgreSQL::Test::Cluster::get_free_port();
my $bdir = PostgreSQL::Test::Utils::tempdir();
my $host = $node->host;
my $port = $node->port;
open my $ini, '>', "$bdir/pgbouncer.ini" or die $!;
print $ini <<"INI";
[databases]
postgres = host=$host port=$port dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bport
unix_socket_dir =
auth_type = trust
auth_file = $bdir/users.txt
pool_mode = transaction
default_pool_size = 2
max_client_conn = 50
logfile = $bdir/pgbouncer.log
pidfile = $bdir/pgbouncer.pid
INI
close $ini;
open my $users, '>', "$bdir/users.txt" or die $!;
my $me = $ENV{USER} || getpwuid($<);
print $users qq{"$me" ""\n"postgres" ""\n};
close $users;

my ($bout, $berr) = ('', '');
my $bouncer = IPC::Run::start([ $pgbouncer, "$bdir/pgbouncer.ini" ],
	'>', \$bout, '2>', \$berr);
END { local $?; $bouncer->kill_kill if $bouncer; }

# psql through PgBouncer; returns (exit code, stdout, stderr)
sub via
{
	my ($query) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'psql', '-X', '-A', '-t', '-q', '-v', 'ON_ERROR_STOP=1',
			'-h', '127.0.0.1', '-p', $bport, '-d', 'postgres', '-c', $query ],
		'>', \$out, '2>', \$err);
	chomp $out;
	return ($? >> 8, $out, $err);
}
for (1 .. 100)
{
	last if (via('SELECT 1'))[0] == 0;
	usleep(100_000);
}
my ($rc, $out, $err) = via('SELECT 1');
is($rc, 0, 'PgBouncer answers') or diag($err . $berr);

# Commands.
($rc, $out) = via(q{SELECT sequence_id FROM cqrs.submit_order('pb-1', 'u', 10)});
is($out, '1', 'submit_order through PgBouncer');
($rc, $out) = via(q{SELECT sequence_id FROM cqrs.ship_order('pb-1')});
is($out, '2', 'ship_order, the sequence assigned by the server');
($rc, $out) = via(q{SELECT sequence_id FROM cqrs.submit_order('pb-2', 'u', 5)});
($rc, $out) = via(q{SELECT sequence_id FROM cqrs.cancel_order('pb-2', 'changed my mind')});
is($out, '2', 'cancel_order');
($rc, $out) = via(q{SELECT sequence_id FROM cqrs.submit('OPEN_ACCOUNT', 'pb-acct', '{"holder": "h"}')});
is($out, '1', 'a declared command through cqrs.submit()');
($rc, $out, $err) = via(q{SELECT cqrs.submit('OPEN_ACCOUNT', 'pb-acct2', '{"holder": "nobody"}')});
like($err, qr/no such holder/, 'its validator\'s error reaches the client unchanged');

# Read-your-writes.
my $cid;
($rc, $cid) = via(q{SELECT command_id FROM cqrs.submit_order('pb-3', 'u', 1)});
($rc, $out) = via(qq{SELECT cqrs.wait_for('$cid', '10 s')});
is($out, 't', 'wait_for, in the next transaction, on a command submitted through PgBouncer');
($rc, $out) = via(q{SELECT status FROM cqrs.read_model WHERE order_id = 'pb-3'});
is($out, 'created', 'and the read model has it then');
($rc, $out) = via(q{SELECT cqrs.wait_for_lsn(pg_current_wal_insert_lsn(), '10 s')});
is($out, 't', 'wait_for_lsn');

# A trace context for one transaction: SET LOCAL, which transaction
# pooling keeps within the transaction (a session-level SET would stay on
# the server connection for whichever client gets it next).
my $tp = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
($rc, $out, $err) = via(qq{BEGIN; SET LOCAL cqrs.traceparent = '$tp';
	SELECT sequence_id FROM cqrs.submit_order('pb-trace', 'u', 1); COMMIT;});
is($rc, 0, 'SET LOCAL cqrs.traceparent in a transaction') or diag($err);
is(sql(q{SELECT traceparent FROM cqrs.command_log WHERE aggregate_id = 'pb-trace'}), $tp,
	'the command carries the trace context');
($rc, $out) = via(q{SELECT current_setting('cqrs.traceparent')});
is($out, '', 'and the next transaction on the pooled connection does not');

# Administration.
($rc, $out) = via(q{SELECT cqrs.pause()});
is($rc, 0, 'pause() through PgBouncer');
$node->poll_query_until('postgres', q{SELECT state = 'paused' FROM cqrs.status})
  or die 'the projector did not pause';
($rc, $out) = via(q{SELECT state FROM cqrs.status});
is($out, 'paused', 'cqrs.status through PgBouncer says paused');
($rc, $out) = via(q{SELECT cqrs.resume()});
$node->poll_query_until('postgres', q{SELECT state = 'running' FROM cqrs.status})
  or die 'the projector did not resume';
($rc, $out) = via(q{SELECT count(*) FROM cqrs.verify()});
is($out, '0', 'verify() through PgBouncer');
($rc, $out) = via(q{SELECT count(*) > 0 FROM cqrs.metrics()});
is($out, 't', 'metrics() through PgBouncer');
($rc, $out, $err) = via(q{SELECT cqrs.rebuild() > 0});
is($out, 't', 'rebuild() through PgBouncer') or diag($err);

# 4 clients on 2 server connections.
my $script = "$bdir/load.sql";
open my $fh, '>', $script or die $!;
print $fh q{
\set o random(1, 1000000000)
SELECT cqrs.submit_order('pbl-' || :client_id || '-' || :o, 'u', 1);
SELECT cqrs.ship_order('pbl-' || :client_id || '-' || :o);
};
close $fh;
my ($lout, $lerr) = ('', '');
IPC::Run::run([ 'pgbench', '-n', '-c', 4, '-j', 2, '-T', 3, '-f', $script,
		'-h', '127.0.0.1', '-p', $bport, 'postgres' ], '>', \$lout, '2>', \$lerr);
like($lout, qr/number of failed transactions: 0/, 'a load of 4 clients through 2 pooled connections');
wait_projected($node);
compare_model($node, 'after the load through PgBouncer');

$node->stop;
done_testing();
