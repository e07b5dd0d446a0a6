# Projections declared in SQL, on a running projector: the bank accounts
# example (examples/accounts.sql) under concurrent load, a projection
# created and backfilled while commands keep coming, kill -9 of the
# projector, a poison apply function, a crash in the middle of a
# backfill, verify catching a corrupted row, and a drop.  Every check of
# the tables is against an independent fold of the log, in Perl.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;

my $node = cqrs_node('declared', conf => 'restart_after_crash = on');
sub sql { $node->safe_psql('postgres', $_[0]) }

my $examples = "$FindBin::RealBin/../../examples/accounts.sql";
$node->command_ok(
	[ 'psql', '-X', '-v', 'ON_ERROR_STOP=1', '-q', '-h', $node->host, '-p', $node->port,
	  '-d', 'postgres', '-f', $examples ],
	'examples/accounts.sql declares the domain and its two projections');

# The accounts, then deposits and withdrawals from 4 clients, some of the
# withdrawals larger than the balance.
sql(q{SELECT cqrs.submit('OPEN_ACCOUNT', 'acc-' || i, jsonb_build_object('holder', 'holder ' || i))
	FROM generate_series(1, 40) AS i});
my $script = q{
\set a random(1, 40)
\set d random(1, 100)
\set b random(1, 40)
\set w random(1, 150)
SELECT cqrs.submit('DEPOSIT', 'acc-' || :a, jsonb_build_object('amount', :d));
SELECT cqrs.submit('WITHDRAW', 'acc-' || :b, jsonb_build_object('amount', :w));
};

# The fold of the log, independently: per account, [balance, deposited,
# withdrawn, refused, closed]; the command ids an overdraft refused.
sub fold_accounts
{
	my $rows = sql(q{SELECT aggregate_id, command_type, coalesce(payload->>'amount', ''), command_id
		FROM cqrs.command_log WHERE command_type IN
		  ('OPEN_ACCOUNT', 'DEPOSIT', 'WITHDRAW', 'CLOSE_ACCOUNT')
		ORDER BY aggregate_id, sequence_id});
	my (%acc, %refused);
	for my $line (split /\n/, $rows)
	{
		my ($id, $type, $amount, $cid) = split /\|/, $line;
		if ($type eq 'OPEN_ACCOUNT') { $acc{$id} = [ 0, 0, 0, 0, 'f' ]; next; }
		my $a = $acc{$id};
		if ($type eq 'DEPOSIT') { $a->[0] += $amount; $a->[1] += $amount; }
		elsif ($type eq 'WITHDRAW')
		{
			if ($amount > $a->[0]) { $a->[3]++; $refused{$cid} = 1; }
			else { $a->[0] -= $amount; $a->[2] += $amount; }
		}
		else { $a->[4] = 't'; }
	}
	return (\%acc, \%refused);
}

# Compare both tables and the dead letters with the fold.
sub compare_accounts
{
	my ($name) = @_;
	my ($acc, $refused) = fold_accounts();
	my $want_balance = join "\n", map {
		$acc->{$_}[4] eq 't' ? () : sprintf('%s|%.2f', $_, $acc->{$_}[0])
	} sort keys %$acc;
	is(sql(q{SELECT string_agg(account_id || '|' || balance, E'\n' ORDER BY account_id COLLATE "C")
		FROM bank.balance}), $want_balance, "$name: bank.balance is the fold of the log");
	my $want_activity = join "\n", map {
		my $a = $acc->{$_};
		sprintf('%s|%.2f|%.2f|%.2f|%d|%s', $_, @$a)
	} sort keys %$acc;
	is(sql(q{SELECT string_agg(concat_ws('|', account_id, balance, deposited, withdrawn, refused, closed),
		E'\n' ORDER BY account_id COLLATE "C") FROM bank.activity}),
		$want_activity, "$name: bank.activity is the fold of the log");
	is(sql(q{SELECT string_agg(command_id::text, ',' ORDER BY command_id)
		FROM cqrs.dead_letter WHERE projection = 'account_balance'}),
		join(',', sort keys %$refused) || '',
		"$name: every overdraft, and only they, dead-lettered for account_balance");
	is(sql(q{SELECT count(*) FROM cqrs.dead_letter WHERE projection = 'account_balance'
		AND (sqlstate <> '23514' OR reason NOT LIKE 'insufficient funds%')}),
		'0', "$name: with the apply function's SQLSTATE and message");
	for my $p ('account_balance', 'account_activity')
	{
		is(sql(qq{SELECT count(*) FROM cqrs.verify('$p')}), '0',
			"$name: cqrs.verify('$p') finds nothing");
	}
	return scalar keys %$refused;
}

# A third projection made while the load runs: its backfill must meet the
# stream with nothing missed and nothing applied twice.
sql(q{CREATE TABLE bank.commands (account_id text PRIMARY KEY, n integer NOT NULL,
		last_sequence bigint NOT NULL);
	CREATE FUNCTION bank.count_commands(state bank.commands, command cqrs.command_log)
	RETURNS bank.commands LANGUAGE sql AS $$
		SELECT command.aggregate_id, coalesce(state.n, 0) + 1, command.sequence_id
	$$});
