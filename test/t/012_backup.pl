# Backups and upgrades keep the command log.
#
# An installation of version 0.1.0 with real traffic (creates, ships,
# invalid transitions dead-lettered, commands parked behind a gap) is
# updated with ALTER EXTENSION cqrs UPDATE: nothing changes, projection
# goes on.  Then pg_dump, plain and custom format, must carry every command
# and the log_id sequence; restored into fresh clusters (psql, and
# pg_restore -j 2), the restored server's projector folds the log by
# itself into the same read model, dead letters and parked commands, and
# keeps the pause the original was dumped with, and the domains declared
# in it.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

# A node with cqrs preloaded and no extension yet.
sub bare_node
{
	my ($name) = @_;
	my $n = PostgreSQL::Test::Cluster->new($name);
	$n->init(allows_streaming => 'logical');
	$n->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'cqrs'
max_worker_processes = 16
cqrs.poll_interval = '200ms'
});
	$n->start;
	return $n;
}

my $node = bare_node('backup');
sub sql { $node->safe_psql('postgres', $_[0]) }

sql(q{CREATE EXTENSION cqrs VERSION '0.1.0'});
$node->poll_query_until('postgres', "SELECT state = 'running' FROM cqrs.status")
  or die 'the projector did not start';
sql(q{SELECT cqrs.submit_order('bk-' || i, 'u' || i % 7, i) FROM generate_series(1, 300) i});
sql(q{SELECT cqrs.ship_order('bk-' || i) FROM generate_series(1, 100) i});
sql(q{SELECT cqrs.cancel_order('bk-' || i) FROM generate_series(51, 150) i});
sql(q{SELECT cqrs.ship_order('bk-299', NULL, 5)});
wait_projected($node);
my $before = compare_model($node, 'version 0.1.0');
cmp_ok($before->{dead}, '>', 0, 'the log has dead-lettered commands');
cmp_ok($before->{parked}, '>', 0, 'and parked ones');

sql(q{ALTER EXTENSION cqrs UPDATE});
is(sql(q{SELECT extversion FROM pg_extension WHERE extname = 'cqrs'}), '0.2.0',
	'ALTER EXTENSION cqrs UPDATE brings 0.2.0');
compare_model($node, 'right after the update');
sql(q{SELECT cqrs.ship_order('bk-' || i) FROM generate_series(201, 250) i});
wait_projected($node);
compare_model($node, 'after commands on the updated installation');

# A declared domain: its definitions (not the built-in ones) go into the
# dump with the payload type and validator they name.
declare_accounts($node);
sql(q{SELECT cqrs.submit('OPEN_ACCOUNT', 'acct-' || i, '{"holder": "h"}') FROM generate_series(1, 20) i});
my $types = sql(q{SELECT string_agg(concat_ws(',', name, aggregate_type, creates, payload_type,
	validator, owner, builtin), ' ' ORDER BY name) FROM cqrs.command_type});

# A declared projection: its table is dumped as any table is, its versions
# with it.  A restore must neither fold the restored commands into it a
# second time nor fail on rows the projector wrote first.
sql(q{CREATE TABLE bank.holders (account_id text PRIMARY KEY, holder text NOT NULL,
		n integer NOT NULL);
	CREATE FUNCTION bank.count_holder(state bank.holders, command cqrs.command_log)
	RETURNS bank.holders LANGUAGE sql AS $$
		SELECT command.aggregate_id, command.payload->>'holder', coalesce(state.n, 0) + 1 $$;
	SELECT cqrs.create_projection('holders', 'account', 'bank.holders', 'account_id',
		'bank.count_holder(bank.holders, cqrs.command_log)')});
sql(q{SELECT cqrs.submit('OPEN_ACCOUNT', 'acct-' || i, '{"holder": "late"}') FROM generate_series(30, 39) i});
wait_projected($node);
my $holders = sql(q{SELECT string_agg(account_id || ':' || holder || ':' || n, ' ' ORDER BY account_id)
	FROM bank.holders});
is(sql(q{SELECT count(*) FILTER (WHERE n = 1) || '/' || count(*) FROM bank.holders}), '30/30',
	'the projection folded every account once');

