# Redis Cluster write-through, against a cluster of 3 primaries and 3
# replicas this test starts on 127.0.0.1 (redis-server --cluster-enabled,
# redis-cli --cluster create) and stops: keys routed by hash slot (hash
# tags honoured) with no redirection, the versioned write rule per key, a
# load while slots migrate between primaries, a load while a primary is
# killed and its replica promoted, and the cqrs-load reader; afterwards
# every key equals its read-model row.  Built without hiredis, skipped.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $admin_pw = 'regress-admin';
my $cqrs_pw = 'regress-cqrs';
my $rdir = PostgreSQL::Test::Utils::tempdir();
my @ports = map { PostgreSQL::Test::Cluster::get_free_port() } 1 .. 6;
my %pid;
my @live = (0 .. 5);    # the nodes running

sub rcli
{
	my ($port, @args) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'redis-cli', '-h', '127.0.0.1', '-p', $port, '-a',
			$admin_pw, '--no-auth-warning', @args ], '>', \$out, '2>', \$err);
	chomp $out;
	return $out;
}

END
{
	for my $p (values %pid)
	{
		kill 'CONT', $p;
		kill 'KILL', $p;
	}
}

my $node = cqrs_node('redis_cluster', conf => qq{
cqrs.redis_timeout = '200ms'
cqrs.backoff_max = '500ms'
});
sub sql { return $node->safe_psql('postgres', $_[0]); }

if (sql('SELECT redis FROM cqrs.status') eq 'unavailable')
{
	plan skip_all => 'built without hiredis';
}

# The URL: several hosts are a cluster's seeds, which has only database 0.
my ($ret, $stdout, $stderr) = $node->psql('postgres',
	q{ALTER SYSTEM SET cqrs.redis_url = 'redis://127.0.0.1:7000,127.0.0.1:7001/2'});
like($stderr, qr/ERROR:  invalid value for parameter "cqrs.redis_url".*\n.*only database 0/,
	'several hosts with a database number are refused');
($ret, $stdout, $stderr) = $node->psql('postgres',
	q{ALTER SYSTEM SET cqrs.redis_url = 'redis://127.0.0.1:7000,:7001'});
like($stderr, qr/DETAIL:  It names no host, or an empty one/, 'an empty host is refused');

for my $i (0 .. 5)
{
	my $d = "$rdir/$i";
	mkdir $d;
	system('redis-server', '--port', $ports[$i], '--bind', '127.0.0.1',
		'--save', '', '--appendonly', 'no', '--daemonize', 'yes',
		'--pidfile', "$d/redis.pid", '--dir', $d, '--logfile', "$d/redis.log",
		'--cluster-enabled', 'yes', '--cluster-config-file', "$d/nodes.conf",
		'--cluster-node-timeout', '1000', '--requirepass', $admin_pw,
		'--masterauth', $admin_pw) == 0
	  or die "could not start redis-server";
}
for my $i (0 .. 5)
{
	usleep(50_000) until -s "$rdir/$i/redis.pid" && rcli($ports[$i], 'PING') eq 'PONG';
	$pid{$i} = slurp_file("$rdir/$i/redis.pid") + 0;
	# the projector's own user: its keys, the commands it uses, and the
	# two a cluster client needs (CLUSTER SLOTS, ASKING)
	rcli($ports[$i], 'ACL', 'SETUSER', 'cqrs', 'on', ">$cqrs_pw", 'resetkeys',
		'~order:*', '~cqrs:*', 'resetchannels', '-@all', '+get', '+set',
		'+del', '+scan', '+evalsha', '+script|load', '+info', '+ping',
		'+cluster|slots', '+asking') eq 'OK'
	  or die "could not create the Redis user";
}
my ($out, $err) = ('', '');
IPC::Run::run([ 'redis-cli', '-a', $admin_pw, '--no-auth-warning', '--cluster',
		'create', (map { "127.0.0.1:$_" } @ports), '--cluster-replicas', '1',
		'--cluster-yes' ], '>', \$out, '2>', \$err)
  or die "redis-cli --cluster create failed: $out $err";

# every node agrees the cluster is up
sub cluster_ok
{
	my @live = @_;
	for (1 .. 200)
	{
		return 1 unless grep { rcli($ports[$_], 'CLUSTER', 'INFO') !~ /cluster_state:ok/ } @live;
		usleep(100_000);
	}
	return 0;
}
cluster_ok(0 .. 5) or die 'the Redis Cluster did not come up';

# The primaries now: port => node id, and the node id of each port.
sub primaries
{
	my ($asked) = @_;
	my %p;
	for (split /\n/, rcli($asked, 'CLUSTER', 'NODES'))
	{
		my ($id, $addr, $flags, undef, undef, undef, undef, undef, @slots) = split / /;
		next unless $flags =~ /master/ && $flags !~ /fail/ && @slots;
		$addr =~ /:(\d+)@/ and $p{$1} = $id;
	}
	return \%p;
}
my $primaries = primaries($ports[0]);
is(scalar(keys %$primaries), 3, 'the cluster has 3 primaries');

