# A lost slot is recovered from the log.  With max_slot_wal_keep_size
# small and the projector paused, commands fill more WAL than the slot may
# keep; checkpoints remove it and invalidate the slot (wal_status "lost"),
# terminating the leader that holds it, as in PostgreSQL's
# src/test/recovery/t/019_replslot_limit.pl.  On resume the projector must
# notice from the slot's state, say so (log, last_error, metric), make a
# new slot and fold the whole log: every command applied exactly once.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = cqrs_node('lost_slot',
	initdb => [ '--wal-segsize=1' ],
	conf => "min_wal_size = '2MB'\nmax_wal_size = '64MB'\nmax_slot_wal_keep_size = '2MB'");
sub sql { $node->safe_psql('postgres', $_[0]) }

# Some orders projected before, with a ship still to come.
sql(q{SELECT cqrs.submit_order('ls-' || i, 'u', 1) FROM generate_series(1, 200) i});
wait_projected($node);

sql(q{SELECT cqrs.pause()});
$node->poll_query_until('postgres', q{SELECT state = 'paused' FROM cqrs.status})
  or die 'the projector did not pause';

# About 8 MB of WAL of commands (ships of the earlier orders among them),
# then checkpoints: the slot loses the WAL it kept.
sql(q{SELECT cqrs.ship_order('ls-' || i) FROM generate_series(1, 100) i});
for my $round (1 .. 8)
{
	sql(qq{SELECT cqrs.submit_order('lt-$round-' || i, 'u', 2)
		FROM generate_series(1, 1000) i});
}
sql(q{SELECT pg_switch_wal(); CHECKPOINT; CHECKPOINT});
$node->poll_query_until('postgres',
	q{SELECT wal_status = 'lost' FROM pg_replication_slots WHERE slot_name = 'cqrs'})
  or die 'the slot was not invalidated: '
  . sql(q{SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'cqrs'});
pass('the slot is lost');

my $offset = -s $node->logfile;
sql(q{SELECT cqrs.resume()});
wait_projected($node);
$node->wait_for_log(qr/WARNING:  cqrs projector's replication slot "cqrs" was invalidated/,
	$offset);
pass('the loss is logged');
like(sql(q{SELECT last_error FROM cqrs.status}),
	qr/replication slot "cqrs" was invalidated; made again and the command log folded/,
	'cqrs.status.last_error says what happened');
is(sql(q{SELECT value FROM cqrs.metrics() WHERE name = 'cqrs_slot_lost_total'}),
	'1', 'cqrs_slot_lost_total counts it');
is(sql(q{SELECT wal_status <> 'lost' FROM pg_replication_slots WHERE slot_name = 'cqrs'}),
	't', 'the projector reads from a new slot');
is(sql(q{SELECT count(*) FROM cqrs.read_model WHERE order_id LIKE 'lt-%'}),
	'8000', 'every command sent while the slot was lost is projected');
is(sql(q{SELECT count(*) FROM cqrs.read_model WHERE order_id LIKE 'ls-%' AND status = 'shipped'}),
	'100', 'and the ships of orders projected before');
compare_model($node, 'after the lost slot');

# Later commands go through the new slot.
sql(q{SELECT cqrs.cancel_order('ls-' || i) FROM generate_series(101, 150) i});
wait_projected($node);
compare_model($node, 'after commands through the new slot');


$node->stop;
done_testing();
