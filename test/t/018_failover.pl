# Failover: the primary dies under load and its streaming standby is
# promoted.  On PostgreSQL 17 the projector's slot is a failover slot: the
# primary lists the standby's physical slot in synchronized_standby_slots,
# the standby synchronizes the slot (sync_replication_slots), and the
# promoted standby's projector continues from it without folding the log.
# On 15 no slot reaches the standby: the promoted standby makes one and
# folds the whole log.  Either way every command the promoted server has is
# applied exactly once (an audit trigger records each version written, on
# the primary and, replicated, on the standby), and the read model equals
# an independent fold of the log.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $primary = cqrs_node('primary');
my $failover_slots = $primary->pg_version >= 17;
note $failover_slots ? 'PostgreSQL 17 or later: failover slots' : 'before 17: refold';

audit_load($primary);
$primary->safe_psql('postgres',
	q{SELECT pg_create_physical_replication_slot('standby1')});
if ($failover_slots)
{
	is($primary->safe_psql('postgres',
		q{SELECT failover FROM pg_replication_slots WHERE slot_name = 'cqrs'}),
		't', "the projector's slot is a failover slot");

	# cqrs.slot_failover changes the slot the projector finds when it
	# starts leading (here: switched off and on again)
	for my $want ('off', 'on')
	{
		for my $enabled ('off', 'on')
		{
			$primary->safe_psql('postgres', qq{
				ALTER SYSTEM SET cqrs.slot_failover = $want;
				ALTER SYSTEM SET cqrs.enabled = $enabled;
				SELECT pg_reload_conf();});
			my $state = $enabled eq 'on' ? 'running' : 'disabled';
			$primary->poll_query_until('postgres',
				"SELECT state = '$state' FROM cqrs.status")
			  or die "the projector is not $state";
		}
		is($primary->safe_psql('postgres',
			q{SELECT failover FROM pg_replication_slots WHERE slot_name = 'cqrs'}),
			$want eq 'on' ? 't' : 'f', "cqrs.slot_failover = $want alters the slot");
	}
	$primary->append_conf('postgresql.conf', "synchronized_standby_slots = 'standby1'");
	$primary->reload;
}

$primary->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'b', has_streaming => 1);
$standby->append_conf('postgresql.conf', q{
primary_slot_name = 'standby1'
hot_standby_feedback = on
});
# The standby's own settings name no standby of its own: promoted, it has
# none (the primary's list, copied by the backup, would hold its slot back).
$standby->append_conf('postgresql.conf', "synchronized_standby_slots = ''")
  if $failover_slots;
if ($failover_slots)
{
	# the slot sync worker needs a database to connect to
	my $conninfo = 'host=' . $primary->host . ' port=' . $primary->port
	  . ' dbname=postgres application_name=standby';
	$standby->append_conf('postgresql.conf', qq{
sync_replication_slots = on
primary_conninfo = '$conninfo'
});
}
$standby->start;

my $script = q{
\set o random(1, 5000)
\set k random(1, 3)
SELECT random_command(:o, :k);
};

# Load, with the slot synchronized to the standby while it runs; then the
# primary dies in the middle of it.
my $load = start_load($primary, $script, 4, 60);
if ($failover_slots)
{
	$standby->poll_query_until('postgres', q{
		SELECT synced AND NOT temporary AND confirmed_flush_lsn IS NOT NULL
		  FROM pg_replication_slots WHERE slot_name = 'cqrs'})
	  or die 'the slot was not synchronized to the standby';
	pass('the standby has the synchronized slot');
	# and moved on since: the sync follows the primary's confirmations
	my $first = $standby->safe_psql('postgres',
		q{SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'cqrs'});
	$standby->poll_query_until('postgres', qq{
		SELECT confirmed_flush_lsn > '$first'
		  FROM pg_replication_slots WHERE slot_name = 'cqrs'})
	  or die 'the synchronized slot does not advance';
}
sleep 3;
$primary->stop('immediate');
finish_load($load);
my $before = $standby->safe_psql('postgres', 'SELECT count(*) FROM cqrs.command_log');
cmp_ok($before, '>', 1000, "the standby received $before commands");

my $offset = -s $standby->logfile;
$standby->promote;
$standby->poll_query_until('postgres',
	"SELECT state IN ('running', 'catching_up') FROM cqrs.status")
  or die 'no projector on the promoted standby';

# More commands on the promoted server, then the comparison.
finish_load(start_load($standby, $script, 2, 2));
wait_projected($standby);
my $log = slurp_file($standby->logfile, $offset);
if ($failover_slots)
{
	like($log, qr/cqrs projector continues from replication slot "cqrs" synchronized from the former primary/,
		'the promoted standby continues from the synchronized slot');
	unlike($log, qr/is creating replication slot/, 'and folds no log');
}
else
{
	like($log, qr/cqrs projector created slot "cqrs" at \S+ and caught up from the command log/,
		'the promoted standby makes a slot and folds the log');
}
compare_model($standby, 'after the promotion');
is(written_twice($standby), '0', 'no order version was written twice');

$standby->stop;
done_testing();