my $load = start_load($node, $script, 4, 6);
sleep 2;
sql(q{SELECT cqrs.create_projection('account_commands', 'account', 'bank.commands',
	'account_id', 'bank.count_commands(bank.commands, cqrs.command_log)')});
my $out = finish_load($load);
like($out, qr/number of failed transactions: 0/, 'the load ran without errors');
wait_projected($node);
my $refused = compare_accounts('under load');
ok($refused > 0, "some withdrawals were overdrafts ($refused)");
is(sql(q{SELECT count(*) FROM bank.commands AS c
		JOIN (SELECT aggregate_id, count(*) AS n, max(sequence_id) AS m FROM cqrs.command_log
			  GROUP BY 1) AS l ON l.aggregate_id = c.account_id
		WHERE (c.n, c.last_sequence) IS DISTINCT FROM (l.n, l.m)}),
	'0', 'the projection created under load counted every command once');
is(sql(q{SELECT count(*) FROM bank.commands}), '40', 'one row per account');
is(sql(q{SELECT count(*) FROM cqrs.verify('account_commands')}), '0',
	'cqrs.verify() agrees for the projection created under load');

# kill -9 of the projector under load: exactly once afterwards.
$load = start_load($node, $script, 4, 5);
sleep 2;
my $leader = sql(q{SELECT leader_pid FROM cqrs.status});
kill 'KILL', $leader;
finish_load($load);
$node->poll_query_until('postgres', q{SELECT state = 'running' FROM cqrs.status})
  or die 'the projector did not come back after kill -9';
wait_projected($node);
compare_accounts('after kill -9 of the projector');
is(sql(q{SELECT count(*) FROM cqrs.verify('account_commands')}), '0',
	'the third projection survived the kill -9 too');

# A NULL result deletes the row; the version stays.
sql(q{SELECT cqrs.submit('CLOSE_ACCOUNT', 'acc-40', '{}')});
wait_projected($node);
is(sql(q{SELECT count(*) FROM bank.balance WHERE account_id = 'acc-40'}), '0',
	'closing an account deletes its balance row');
is(sql(q{SELECT closed FROM bank.activity WHERE account_id = 'acc-40'}), 't',
	'and marks it closed in the other projection');
is(sql(q{SELECT version = (SELECT max(sequence_id) FROM cqrs.command_log WHERE aggregate_id = 'acc-40')
	FROM cqrs.projection_version WHERE projection = 'account_balance' AND aggregate_id = 'acc-40'}),
	't', 'the deleted row keeps its version');

# A poison apply function: one command fails in one projection only; the
# others apply it, and the pipeline goes on.
sql(q{CREATE TABLE bank.unlucky (account_id text PRIMARY KEY, n integer NOT NULL);
	CREATE FUNCTION bank.no_thirteen(state bank.unlucky, command cqrs.command_log)
	RETURNS bank.unlucky LANGUAGE plpgsql AS $$
	BEGIN
		IF command.payload->>'amount' = '13.13' THEN
			RAISE EXCEPTION 'thirteen' USING ERRCODE = 'data_exception';
		END IF;
		RETURN ROW(command.aggregate_id, coalesce(state.n, 0) + 1);
	END $$;
	SELECT cqrs.create_projection('unlucky', 'account', 'bank.unlucky', 'account_id',
		'bank.no_thirteen(bank.unlucky, cqrs.command_log)')});
my $d13 = sql(q{BEGIN;
	SELECT cqrs.submit('DEPOSIT', 'acc-1', '{"amount": 7}');
	SELECT (cqrs.submit('DEPOSIT', 'acc-1', '{"amount": 13.13}')).command_id;
	SELECT cqrs.submit('DEPOSIT', 'acc-2', '{"amount": 8}');
	COMMIT});
($d13) = $d13 =~ /([0-9a-f-]{36})\s*$/m;
ok($d13, 'the poison command was logged');
wait_projected($node);
is(sql(qq{SELECT projection || ' ' || sqlstate || ' ' || reason FROM cqrs.dead_letter
	WHERE command_id = '$d13'}),
	'unlucky 22000 thirteen', 'the failing apply is dead-lettered with projection and SQLSTATE');
is(sql(q{SELECT state FROM cqrs.status}), 'running', 'the projector goes on');
is(sql(q{SELECT n = (SELECT count(*) - 1 FROM cqrs.command_log WHERE aggregate_id = 'acc-1')
	FROM bank.unlucky WHERE account_id = 'acc-1'}), 't',
	'the poison projection skipped only that command');
compare_accounts('after a poison apply function');

# A crash in the middle of a backfill: nothing of it remains, and it can be
# made again.
sql(q{CREATE TABLE bank.slow (account_id text PRIMARY KEY, n integer NOT NULL);
	CREATE FUNCTION bank.slow_count(state bank.slow, command cqrs.command_log)
	RETURNS bank.slow LANGUAGE plpgsql AS $$
	BEGIN
		PERFORM pg_sleep(0.005);
		RETURN ROW(command.aggregate_id, coalesce(state.n, 0) + 1);
	END $$});