# Dumped while paused: the operator's pause must come back with the data.
sql(q{SELECT cqrs.pause()});
$node->poll_query_until('postgres', q{SELECT state = 'paused' FROM cqrs.status})
  or die 'the projector did not pause';
my $log = sql(q{SELECT count(*) || ' ' || max(log_id) FROM cqrs.command_log});
my $dir = $node->basedir;
my @conn = ('-h', $node->host, '-p', $node->port, 'postgres');
command_ok([ 'pg_dump', '-f', "$dir/plain.sql", @conn ], 'pg_dump, plain');
command_ok([ 'pg_dump', '-Fc', '-f', "$dir/dump.custom", @conn ], 'pg_dump, custom format');
like(slurp_file("$dir/plain.sql"), qr/^COPY cqrs\.command_log /m,
	'the dump carries the command log');
unlike(slurp_file("$dir/plain.sql"), qr/^COPY cqrs\.(read_model|offset_tracking) /m,
	'and not what the projector derives from it');

# A fresh cluster for each restore.
my %restore = (
	plain => [ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-f', "$dir/plain.sql" ],
	custom => [ 'pg_restore', '-j', '2', '--exit-on-error', '-d', 'postgres', "$dir/dump.custom" ]);
for my $how ('plain', 'custom')
{
	my $new = bare_node("restored_$how");
	my @cmd = @{ $restore{$how} };
	if ($how eq 'plain')
	{
		push @cmd, '-h', $new->host, '-p', $new->port, 'postgres';
	}
	else
	{
		splice @cmd, 1, 0, '-h', $new->host, '-p', $new->port;
	}
	command_ok(\@cmd, "restore of the $how dump");
	is($new->safe_psql('postgres',
		q{SELECT count(*) || ' ' || max(log_id) FROM cqrs.command_log}),
		$log, "$how: every command is back");
	$new->poll_query_until('postgres', "SELECT state = 'paused' FROM cqrs.status")
	  or die 'the restored projector is not paused: '
	  . $new->safe_psql('postgres', 'SELECT state FROM cqrs.status');
	pass("$how: the pause is restored, and the projector obeys it");
	$new->safe_psql('postgres', q{SELECT cqrs.resume()});
	$new->poll_query_until('postgres', "SELECT state = 'running' FROM cqrs.status")
	  or die 'the restored projector does not run';
	wait_projected($new);
	compare_model($new, "$how restore");
	is($new->safe_psql('postgres', q{SELECT count(*) FROM cqrs.read_model}),
		sql(q{SELECT count(*) FROM cqrs.read_model}),
		"$how: the read model has the original's rows");
	is($new->safe_psql('postgres', q{SELECT string_agg(concat_ws(',', name, aggregate_type,
		creates, payload_type, validator, owner, builtin), ' ' ORDER BY name) FROM cqrs.command_type}),
		$types, "$how: the declared command types are back, the built-in ones once");
	my ($rc, $out, $err) = $new->psql('postgres',
		q{SELECT cqrs.submit('OPEN_ACCOUNT', 'acct-x', '{"holder": "nobody"}')});
	like($err, qr/no such holder/, "$how: the restored command type runs its validator");
	is($new->safe_psql('postgres', q{SELECT sequence_id FROM cqrs.submit('OPEN_ACCOUNT', 'acct-21', '{"holder": "h"}')}),
		'1', "$how: and takes commands");
	is($new->safe_psql('postgres', q{SELECT string_agg(account_id || ':' || holder || ':' || n, ' '
		ORDER BY account_id) FROM bank.holders WHERE account_id <> 'acct-21'}),
		$holders, "$how: the declared projection is back, nothing folded twice");
	wait_projected($new);
	is($new->safe_psql('postgres', q{SELECT holder || ':' || n FROM bank.holders
		WHERE account_id = 'acct-21'}), 'h:1', "$how: and follows the new commands");
	is($new->safe_psql('postgres', q{SELECT count(*) FROM cqrs.verify('holders')}), '0',
		"$how: cqrs.verify('holders') finds nothing");
	my $id = $new->safe_psql('postgres',
		q{SELECT log_id FROM cqrs.submit_order('bk-after', 'u', 1)});
	cmp_ok($id, '>', (split / /, $log)[1], "$how: log_ids go on after the restored ones");
	$new->stop;
}

$node->stop;
done_testing();
