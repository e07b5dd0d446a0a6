# Redis write-through against a real redis-server this test starts on
# 127.0.0.1 (a free port, no persistence) and stops: keys equal the read
# model, TTLs jittered, Redis frozen (SIGSTOP), killed and restarted,
# a crash while Redis is down, stale fills, repairs, and the password.
# Built without hiredis, only the "unavailable" state is checked.
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
my $admin_pw = 'regress-admin';
my $cqrs_pw = 'regress p@ss';    # percent-encoded in the URL
my $url = "redis://cqrs:regress%20p%40ss\@127.0.0.1:$rport/0";
my $redis_pid;

sub redis_start
{
	system('redis-server', '--port', $rport, '--bind', '127.0.0.1',
		'--save', '', '--appendonly', 'no', '--daemonize', 'yes',
		'--pidfile', "$rdir/redis.pid", '--dir', $rdir,
		'--logfile', "$rdir/redis.log", '--requirepass', $admin_pw) == 0
	  or die "could not start redis-server";
	for (1 .. 100)
	{
		last if -s "$rdir/redis.pid" && redis('PING') eq 'PONG';
		usleep(50_000);
	}
	$redis_pid = slurp_file("$rdir/redis.pid") + 0;
	# the projector's own user: only its keys, only what it uses
	redis('ACL', 'SETUSER', 'cqrs', 'on', ">$cqrs_pw", 'resetkeys',
		'~order:*', '~cqrs:*', 'resetchannels', '-@all', '+get', '+set',
		'+del', '+scan', '+evalsha', '+script|load', '+info', '+select',
		'+ping') eq 'OK'
	  or die "could not create the Redis user";
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

sub redis
{
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'redis-cli', '-h', '127.0.0.1', '-p', $rport, '-a',
			$admin_pw, '--no-auth-warning', @_ ], '>', \$out, '2>', \$err);
	chomp $out;
	return $out;
}

my $node = cqrs_node('redis', conf => qq{
cqrs.redis_url = '$url'
cqrs.redis_ttl = '300s'
cqrs.redis_ttl_jitter = '30s'
cqrs.redis_timeout = '200ms'
cqrs.backoff_max = '1s'
restart_after_crash = on
});
sub sql { return $node->safe_psql('postgres', $_[0]); }

if (sql('SELECT redis FROM cqrs.status') eq 'unavailable')
{
	# built with WITH_HIREDIS=no: the setting is accepted, nothing written
	sql(q{SELECT cqrs.submit_order('nohiredis-1', 'u', 1)});
	wait_projected($node);
	is(sql('SELECT count(*) FROM cqrs.redis_backlog'), '0',
		'without hiredis nothing is recorded for Redis');
	is(sql(q{SELECT value FROM cqrs.metrics() WHERE name = 'cqrs_redis_connected'}), '0',
		'and Redis is not connected');
	$node->stop;
	done_testing();
	exit;
}

is(sql('SELECT redis FROM cqrs.status'), 'down', 'Redis not running yet: down');
redis_start();
$node->poll_query_until('postgres', q{SELECT redis = 'connected' FROM cqrs.status})
  or die 'the projector did not connect to Redis';
pass('the projector connects with the ACL user and a percent-encoded password');

# Every key against the read model, in SQL: the JSON of the row.
sub compare_keys
{
	my ($name, $every_row) = @_;
	my @keys = grep { length } split /\n/, redis('--scan', '--pattern', 'order:*');
	my @values;
	for (my $i = 0; $i < @keys; $i += 500)
	{
		my $j = $i + 499 < $#keys ? $i + 499 : $#keys;
		push @values, split /\n/, redis('MGET', @keys[ $i .. $j ]);
	}
	my $rows = join ",\n", map {
		my $id = substr($keys[$_], 6);
		"(\$k\$$id\$k\$, \$v\$$values[$_]\$v\$)"
	} 0 .. $#keys;
	$rows = "(NULL, NULL)" unless @keys;
	my $wrong = $node->safe_psql('postgres', qq{
		SET TimeZone = 'UTC';
		CREATE TEMP TABLE redis_copy (order_id text, value text);
		INSERT INTO redis_copy VALUES $rows;
		SELECT coalesce(r.order_id, c.order_id) || ': ' ||
		       CASE WHEN c.value IS NULL THEN 'no key'
		            WHEN r.order_id IS NULL THEN 'key without a row'
		            ELSE c.value END
		  FROM cqrs.read_model r FULL JOIN redis_copy c USING (order_id)
		 WHERE (c.order_id IS NOT NULL OR r.order_id IS NOT NULL)
		   AND ((c.value IS NULL AND $every_row) OR r.order_id IS NULL OR c.value::jsonb <>
		        jsonb_build_object('order_id', r.order_id, 'user_id', r.user_id,
		                           'total_amount', r.total_amount, 'status', r.status,
		                           'version', r.version, 'updated_at', r.updated_at))
		 LIMIT 5});
	is($wrong, '', "$name: every Redis key is the JSON of its read-model row"
		  . ($every_row eq 'true' ? ', and every row has its key' : '') . ' ('
		  . scalar(@keys) . " keys)");
}

