# pg_upgrade keeps everything.  A populated installation (commands
# projected, dead letters, a parked command) is upgraded with pg_upgrade
# into a new cluster of the same major version, as PostgreSQL's own
# src/bin/pg_upgrade/t/002_pg_upgrade.pl does.  No projector may run while
# the servers are in binary-upgrade mode; afterwards the new cluster's
# projector goes on (from the migrated slot on 17, from a new slot and a
# fold of the log on 15) and the read model equals the fold of the log.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $old = cqrs_node('old');
$old->safe_psql('postgres', q{
	SELECT cqrs.submit_order('up-' || i, 'u', i) FROM generate_series(1, 200) i;
	SELECT cqrs.ship_order('up-' || i) FROM generate_series(1, 80) i;
	SELECT cqrs.cancel_order('up-' || i) FROM generate_series(61, 100) i;
	SELECT cqrs.ship_order('up-200', NULL, 4);
});
# a declared domain (its catalog names a type and a function by OID or
# signature, which pg_upgrade must accept and keep)
declare_accounts($old);
$old->safe_psql('postgres', q{SELECT cqrs.submit('OPEN_ACCOUNT', 'acct-1', '{"holder": "h"}')});
wait_projected($old);
my $before = compare_model($old, 'before the upgrade');
my $log = $old->safe_psql('postgres', q{SELECT count(*) || ' ' || max(log_id) FROM cqrs.command_log});
my $plugins = $old->safe_psql('postgres',
	q{SELECT setting FROM pg_settings WHERE name = 'output_plugin_libraries'});
$old->stop;

my $new = PostgreSQL::Test::Cluster->new('new');
$new->init(allows_streaming => 'logical');
$new->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'cqrs'
max_worker_processes = 16
cqrs.poll_interval = '200ms'
});
# From 17 on pg_upgrade carries logical slots over, and on servers that
# restrict output plugins it carries only slots of allowed plugins: the
# README's procedure allows cqrs in the new cluster.
$new->append_conf('postgresql.conf',
	"output_plugin_libraries = '$plugins, cqrs'") if $plugins ne '';

my $bindir = $old->config_data('--bindir');
my $tmp = PostgreSQL::Test::Utils::tempdir;
chdir $tmp or die $!;
command_ok(
	[
		'pg_upgrade', '--no-sync', '--retain',
		'-d', $old->data_dir, '-D', $new->data_dir,
		'-b', $bindir, '-B', $bindir,
		'-s', $new->host, '-p', $old->port, '-P', $new->port
	],
	'pg_upgrade');

# pg_upgrade keeps its servers' logs (--retain) under the new data
# directory (15 and later) or the current directory.
my @logs = grep { -f } (glob($new->data_dir . '/pg_upgrade_output.d/*/log/pg_upgrade_server.log'),
	"$tmp/pg_upgrade_server.log");
ok(@logs, 'the upgrade servers\' log is there');
my $upgrade_log = join '', map { slurp_file($_) } @logs;
like($upgrade_log, qr/CREATE EXTENSION|binary_upgrade_create_empty_extension/,
	'the log covers the restore of the extension');
unlike($upgrade_log, qr/cqrs projector \d+ is now the leader|background worker "cqrs projector"/,
	'no projector ran in binary-upgrade mode');

$new->start;
$new->poll_query_until('postgres', "SELECT state = 'running' FROM cqrs.status")
  or die 'the projector does not run after the upgrade';
is($new->safe_psql('postgres', q{SELECT count(*) || ' ' || max(log_id) FROM cqrs.command_log}),
	$log, 'every command is in the upgraded cluster');
if ($new->safe_psql('postgres', 'SHOW server_version_num') >= 170000)
{
	unlike(slurp_file($new->logfile), qr/cqrs projector is creating replication slot/,
		'17: the projector goes on from the slot pg_upgrade carried over');
}
else
{
	like(slurp_file($new->logfile), qr/cqrs projector created slot "cqrs" .* caught up from the command log/,
		'15: the projector makes a new slot and folds the log');
}
compare_model($new, 'right after the upgrade');
$new->safe_psql('postgres', q{
	SELECT cqrs.ship_order('up-' || i) FROM generate_series(101, 150) i;
	SELECT cqrs.ship_order('up-200', NULL, 2);
	SELECT cqrs.cancel_order('up-200', NULL, NULL, 3);
});
wait_projected($new);
my $after = compare_model($new, 'after commands on the upgraded cluster');
is($after->{parked}, 0, 'the parked command followed its predecessors');
cmp_ok($new->safe_psql('postgres', q{SELECT max(log_id) FROM cqrs.command_log}),
	'>', (split / /, $log)[1], 'log_ids go on after the upgraded ones');

my ($rc, $out, $err) = $new->psql('postgres',
	q{SELECT cqrs.submit('OPEN_ACCOUNT', 'acct-2', '{"holder": "nobody"}')});
like($err, qr/no such holder/, 'the declared command type and its validator survive the upgrade');
is($new->safe_psql('postgres', q{SELECT sequence_id FROM cqrs.submit('OPEN_ACCOUNT', 'acct-2', '{"holder": "h"}')}),
	'1', '... and take commands');
$new->stop;
done_testing();
