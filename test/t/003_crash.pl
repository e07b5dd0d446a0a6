# Exactly once across crashes: immediate shutdowns in the middle of a load,
# several rounds (two with asynchronous commits), then kill -9 of the
# leading projector.  Afterwards the
# read model equals the fold of the log, and no order version was ever
# written twice (an audit trigger on the read model records every write).
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = cqrs_node('crash', conf => 'restart_after_crash = on');

audit_load($node);

my $script = q{
\set o random(1, 20000)
\set k random(1, 3)
SELECT random_command(:o, :k);
};

# The last two rounds commit with synchronous_commit = off: the projector
# then applies commands it read before they were flushed, and the crash
# must take such a batch away together with its commands.
for my $round (1 .. 4)
{
	local $ENV{PGOPTIONS} = $round > 2 ? '-c synchronous_commit=off' : '';
	my $load = start_load($node, $script, 4, 30);
	sleep(2 + $round);
	$node->stop('immediate');
	finish_load($load);
	$node->start;
	$node->poll_query_until('postgres',
		"SELECT state IN ('running', 'catching_up') FROM cqrs.status")
	  or die "the projector did not come back after round $round";
	note "round $round: "
	  . $node->safe_psql('postgres', 'SELECT count(*) FROM cqrs.command_log')
	  . " commands in the log";
}

# kill -9 of the leader under load: the postmaster restarts everything.
my $load = start_load($node, $script, 4, 30);
sleep 2;
my $leader = $node->safe_psql('postgres', 'SELECT leader_pid FROM cqrs.status');
ok($leader =~ /^\d+$/, "there is a leader ($leader)");
kill 'KILL', $leader;
finish_load($load);
$node->poll_query_until('postgres',
	"SELECT state IN ('running', 'catching_up') AND leader_pid <> $leader FROM cqrs.status")
  or die 'the projector did not come back after kill -9';
# a last short load on the recovered server
finish_load(start_load($node, $script, 2, 2));

wait_projected($node);
my $exp = compare_model($node, 'after 4 immediate stops and a kill -9');
cmp_ok(scalar(keys %{ $exp->{orders} }), '>', 1000, 'the loads created many orders');
is(written_twice($node), '0', 'no order version was written twice');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM cqrs.read_model r
	 WHERE NOT EXISTS (SELECT FROM audit a WHERE a.order_id = r.order_id AND a.version = r.version)}),
	'0', 'every row of the read model went through the audit');

$node->stop;
done_testing();
