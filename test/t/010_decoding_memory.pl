# The projector's WAL reader keeps its buffers for as long as it leads.
#
# Decoding a transaction's commit runs the output plugin inside an internal
# subtransaction; when that ends, the current memory context is the
# projector's own decoding transaction's.  Whatever the WAL reader
# allocates after that, in the same round of reading, must still not die
# with that transaction: the buffer in which it reassembles a record that
# spans pages grows for a record larger than any before it, and a record
# larger than its decode buffer gets memory of its own.  Both are read here
# right after a commit was decoded, in one round (the projector is paused
# while they are written), and then records spanning pages are read in later
# rounds.  A reader whose buffers were freed with the transaction writes
# into freed memory: the projector then crashes (on PostgreSQL 17, where an
# index build writes such large records, in test 006) or corrupts memory.
#
# Each round: pause; a transaction without commands (decoded, emits
# nothing); a large logical message, written outside any transaction and
# larger than glibc ever serves from its heap; a transaction of commands;
# resume; more commands.  The projector must stay the same process, and
# the read model must equal the fold of the log.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = cqrs_node('decoding_memory',
	conf => "restart_after_crash = off\nmax_wal_size = '1GB'");
sub sql { $node->safe_psql('postgres', $_[0]) }

sql(q{CREATE TABLE other (x int)});
my $leader = sql(q{SELECT leader_pid FROM cqrs.status});

for my $round (1 .. 3)
{
	sql(q{SELECT cqrs.pause()});
	$node->poll_query_until('postgres',
		q{SELECT state = 'paused' FROM cqrs.status})
	  or die 'the projector did not pause';

	sql(q{INSERT INTO other VALUES (1)});
	# 40 MB: above glibc's largest mmap threshold, so a buffer of that size
	# freed too early is unmapped and the next write into it faults.
	sql(q{SELECT pg_logical_emit_message(false, 'cqrs-test',
		repeat('m', 40 * 1024 * 1024))});
	sql(qq{SELECT cqrs.submit_order('dm-$round-a-' || i, 'u', 1)
		FROM generate_series(1, 500) i});
	sql(q{SELECT cqrs.resume()});
	wait_projected($node);

	# later rounds of reading: commands whose records span WAL pages
	for my $i (1 .. 4)
	{
		sql(qq{SELECT cqrs.submit_order('dm-$round-b$i-' || i, 'u', 1)
			FROM generate_series(1, 500) i});
	}
	wait_projected($node);
	is(sql(q{SELECT leader_pid FROM cqrs.status}), $leader,
		"round $round: the projector is still the same process");
}

unlike(slurp_file($node->logfile), qr/terminated by signal|corrupted|double free/,
	'no process crashed');
is(sql(q{SELECT count(*) FROM cqrs.read_model WHERE order_id LIKE 'dm-%'}),
	3 * 2500, 'every command was projected');
compare_model($node, 'after large records between decoded commits');

$node->stop;
done_testing();