# Seeds: the first does not answer at all; the second does.
my $dead_port = PostgreSQL::Test::Cluster::get_free_port();
sql(qq{ALTER SYSTEM SET cqrs.redis_url = 'redis://cqrs:$cqrs_pw\@127.0.0.1:$dead_port,127.0.0.1:$ports[1]';
	SELECT pg_reload_conf()});
$node->poll_query_until('postgres', q{SELECT redis = 'connected' FROM cqrs.status})
  or die 'the projector did not connect to the cluster: '
  . sql('SELECT last_error FROM cqrs.status');
ok($node->wait_for_log(qr/cqrs projector writes through to Redis Cluster of 3 primaries/),
	'the projector finds the cluster through its second seed');

# Every order key on its node, read node by node: order id => JSON.
sub cluster_keys
{
	my %kv;
	for my $port (keys %{ primaries($ports[ $live[0] ]) })
	{
		my @keys = grep { length } split /\n/, rcli($port, '--scan', '--pattern', 'order:*');
		next unless @keys;
		my ($o, $e) = ('', '');
		my $in = join('', map { "GET $_\n" } @keys);
		IPC::Run::run([ 'redis-cli', '-h', '127.0.0.1', '-p', $port, '-a', $admin_pw,
				'--no-auth-warning' ], '<', \$in, '>', \$o, '2>', \$e);
		my @values = split /\n/, $o;
		$kv{ substr($keys[$_], 6) } = $values[$_] for 0 .. $#keys;
	}
	return \%kv;
}

# Every key against the read model, in SQL: the JSON of the row.
sub compare_keys
{
	my ($name) = @_;
	my $kv = cluster_keys();
	my $rows = join ",\n", map { "(\$k\$$_\$k\$, \$v\$$kv->{$_}\$v\$)" } sort keys %$kv;
	$rows = "(NULL, NULL)" unless %$kv;
	my $wrong = sql(qq{
		SET TimeZone = 'UTC';
		CREATE TEMP TABLE redis_copy (order_id text, value text);
		INSERT INTO redis_copy VALUES $rows;
		SELECT coalesce(r.order_id, c.order_id) || ': ' ||
		       coalesce(c.value, 'no key')
		  FROM cqrs.read_model r FULL JOIN redis_copy c USING (order_id)
		 WHERE (c.order_id IS NOT NULL OR r.order_id IS NOT NULL)
		   AND (c.value IS NULL OR r.order_id IS NULL OR c.value::jsonb <>
		        jsonb_build_object('order_id', r.order_id, 'user_id', r.user_id,
		                           'total_amount', r.total_amount, 'status', r.status,
		                           'version', r.version, 'updated_at', r.updated_at))
		 LIMIT 5});
	is($wrong, '', "$name: every order has its key on the cluster, equal to its row ("
		  . scalar(keys %$kv) . ' keys)');
}

sub wait_backlog_empty
{
	$node->poll_query_until('postgres',
		q{SELECT redis = 'connected' AND NOT EXISTS (SELECT FROM cqrs.redis_backlog) FROM cqrs.status})
	  or die 'the Redis backlog was not written: '
	  . sql('SELECT redis, last_error FROM cqrs.status');
}

sub metric
{
	return sql(qq{SELECT value::bigint FROM cqrs.metrics() WHERE name = '$_[0]'});
}

# Orders, some sharing a hash tag: each key goes straight to the node of
# its slot, so no node answers MOVED.
sql(q{SELECT cqrs.submit_order('c-' || i, 'u', i) FROM generate_series(1, 300) i});
sql(q{SELECT cqrs.submit_order('{tagged}-' || i, 'u', i) FROM generate_series(1, 20) i});
sql(q{SELECT cqrs.ship_order('c-' || i) FROM generate_series(1, 300, 3) i});
wait_projected($node);
wait_backlog_empty();
compare_keys('after 320 orders');
is(metric('cqrs_redis_redirects_total'), '0',
	'no write was redirected: each key went to the node that owns its slot');
my $tag_slot = rcli($ports[0], 'CLUSTER', 'KEYSLOT', 'tagged');
my ($tag_node) = grep {
	rcli($_, 'CLUSTER', 'COUNTKEYSINSLOT', $tag_slot) == 20
} keys %$primaries;
ok($tag_node, 'the 20 keys of one hash tag share its slot');
my @spread = grep { rcli($_, 'DBSIZE') > 50 } keys %$primaries;
is(scalar(@spread), 3, 'the keys are spread over the 3 primaries');

