# Committing a command wakes the projector: with cqrs.poll_interval at an
# hour, commands still reach the read model at once, with
# synchronous_commit on and off.  The latencies are printed, not asserted
# beyond "long before the poll interval": test/bench measures them.  And
# cqrs.wait_for_lsn() at the end of an idle server's WAL returns at once.
# With cqrs.batch_delay, commands that commit while commands keep coming
# gather into one batch, and a lone command is still applied at once.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = cqrs_node('wake', conf => "cqrs.poll_interval = '1h'");

$node->safe_psql('postgres', q{
CREATE TABLE lag (sc text, ms double precision);
CREATE PROCEDURE measure(n int, sc text) LANGUAGE plpgsql AS $$
DECLARE
	t0 timestamptz;
	id text;
BEGIN
	PERFORM set_config('synchronous_commit', sc, false);
	FOR i IN 1 .. n LOOP
		id := 'w-' || sc || '-' || i;
		PERFORM cqrs.submit_order(id, 'u', 1);
		COMMIT;
		t0 := clock_timestamp();
		WHILE NOT EXISTS (SELECT FROM cqrs.read_model WHERE order_id = id) LOOP
			IF clock_timestamp() - t0 > interval '10 seconds' THEN
				RAISE EXCEPTION 'order % not projected after 10 s', id;
			END IF;
			PERFORM pg_sleep(0.0002);
		END LOOP;
		INSERT INTO lag VALUES (sc, extract(epoch FROM clock_timestamp() - t0) * 1000);
		COMMIT;
	END LOOP;
END $$;
});

for my $sc ('on', 'off')
{
	my ($ret, $out, $err) = $node->psql('postgres', "CALL measure(50, '$sc')");
	is($ret, 0, "synchronous_commit = $sc: 50 commands projected without waiting for the poll interval")
	  or diag($err);
	note "synchronous_commit = $sc: commit-to-read-model ms p50/p99/max = "
	  . $node->safe_psql('postgres', qq{
		SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2) || ' / ' ||
		       round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 2) || ' / ' ||
		       round(max(ms)::numeric, 2) FROM lag WHERE sc = '$sc'});
}

# cqrs.wait_for_lsn() on an idle server whose WAL ends with a record that
# is no commit and that nobody writes out (here a non-transactional
# logical message; on an idle 17, a running-transactions record): the
# waiter has the projector read that far instead of waiting for a commit
# that does not come.
$node->safe_psql('postgres', q{SELECT cqrs.submit_order('idle-1', 'u', 1)});
$node->safe_psql('postgres', q{SELECT cqrs.wait_for_lsn(pg_current_wal_insert_lsn(), '10 s')});
$node->safe_psql('postgres', q{SELECT pg_logical_emit_message(false, 'cqrs-test', 'idle')});
is($node->safe_psql('postgres', q{
	SELECT cqrs.wait_for_lsn(pg_current_wal_insert_lsn(), '3 s')}), 't',
	'wait_for_lsn passes a trailing record that is not a commit');

# cqrs.batch_delay (here 1 s, to see it): after a batch of two commands the
# projector waits, so five commands committed one by one meanwhile make
# one batch (the first batch is applied within the 0.3 s the script waits
# before them); without the delay each commit wakes it.  Once the delay is
# over and it sleeps, a lone command is applied at once.
sub batches
{
	return $node->safe_psql('postgres', 'SELECT batches_total FROM cqrs.worker_status()');
}
$node->safe_psql('postgres', q{ALTER SYSTEM SET cqrs.batch_delay = '1s'; SELECT pg_reload_conf()});
$node->poll_query_until('postgres', q{SELECT current_setting('cqrs.batch_delay') = '1s'})
  or die 'cqrs.batch_delay not reloaded';
my $b0 = batches();
$node->safe_psql('postgres', q{
BEGIN;
SELECT cqrs.submit_order('gather-1', 'u', 1);
SELECT cqrs.submit_order('gather-2', 'u', 1);
COMMIT;
SELECT pg_sleep(0.3);
SELECT cqrs.submit_order('gather-3', 'u', 1);
SELECT cqrs.submit_order('gather-4', 'u', 1);
SELECT cqrs.submit_order('gather-5', 'u', 1);
SELECT cqrs.submit_order('gather-6', 'u', 1);
SELECT cqrs.submit_order('gather-7', 'u', 1);
SELECT cqrs.wait_for_lsn(pg_current_wal_insert_lsn(), '10 s');
});
is(batches() - $b0, 2, 'cqrs.batch_delay: five commands committed during the delay make one batch');
is($node->safe_psql('postgres', 'SELECT last_batch_size FROM cqrs.worker_status()'), '5',
	'of five commands');
sleep 2;
my $lone = $node->safe_psql('postgres', q{SELECT command_id FROM cqrs.submit_order('lone-1', 'u', 1)});
is($node->safe_psql('postgres', qq{SELECT cqrs.wait_for('$lone', '500 ms')}), 't',
	'a lone command after the delay is applied at once');

$node->stop;
done_testing();
