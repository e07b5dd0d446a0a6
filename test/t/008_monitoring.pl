# Monitoring: cqrs.prometheus() passes promtool's exposition-format check,
# the alert rules pass promtool's check and their unit tests, and Debian's
# prometheus-postgres-exporter, started against this cluster with
# monitoring/queries.yaml and a role that has only pg_monitor, serves the
# cqrs metrics with the values cqrs.metrics() has.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use HTTP::Tiny;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(sleep);

my $exporter = '/usr/bin/prometheus-postgres-exporter';
my $promtool = '/usr/bin/promtool';
plan skip_all => 'prometheus-postgres-exporter and promtool are not installed'
  unless -x $exporter && -x $promtool;

my $monitoring = "$FindBin::RealBin/../../monitoring";
my $node = cqrs_node('monitoring');
sub sql { $node->safe_psql('postgres', $_[0]) }

sql(q{SELECT cqrs.submit_order('m-' || g, 'u', 1) FROM generate_series(1, 20) g});
sql(q{SELECT cqrs.ship_order('m-1')});
$node->psql('postgres', q{SELECT cqrs.submit_order('', 'u', 1)});
wait_projected($node);
my $batches = sql(q{SELECT value FROM cqrs.metrics() WHERE name = 'cqrs_batch_flush_duration_seconds_count'});
cmp_ok($batches, '>', 0, 'cqrs.metrics() counts the batches applied');

# The exposition format, as Prometheus's own linter reads it.
my $text = sql(q{SELECT cqrs.prometheus()});
my ($out, $err) = ('', '');
IPC::Run::run([ $promtool, 'check', 'metrics' ], '<', \"$text\n", '>', \$out, '2>', \$err);
is("$out$err", '', 'promtool check metrics finds nothing to report in cqrs.prometheus()');

ok(IPC::Run::run([ $promtool, 'check', 'rules', "$monitoring/alerts.yml" ], '>', \$out, '2>', \$err),
	'the alert rules pass promtool check rules') or diag("$out$err");
ok(IPC::Run::run([ $promtool, 'test', 'rules', "$monitoring/alerts_test.yml" ], '>', \$out, '2>', \$err),
	'the alert rules pass their unit tests') or diag("$out$err");

# The exporter, with the least privilege it needs.
sql(q{CREATE ROLE regress_exporter LOGIN IN ROLE pg_monitor});
my $port = PostgreSQL::Test::Cluster::get_free_port();
local $ENV{DATA_SOURCE_NAME} = sprintf('host=%s port=%d user=regress_exporter dbname=postgres sslmode=disable',
	$node->host, $node->port);
my ($xout, $xerr) = ('', '');
my $h = IPC::Run::start(
	[
		$exporter, "--extend.query-path=$monitoring/queries.yaml",
		"--web.listen-address=127.0.0.1:$port",
		'--disable-default-metrics', '--disable-settings-metrics'
	],
	'>', \$xout, '2>', \$xerr);

my $http = HTTP::Tiny->new(timeout => 5);
my $page = '';
for (1 .. 100)
{
	my $r = $http->get("http://127.0.0.1:$port/metrics");
	$page = $r->{content} if $r->{success};
	last if $page =~ /^cqrs_commands_total/m;
	sleep 0.2;
}
$h->kill_kill;
$h->finish;

my %want = map { my ($k, $v) = split /\|/; ($k => $v) } split /\n/, sql(q{
	SELECT name || coalesce('{' || (SELECT string_agg(key || '="' || value || '"', ',')
	                                  FROM jsonb_each_text(labels)) || '}', ''), value
	  FROM cqrs.metrics()
	 WHERE name IN ('cqrs_commands_total', 'cqrs_command_errors_total')});
for my $name ('cqrs_projection_lag_seconds', 'cqrs_slot_lag_bytes', 'cqrs_parked',
	'cqrs_projected_total', 'cqrs_dead_letter_total', 'cqrs_slot_lost_total',
	'cqrs_spilled_total',
	'cqrs_cache_hit_ratio',
	'cqrs_batch_flush_duration_seconds_bucket', 'cqrs_batch_flush_duration_seconds_sum',
	'cqrs_batch_flush_duration_seconds_count', 'cqrs_redis_connected',
	'cqrs_redis_writes_total', 'cqrs_redis_errors_total',
	'cqrs_redis_redirects_total', 'cqrs_redis_backlog',
	'cqrs_spans_buffered', 'cqrs_spans_dropped_total', 'cqrs_spans_exported_total',
	'cqrs_spans_failed_total')
{
	like($page, qr/^\Q$name\E[{ ]/m, "the exporter serves $name") or diag("$xerr");
}
like($page, qr/^cqrs_commands_total\{[^}]*type="CREATE_ORDER"[^}]*\} 20$/m,
	'the exporter serves cqrs_commands_total by type with its value');
like($page, qr/^cqrs_commands_total\{[^}]*type="SHIP_ORDER"[^}]*\} 1$/m,
	'... for every type');
like($page, qr/^cqrs_command_errors_total\{[^}]*kind="invalid_input"[^}]*\} 1$/m,
	'the exporter serves refused commands by kind');
is($want{'cqrs_commands_total{type="CREATE_ORDER"}'}, '20', 'and cqrs.metrics() agrees');
like($page, qr/^cqrs_batch_flush_duration_seconds_bucket\{[^}]*le="\+Inf"[^}]*\} $batches$/m,
	'batch durations come as cumulative buckets, all batches under +Inf');

$node->stop;
done_testing();