my ($bout, $berr) = ('', '');
my $backfill = IPC::Run::start(
	[ 'psql', '-X', '-h', $node->host, '-p', $node->port, '-d', 'postgres', '-c',
	  q{SELECT cqrs.create_projection('slow', 'account', 'bank.slow', 'account_id',
		'bank.slow_count(bank.slow, cqrs.command_log)')} ],
	'>', \$bout, '2>', \$berr);
$node->poll_query_until('postgres', q{SELECT EXISTS (SELECT FROM pg_stat_activity
	WHERE query LIKE '%create_projection(''slow''%' AND now() - query_start > '1 s')})
  or die 'the backfill did not start';
$node->stop('immediate');
$backfill->finish;
$node->start;
$node->poll_query_until('postgres', q{SELECT state = 'running' FROM cqrs.status})
  or die 'the projector did not start again';
is(sql(q{SELECT count(*) FROM cqrs.projection WHERE name = 'slow'}), '0',
	'a backfill cut by a crash leaves no projection');
is(sql(q{SELECT count(*) FROM bank.slow}) . '/'
	. sql(q{SELECT count(*) FROM cqrs.projection_version WHERE projection = 'slow'}),
	'0/0', 'and no rows or versions');
sql(q{CREATE OR REPLACE FUNCTION bank.slow_count(state bank.slow, command cqrs.command_log)
	RETURNS bank.slow LANGUAGE sql AS $$
		SELECT command.aggregate_id, coalesce(state.n, 0) + 1 $$;
	SELECT cqrs.create_projection('slow', 'account', 'bank.slow', 'account_id',
		'bank.slow_count(bank.slow, cqrs.command_log)')});
sql(q{SELECT cqrs.submit('DEPOSIT', 'acc-3', '{"amount": 1}')});
wait_projected($node);
is(sql(q{SELECT count(*) FROM cqrs.verify('slow')}), '0',
	'made again after the crash, it follows the stream');
compare_accounts('after a crash during a backfill');

# verify catches a corrupted row; rebuild repairs it.
sql(q{UPDATE bank.balance SET balance = balance + 1 WHERE account_id = 'acc-5'});
is(sql(q{SELECT aggregate_id FROM cqrs.verify('account_balance')}), 'acc-5',
	'cqrs.verify() names the corrupted row');
like(sql(q{SELECT expected || ' / ' || actual FROM cqrs.verify('account_balance')}),
	qr/^\(acc-5,.*\) \/ \(acc-5,.*\)$/, 'with the folded and the stored row');
sql(q{SELECT cqrs.rebuild('account_balance')});
compare_accounts('after cqrs.rebuild(projection)');

# A restore may load a definition before its versions: until they are
# there, the projector leaves the projection alone rather than fold the
# restored commands into its table a second time.
sql(q{BEGIN;
	DELETE FROM cqrs.projection_version WHERE projection = 'account_commands';
	UPDATE cqrs.projection SET owner = owner WHERE name = 'account_commands';
	COMMIT});
my $n7 = sql(q{SELECT n FROM bank.commands WHERE account_id = 'acc-7'});
sql(q{SELECT cqrs.submit('DEPOSIT', 'acc-7', '{"amount": 1}')});
wait_projected($node);
is(sql(q{SELECT n FROM bank.commands WHERE account_id = 'acc-7'}), $n7,
	'a projection whose versions are missing is left alone');
ok($node->log_contains(qr/leaves projection "account_commands" alone: its versions are not there/),
	'and the server log says why');
is(sql(q{SELECT count(*) FROM bank.balance WHERE account_id = 'acc-7'}), '1',
	'the other projections go on');
sql(q{SELECT cqrs.rebuild('account_commands')});
is(sql(q{SELECT count(*) FROM cqrs.verify('account_commands')}), '0',
	'cqrs.rebuild() makes it whole and ready');
sql(q{SELECT cqrs.submit('DEPOSIT', 'acc-7', '{"amount": 1}')});
wait_projected($node);
is(sql(q{SELECT n FROM bank.commands WHERE account_id = 'acc-7'}), $n7 + 2,
	'and it follows the stream again');

# Dropping a projection while commands keep coming.
my $unlucky6 = sql(q{SELECT n FROM bank.unlucky WHERE account_id = 'acc-6'});
sql(q{SELECT cqrs.drop_projection('unlucky')});
sql(q{SELECT cqrs.submit('DEPOSIT', 'acc-6', '{"amount": 13.13}')});
sql(q{SELECT cqrs.submit('DEPOSIT', 'acc-6', '{"amount": 1}')});
wait_projected($node);
is(sql(q{SELECT n FROM bank.unlucky WHERE account_id = 'acc-6'}), $unlucky6,
	'the projector no longer folds into a dropped projection\'s table');
is(sql(q{SELECT count(*) FROM cqrs.dead_letter WHERE projection = 'unlucky'}), '0',
	'a dropped projection takes its dead letters along');
is(sql(q{SELECT state FROM cqrs.status}), 'running', 'the projector goes on without it');
compare_accounts('after a drop');

$node->stop;
done_testing();