sub wait_backlog_empty
{
	$node->poll_query_until('postgres',
		q{SELECT redis = 'connected' AND NOT EXISTS (SELECT FROM cqrs.redis_backlog) FROM cqrs.status})
	  or die 'the Redis backlog was not written: '
	  . sql('SELECT redis, last_error FROM cqrs.status');
}

# A mixed load: creates, ships and cancels, some invalid.
my $mix = q{
\set n random(1, 300)
SELECT cqrs.submit_order('m-' || :client_id || '-' || :n, 'u' || :client_id, 12.5) WHERE NOT EXISTS (SELECT FROM cqrs.read_model WHERE order_id = 'm-' || :client_id || '-' || :n);
\set r random(1, 300)
SELECT cqrs.ship_order(order_id) FROM cqrs.read_model WHERE order_id = 'm-' || :client_id || '-' || :r;
\set c random(1, 300)
SELECT cqrs.cancel_order(order_id) FROM cqrs.read_model WHERE order_id = 'm-' || :client_id || '-' || :c AND :c % 3 = 0;
};
my $load = start_load($node, $mix, 4, 3);
my $out = finish_load($load);
like($out, qr/number of failed transactions: 0/, 'the load ran') or diag($out);
wait_projected($node);
wait_backlog_empty();
compare_keys('after a mixed load', 'true');
cmp_ok(sql(q{SELECT value FROM cqrs.metrics() WHERE name = 'cqrs_redis_writes_total'}),
	'>', 100, 'the writes are counted');

