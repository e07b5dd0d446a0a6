# Redis write-through of declared projections, against a real
# redis-server this test starts on 127.0.0.1 and stops: keys
# <projection>:<aggregate id> hold each row's JSON with its version,
# written after each batch, deleted with the row, kept through Redis
# going away (the backlog), rewritten by a rebuild and removed by a drop.
# Built without hiredis, there is nothing to check.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $rport = PostgreSQL::Test::Cluster::get_free_port();
my $rdir = PostgreSQL::Test::Utils::tempdir();
my $redis_pid;

sub redis
{
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'redis-cli', '-h', '127.0.0.1', '-p', $rport, @_ ],
		'>', \$out, '2>', \$err);
	chomp $out;
	return $out;
}

sub redis_start
{
	system('redis-server', '--port', $rport, '--bind', '127.0.0.1',
		'--save', '', '--appendonly', 'no', '--daemonize', 'yes',
		'--pidfile', "$rdir/redis.pid", '--dir', $rdir,
		'--logfile', "$rdir/redis.log") == 0
	  or die "could not start redis-server";
	usleep(50_000) until -s "$rdir/redis.pid" && redis('PING') eq 'PONG';
	$redis_pid = slurp_file("$rdir/redis.pid") + 0;
}

sub redis_stop
{
	return unless $redis_pid;
	kill 'CONT', $redis_pid;
	kill 'KILL', $redis_pid;
	usleep(100_000) while kill 0, $redis_pid;
	$redis_pid = undef;
	unlink "$rdir/redis.pid";
}
END { redis_stop(); }

my $node = cqrs_node('redis_declared', conf => qq{
cqrs.redis_url = 'redis://127.0.0.1:$rport/0'
cqrs.redis_timeout = '200ms'
cqrs.backoff_max = '1s'
});
sub sql { return $node->safe_psql('postgres', $_[0]); }

if (sql('SELECT redis FROM cqrs.status') eq 'unavailable')
{
	pass('built without hiredis: nothing to write through');
	$node->stop;
	done_testing();
	exit;
}

redis_start();
$node->poll_query_until('postgres', q{SELECT redis = 'connected' FROM cqrs.status})
  or die 'the projector did not connect to Redis';
$node->command_ok(
	[ 'psql', '-X', '-v', 'ON_ERROR_STOP=1', '-q', '-h', $node->host, '-p', $node->port,
	  '-d', 'postgres', '-f', "$FindBin::RealBin/../../examples/accounts.sql" ],
	'examples/accounts.sql');
sql(q{SELECT cqrs.submit('OPEN_ACCOUNT', 'acc-' || i, jsonb_build_object('holder', 'h' || i))
	FROM generate_series(1, 5) AS i});
sql(q{SELECT cqrs.submit('DEPOSIT', 'acc-' || i, jsonb_build_object('amount', i * 10))
	FROM generate_series(1, 5) AS i});

# Every key of a projection against its table: the row's JSON, version
# first.
sub compare_keys
{
	my ($name, $projection, $table) = @_;
	wait_projected($node);
	$node->poll_query_until('postgres', q{SELECT count(*) = 0 FROM cqrs.redis_backlog})
	  or die 'the Redis backlog was not drained';
	my $want = sql(qq~SET TimeZone = 'UTC';
		SELECT string_agg(v.aggregate_id || ' ' || '{"version":' || v.version || ','
			|| substr(row_to_json(t)::text, 2), E'\\n' ORDER BY v.aggregate_id)
		  FROM $table AS t JOIN cqrs.projection_version AS v
		    ON v.projection = '$projection' AND v.aggregate_id = t.account_id~);
	my @keys = sort grep { length } split /\n/, redis('--scan', '--pattern', "$projection:*");
	my $got = join "\n", map { substr($_, length($projection) + 1) . ' ' . redis('GET', $_) } @keys;
	is($got, $want, "$name: the keys of $projection are the rows of $table");
}

compare_keys('written through', 'account_balance', 'bank.balance');
compare_keys('written through', 'account_activity', 'bank.activity');
like(redis('GET', 'account_balance:acc-3'), qr/^\{"version":2,"account_id":"acc-3","holder":"h3","balance":30.00,/,
	'a key holds the version and the row as JSON');

# A NULL result deletes the row, and the key.
sql(q{SELECT cqrs.submit('CLOSE_ACCOUNT', 'acc-2', '{}')});
compare_keys('after a close', 'account_balance', 'bank.balance');
is(redis('EXISTS', 'account_balance:acc-2'), '0', 'the closed account has no key');
like(redis('GET', 'account_activity:acc-2'), qr/"closed":true/, 'the other projection keeps it, closed');

# Redis away: the changes wait in the backlog, and reach Redis when it is
# back (empty: everything is written again).
redis_stop();
sql(q{SELECT cqrs.submit('DEPOSIT', 'acc-1', '{"amount": 1}')});
wait_projected($node);
cmp_ok(sql(q{SELECT count(*) FROM cqrs.redis_backlog WHERE projection IS NOT NULL}), '>', 0,
	'while Redis is away the keys wait in the backlog');
redis_start();
$node->poll_query_until('postgres', q{SELECT redis = 'connected' FROM cqrs.status})
  or die 'the projector did not reconnect';
compare_keys('after Redis came back empty', 'account_balance', 'bank.balance');
compare_keys('after Redis came back empty', 'account_activity', 'bank.activity');

# A crash while Redis is frozen: the batch committed, its pipeline not
# sent; after the restart the commands come again and their keys are
# written all the same.
kill 'STOP', $redis_pid;
sql(q{SELECT cqrs.submit('DEPOSIT', 'acc-' || i, '{"amount": 2}') FROM generate_series(3, 5) AS i});
wait_projected($node);
$node->stop('immediate');
$node->start;
$node->poll_query_until('postgres', q{SELECT state = 'running' FROM cqrs.status})
  or die 'the projector did not restart';
kill 'CONT', $redis_pid;
$node->poll_query_until('postgres', q{SELECT redis = 'connected' FROM cqrs.status})
  or die 'the projector did not reconnect';
compare_keys('after a crash with Redis frozen', 'account_balance', 'bank.balance');
compare_keys('after a crash with Redis frozen', 'account_activity', 'bank.activity');

# A rebuild in another session rewrites the keys; a stale one is put right.
redis('SET', 'account_balance:acc-4', '{"version":1,"account_id":"acc-4","balance":0}');
sql(q{UPDATE bank.balance SET balance = 0 WHERE account_id = 'acc-5'});
sql(q{SELECT cqrs.rebuild('account_balance')});
compare_keys('after cqrs.rebuild(projection)', 'account_balance', 'bank.balance');

# A drop removes the projection's keys.
sql(q{SELECT cqrs.drop_projection('account_activity')});
$node->poll_query_until('postgres', q{SELECT count(*) = 0 FROM cqrs.redis_backlog})
  or die 'the Redis backlog was not drained';
is(redis('--scan', '--pattern', 'account_activity:*'), '', 'a dropped projection leaves no key');
compare_keys('after the drop', 'account_balance', 'bank.balance');

$node->stop;
done_testing();