# A load while 4000 slots migrate from one primary to another: ASK
# during the migration, MOVED after it.
my $mix = q{
\set n random(1, 400)
SELECT cqrs.submit_order('m-' || :client_id || '-' || :n, 'u' || :client_id, 12.5) WHERE NOT EXISTS (SELECT FROM cqrs.read_model WHERE order_id = 'm-' || :client_id || '-' || :n);
\set r random(1, 400)
SELECT cqrs.ship_order(order_id) FROM cqrs.read_model WHERE order_id = 'm-' || :client_id || '-' || :r;
\set c random(1, 400)
SELECT cqrs.cancel_order(order_id) FROM cqrs.read_model WHERE order_id = 'm-' || :client_id || '-' || :c AND :c % 3 = 0;
};
my @by_port = sort keys %$primaries;
my $load = start_load($node, $mix, 2, 6, '-R', '300');
usleep(500_000);
($out, $err) = ('', '');
IPC::Run::run([ 'redis-cli', '-a', $admin_pw, '--no-auth-warning', '--cluster',
		'reshard', "127.0.0.1:$by_port[0]", '--cluster-from', $primaries->{ $by_port[0] },
		'--cluster-to', $primaries->{ $by_port[1] }, '--cluster-slots', '4000',
		'--cluster-yes' ], '>', \$out, '2>', \$err)
  or die "redis-cli --cluster reshard failed: $out $err";
my $res = finish_load($load);
like($res, qr/number of failed transactions: 0/, 'the load ran while slots migrated') or diag($res);
cluster_ok(0 .. 5) or die 'the cluster is not ok after the resharding';
wait_projected($node);
wait_backlog_empty();
cmp_ok(metric('cqrs_redis_redirects_total'), '>', 0,
	'writes to migrated slots were redirected (' . metric('cqrs_redis_redirects_total') . ')');
compare_keys('after a resharding under load');

# A load while a primary is killed and its replica takes over.
my $victim = $by_port[2];
my ($victim_i) = grep { $ports[$_] == $victim } 0 .. 5;
my $errors_before = metric('cqrs_redis_errors_total');
$load = start_load($node, $mix, 2, 6, '-R', '300');
usleep(1_000_000);
kill 'KILL', $pid{$victim_i};
delete $pid{$victim_i};
@live = grep { $_ != $victim_i } 0 .. 5;
my $promoted = 0;
for (1 .. 200)
{
	my $p = primaries($ports[ $live[0] ]);
	if (scalar(keys %$p) == 3 && !exists $p->{$victim})
	{
		$promoted = 1;
		last;
	}
	usleep(100_000);
}
ok($promoted, "the killed primary's replica was promoted");
$res = finish_load($load);
like($res, qr/number of failed transactions: 0/, 'the load ran through the failover') or diag($res);
cluster_ok(@live) or die 'the cluster is not ok after the failover';
wait_projected($node);
wait_backlog_empty();
cmp_ok(metric('cqrs_redis_errors_total'), '>', $errors_before,
	'the dead primary was noticed as a Redis error');
ok($node->log_contains('found a Redis Cluster primary replaced or emptied'),
	'the projector wrote every key again after the failover');
$primaries = primaries($ports[ $live[0] ]);
compare_keys('after a failover under load');
is(sql(q{SELECT count(*) FROM cqrs.verify()}), '0', 'cqrs.verify() finds nothing');

# The versioned write rule holds on every node: a newer value stays.
sql(q{SELECT cqrs.submit_order('v-1', 'u', 1)});
wait_projected($node);
wait_backlog_empty();
my $newer = '{"order_id":"v-1","user_id":"u","total_amount":1,"status":"shipped","version":9,"updated_at":"2000-01-01T00:00:00+00:00"}';
rcli($ports[ $live[0] ], '-c', 'SET', 'order:v-1', $newer);
sql(q{SELECT cqrs.ship_order('v-1')});
wait_projected($node);
wait_backlog_empty();
is(rcli($ports[ $live[0] ], '-c', 'GET', 'order:v-1'), $newer,
	'a newer version in the cluster is not replaced by an older one');

# The cache-aside reader of cqrs-load reads from the cluster the same way.
my $load_bin = "$FindBin::RealBin/../../tools/cqrs-load";
SKIP:
{
	skip 'tools/cqrs-load is not built', 2 unless -x $load_bin;
	my $json = "$rdir/load.json";
	($out, $err) = ('', '');
	IPC::Run::run([ $load_bin, '-d', 'host=' . $node->host . ' port=' . $node->port . ' dbname=postgres',
			'-r', "redis://cqrs:$cqrs_pw\@127.0.0.1:$ports[$live[0]],127.0.0.1:$ports[$live[1]]",
			'-w', '1', '-c', '2', '-T', '2', '-q', '--json', $json ],
		'>', \$out, '2>', \$err);
	my $summary = -f $json ? slurp_file($json) : "$out $err";
	like($summary, qr/"cache_hit_ratio": 0\.\d*[1-9]/, 'cqrs-load reads keys from the cluster')
	  or diag($summary);
	unlike($summary, qr/"redis": [1-9]/, 'with no Redis error') or diag($summary);
}

done_testing();