# TTLs: cqrs.redis_ttl plus or minus the jitter, not all the same.
my @sample = grep { length } split /\n/, redis('--scan', '--pattern', 'order:m-1-*');
my @ttls = map { redis('TTL', $_) } @sample[ 0 .. ($#sample < 39 ? $#sample : 39) ];
is(scalar(grep { $_ < 265 || $_ > 330 } @ttls), 0, 'every TTL is within 300 s +/- 30 s')
  or diag("@ttls");
my %distinct = map { $_ => 1 } @ttls;
cmp_ok(scalar(keys %distinct), '>', 5, 'and the TTLs are spread (' . scalar(keys %distinct) . ' distinct of ' . scalar(@ttls) . ')');

# A stale fill (a client that read an old row) is overwritten by the next
# version; a newer version in Redis is never replaced by an older one.
sql(q{SELECT cqrs.submit_order('fill-1', 'u', 5)});
sql(q{SELECT cqrs.submit_order('fill-2', 'u', 5)});
wait_projected($node);
redis('SET', 'order:fill-1', '{"order_id":"fill-1","user_id":"u","total_amount":5,"status":"created","version":1,"updated_at":"2000-01-01T00:00:00+00:00","stale":true}');
sql(q{SELECT cqrs.ship_order('fill-1')});
redis('SET', 'order:fill-2', '{"order_id":"fill-2","version":99}');
sql(q{SELECT cqrs.ship_order('fill-2')});
wait_projected($node);
like(redis('GET', 'order:fill-1'), qr/"status":"shipped","version":2/,
	'a stale fill is overwritten by the next version');
is(redis('GET', 'order:fill-2'), '{"order_id":"fill-2","version":99}',
	'a newer version in Redis is not replaced by an older one');
redis('DEL', 'order:fill-2');
sql(q{SELECT cqrs.cancel_order('fill-2')});    # dead-lettered, version 3
wait_projected($node);

# Redis frozen: projection goes on, the orders wait in the backlog, and
# once Redis answers every key is brought up to date.
kill 'STOP', $redis_pid;
my $t0 = time;
$load = start_load($node, $mix, 4, 3);
$out = finish_load($load);
like($out, qr/number of failed transactions: 0/, 'commands are accepted while Redis is frozen');
wait_projected($node);
cmp_ok(time - $t0, '<', 15, 'and projected at once (' . (time - $t0) . ' s for a 3 s load)');
compare_model($node, 'Redis frozen');
is(sql('SELECT redis FROM cqrs.status'), 'down', 'status says Redis is down');
cmp_ok(sql('SELECT count(*) FROM cqrs.redis_backlog'), '>', 0, 'the changed orders wait in the backlog');
cmp_ok(sql(q{SELECT value FROM cqrs.metrics() WHERE name = 'cqrs_redis_errors_total'}),
	'>', 0, 'the Redis errors are counted');
like(slurp_file($node->logfile), qr/WARNING:  cqrs projector cannot write to Redis at 127.0.0.1:$rport/,
	'the projector says so, naming host and port');
unlike(slurp_file($node->logfile), qr/regress p\@ss|regress%20p/, 'the log never shows the password');
kill 'CONT', $redis_pid;
wait_backlog_empty();
compare_keys('after SIGCONT', 'true');

# Redis killed and started again, empty: what changed meanwhile is
# written once it is back.
redis_stop();
sql(q{SELECT cqrs.submit_order('gone-' || g, 'u', 3) FROM generate_series(1, 50) g});
sql(q{SELECT cqrs.ship_order('gone-' || g) FROM generate_series(1, 20) g});
wait_projected($node);
redis_start();
wait_backlog_empty();
is(redis('EXISTS', map { "order:gone-$_" } 1 .. 50), '50',
	'every order changed while Redis was gone has its key');
like(redis('GET', 'order:gone-7'), qr/"status":"shipped","version":2/, 'with its last version');

# A crash while Redis is frozen loses none of the backlog.
kill 'STOP', $redis_pid;
sql(q{SELECT cqrs.submit_order('crash-' || g, 'u', 4) FROM generate_series(1, 30) g});
wait_projected($node);
$node->stop('immediate');
$node->start;
$node->poll_query_until('postgres', q{SELECT state = 'running' FROM cqrs.status})
  or die 'the projector did not restart';
kill 'CONT', $redis_pid;
wait_backlog_empty();
is(redis('EXISTS', map { "order:crash-$_" } 1 .. 30), '30',
	'orders changed before a crash with Redis frozen reach Redis after the restart');

# kill -9 of the projector while commands wait for it: the server
# restarts, and the commands reach the read model and Redis.
my $leader = sql('SELECT leader_pid FROM cqrs.status');
kill 'STOP', $leader;
sql(q{SELECT cqrs.submit_order('kill-' || g, 'u', 4) FROM generate_series(1, 10) g});
kill 'KILL', $leader;
sleep 2;    # the postmaster restarts the server
$node->poll_query_until('postgres',
	qq{SELECT state = 'running' AND redis = 'connected' AND leader_pid <> $leader FROM cqrs.status})
  or die 'the projector did not come back';
wait_projected($node);
wait_backlog_empty();
compare_keys('after kill -9 of the projector', 'false');

# Repairs in other sessions go through the backlog: a row the rebuild
# deletes loses its key.
sql(q{INSERT INTO cqrs.read_model (order_id, user_id, total_amount, status, version) VALUES ('ghost', 'u', 1, 'created', 1)});
redis('SET', 'order:ghost', '{"order_id":"ghost","version":1}');
sql('SELECT cqrs.rebuild()');
wait_backlog_empty();
is(redis('EXISTS', 'order:ghost'), '0', 'the key of a row the rebuild deleted is deleted');
compare_keys('after a rebuild', 'false');

# The cache hit ratio is Redis's own.
redis('GET', 'order:gone-1') for 1 .. 3;
redis('GET', 'order:no-such-order');
$node->poll_query_until('postgres', q{
	SELECT value BETWEEN 0.01 AND 0.99 FROM cqrs.metrics() WHERE name = 'cqrs_cache_hit_ratio'})
  or die 'no cache hit ratio: '
  . sql(q{SELECT value FROM cqrs.metrics() WHERE name = 'cqrs_cache_hit_ratio'})
  . ', Redis says ' . join(' ', redis('INFO', 'stats') =~ /(keyspace_\w+:\d+)/g);
my ($hits) = redis('INFO', 'stats') =~ /keyspace_hits:(\d+)/;
my ($misses) = redis('INFO', 'stats') =~ /keyspace_misses:(\d+)/;
$node->poll_query_until('postgres', qq{
	SELECT abs(value - ${hits}::float8 / ($hits + $misses)) < 0.05 FROM cqrs.metrics() WHERE name = 'cqrs_cache_hit_ratio'})
  or die 'the cache hit ratio is not Redis\'s';
pass('cqrs_cache_hit_ratio reads keyspace_hits and keyspace_misses');

# The password: the setting is for superusers only, bad URLs are refused.
sql(q{CREATE ROLE regress_user LOGIN IN ROLE cqrs_admin});
my ($ret, $stdout, $stderr) = $node->psql('postgres', 'SHOW cqrs.redis_url',
	extra_params => [ '-U', 'regress_user' ]);
like($stderr, qr/permission denied|must be superuser/, 'a non-superuser cannot show cqrs.redis_url');
is($node->safe_psql('postgres',
		q{SELECT count(*) FROM pg_settings WHERE name = 'cqrs.redis_url'},
		extra_params => [ '-U', 'regress_user' ]), '0', 'nor see it in pg_settings');
unlike($node->safe_psql('postgres', 'SELECT * FROM cqrs.status',
		extra_params => [ '-U', 'regress_user' ]), qr/regress/, 'nor read it from cqrs.status');
($ret, $stdout, $stderr) = $node->psql('postgres',
	q{ALTER SYSTEM SET cqrs.redis_url = 'http://:hunter2@localhost'});
like($stderr, qr/ERROR:  invalid value for parameter "cqrs.redis_url"\nDETAIL:  It must start with redis:\/\//,
	'a URL that is not redis:// is refused, saying why');
unlike($stderr, qr/hunter2/, 'without quoting it');
($ret, $stdout, $stderr) = $node->psql('postgres',
	q{ALTER SYSTEM SET cqrs.redis_url = 'redis://localhost:99999'});
like($stderr, qr/The port must be a number from 1 to 65535/, 'a bad port is refused');

# Reloadable: empty turns write-through off.
sql(q{ALTER SYSTEM SET cqrs.redis_url = ''});
sql('SELECT pg_reload_conf()');
$node->poll_query_until('postgres', q{SELECT redis = 'disabled' FROM cqrs.status})
  or die 'Redis not disabled';
sql(q{SELECT cqrs.ship_order('gone-30')});
wait_projected($node);
like(redis('GET', 'order:gone-30'), qr/"version":1/, 'disabled: keys are no longer written');
is(sql('SELECT count(*) FROM cqrs.redis_backlog'), '0', 'nor recorded');
sql(q{ALTER SYSTEM RESET cqrs.redis_url});
sql('SELECT pg_reload_conf()');
$node->poll_query_until('postgres', q{SELECT redis = 'connected' FROM cqrs.status})
  or die 'Redis not back';
pass('and back on with a reload');

# A reinstall never serves the old installation's keys.  Redis holds an
# order of the old installation at a high version and one the new never
# has: DROP EXTENSION and CREATE EXTENSION make a new installation, whose
# projector deletes the old keys (Redis's marker names the old one) and
# writes its own.
sql(q{SELECT cqrs.submit_order('ri-1', 'u-old', 7)});
sql(q{SELECT cqrs.ship_order('ri-1')});
sql(q{SELECT cqrs.submit_order('ri-old', 'u-old', 8)});
wait_projected($node);
wait_backlog_empty();
like(redis('GET', 'order:ri-1'), qr/"status":"shipped","version":2/,
	'the old installation\'s key is there');
my $marker = redis('GET', 'cqrs:installation');
like($marker, qr{^\d+/\d+/\d+$}, 'Redis names the installation its keys are of');
sql(q{DROP EXTENSION cqrs});
sql(q{CREATE EXTENSION cqrs});
$node->poll_query_until('postgres', q{SELECT state = 'running' AND redis = 'connected' FROM cqrs.status})
  or die 'the new installation does not project';
sql(q{SELECT cqrs.submit_order('ri-1', 'u-new', 1)});
wait_projected($node);
wait_backlog_empty();
isnt(redis('GET', 'cqrs:installation'), $marker, 'Redis now names the new installation');
like(redis('GET', 'order:ri-1'), qr/"user_id":"u-new",.*"status":"created","version":1/,
	'the new installation\'s row replaced a key of a higher version');
is(redis('EXISTS', 'order:ri-old'), '0', 'a key of an order the new installation has not is gone');
compare_keys('after a reinstall', 'true');

# Redis restarted empty: every key comes back from the read model.
redis_stop();
redis_start();
$node->poll_query_until('postgres', q{SELECT redis = 'connected' FROM cqrs.status})
  or die 'the projector did not reconnect';
wait_backlog_empty();
compare_keys('after Redis came back empty', 'true');

$node->stop;
redis_stop();
done_testing();
