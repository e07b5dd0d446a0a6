# CqrsTest.pm: helpers shared by the cqrs TAP suites.
#
# expected_model() folds the command log in Perl, independently of both
# the projector (C) and cqrs.verify() (SQL), and compare_model() checks the
# read model, the dead letters and the parked commands against that fold.
package CqrsTest;

use strict;
use warnings;
use Exporter 'import';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes;

our @EXPORT = qw(cqrs_node wait_projected expected_model compare_model
  start_load finish_load declare_accounts audit_load written_twice);

# A started node with cqrs preloaded and the extension created; options:
# conf (postgresql.conf lines), initdb (extra initdb arguments).
sub cqrs_node
{
	my ($name, %opts) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(allows_streaming => 'logical', extra => $opts{initdb} // []);
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'cqrs'
max_worker_processes = 16
cqrs.poll_interval = '200ms'
});
	$node->append_conf('postgresql.conf', $opts{conf}) if $opts{conf};
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION cqrs');
	$node->poll_query_until('postgres',
		"SELECT state = 'running' FROM cqrs.status")
	  or die "the projector did not start";
	return $node;
}

# Wait until everything committed so far is in the read model.  Dies at
# once when the server is gone (a crashed projector with
# restart_after_crash off), rather than retrying until the timeout.
sub wait_projected
{
	my ($node) = @_;
	my $lsn = $node->safe_psql('postgres', 'SELECT pg_current_wal_flush_lsn()');
	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	while (time < $deadline)
	{
		return $lsn if $node->safe_psql('postgres',
			"SELECT applied_lsn >= '$lsn' AND state IN ('running', 'catching_up') FROM cqrs.status"
		) eq 't';
		Time::HiRes::sleep(0.1);
	}
	die "the projector did not reach $lsn: "
	  . $node->safe_psql('postgres', 'SELECT * FROM cqrs.status');
}

# Declare a domain the tests of backups and upgrades carry over: aggregate
# type "account", command type OPEN_ACCOUNT whose payload type bank.open
# and validator bank.check_open (refusing the holder "nobody") a restored
# or upgraded server must still find.
sub declare_accounts
{
	my ($node) = @_;
	$node->safe_psql('postgres', q{
		CREATE SCHEMA bank;
		CREATE TYPE bank.open AS (holder text);
		CREATE FUNCTION bank.check_open(aggregate_id text, payload jsonb) RETURNS void
			LANGUAGE plpgsql AS $$ BEGIN
				IF payload->>'holder' = 'nobody' THEN RAISE EXCEPTION 'no such holder'; END IF;
			END $$;
		SELECT cqrs.create_aggregate_type('account');
		SELECT cqrs.create_command_type('OPEN_ACCOUNT', 'account', true, 'bank.open',
			'bank.check_open(text, jsonb)');
	});
}

# Fold the log: { orders => {id => [user, amount, status, version]},
# dead => count, parked => count }.
sub expected_model
{
	my ($node) = @_;
	my $rows = $node->safe_psql('postgres', q{
		SELECT aggregate_id, sequence_id, command_type,
		       coalesce(jsonb_typeof(payload -> 'user_id'), '-'),
		       coalesce(payload ->> 'user_id', ''),
		       coalesce(jsonb_typeof(payload -> 'amount'), '-'),
		       coalesce(payload ->> 'amount', '')
		  FROM cqrs.command_log
		 WHERE command_type IN ('CREATE_ORDER', 'SHIP_ORDER', 'CANCEL_ORDER')
		 ORDER BY aggregate_id, sequence_id});
	my (%orders, %state);
	my ($dead, $parked) = (0, 0);
	foreach my $line (split /\n/, $rows)
	{
		my ($id, $seq, $type, $utype, $user, $atype, $amount) =
		  split /\|/, $line, -1;
		my $s = $state{$id} //= { version => 0, exists => 0, stuck => 0 };
		if ($s->{stuck} || $seq != $s->{version} + 1)
		{
			# waits for a predecessor that never came (or never applied)
			$s->{stuck} = 1;
			$parked++;
			next;
		}
		if (!$s->{exists})
		{
			if ($type eq 'CREATE_ORDER' && $utype eq 'string' && $atype eq 'number')
			{
				$s->{exists} = 1;
				$s->{version} = $seq;
				$orders{$id} = [ $user, $amount + 0, 'created', $seq ];
			}
			else
			{
				$dead++;
				$s->{stuck} = 1;    # its successors wait for sequence 1
			}
			next;
		}
		my $o = $orders{$id};
		if (($type eq 'SHIP_ORDER' || $type eq 'CANCEL_ORDER') && $o->[2] eq 'created')
		{
			$o->[2] = $type eq 'SHIP_ORDER' ? 'shipped' : 'cancelled';
		}
		else
		{
			$dead++;
		}
		$o->[3] = $seq;
		$s->{version} = $seq;
	}
	return { orders => \%orders, dead => $dead, parked => $parked };
}

# Check the read model, dead letters and parked commands against the fold.
sub compare_model
{
	my ($node, $name) = @_;
	my $expected = expected_model($node);
	my $rows = $node->safe_psql('postgres',
		'SELECT order_id, user_id, total_amount, status, version FROM cqrs.read_model');
	my %actual;
	foreach my $line (split /\n/, $rows)
	{
		my ($id, $user, $amount, $status, $version) = split /\|/, $line, -1;
		$actual{$id} = [ $user, $amount + 0, $status, $version ];
	}
	my @wrong;
	foreach my $id (sort keys %{ $expected->{orders} })
	{
		my $e = join ',', @{ $expected->{orders}{$id} };
		my $a = $actual{$id} ? join(',', @{ $actual{$id} }) : 'missing';
		push @wrong, "$id: expected $e, got $a" if $e ne $a;
	}
	foreach my $id (sort keys %actual)
	{
		push @wrong, "$id: in the read model, not in the fold"
		  unless $expected->{orders}{$id};
	}
	is(scalar(@wrong), 0,
		"$name: read model equals the fold of the log ("
		  . scalar(keys %{ $expected->{orders} }) . " orders)")
	  or diag(join("\n", @wrong[ 0 .. ($#wrong < 9 ? $#wrong : 9) ]));
	is($node->safe_psql('postgres', 'SELECT count(*) FROM cqrs.dead_letter'),
		$expected->{dead}, "$name: dead letters are the fold's invalid commands");
	is($node->safe_psql('postgres', 'SELECT count(*) FROM cqrs.parked'),
		$expected->{parked}, "$name: parked commands are the fold's waiting ones");
	is($node->safe_psql('postgres', 'SELECT count(*) FROM cqrs.verify()'),
		'0', "$name: cqrs.verify() finds nothing");
	return $expected;
}

# Start pgbench with a script in the background; returns a handle.
sub start_load
{
	my ($node, $script, $clients, $seconds, @extra) = @_;
	my $file = $node->basedir . "/load_" . int(rand(1e9)) . ".sql";
	open my $fh, '>', $file or die $!;
	print $fh $script;
	close $fh;
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[
			'pgbench', '-n', '-c', $clients, '-j', $clients, '-T', $seconds,
			'-f', $file, @extra, '-h', $node->host, '-p', $node->port, 'postgres'
		],
		'>', \$out, '2>', \$err);
	return { h => $h, out => \$out, err => \$err };
}

# Wait for a background pgbench; returns its output.
sub finish_load
{
	my ($load) = @_;
	$load->{h}->finish;
	return ${ $load->{out} } . ${ $load->{err} };
}

# For crash and failover tests: table audit, filled by a trigger with
# every (order_id, version) the read model is written with, and
# random_command(o, k), which submits (k = 1), ships (2) or cancels (3)
# order 'o' || o, taking refusals of commands that do not apply as part
# of the mix.
sub audit_load
{
	my ($node) = @_;
	$node->safe_psql('postgres', q{
CREATE TABLE audit (order_id text, version bigint);
CREATE FUNCTION audit_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO audit VALUES (NEW.order_id, NEW.version);
	RETURN NULL;
END $$;
CREATE TRIGGER audit AFTER INSERT OR UPDATE ON cqrs.read_model
	FOR EACH ROW EXECUTE FUNCTION audit_write();
CREATE FUNCTION random_command(o int, k int) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	IF k = 1 THEN
		PERFORM cqrs.submit_order('o' || o, 'u' || (o % 31), o % 500 + 1);
	ELSIF k = 2 THEN
		PERFORM cqrs.ship_order('o' || o);
	ELSE
		PERFORM cqrs.cancel_order('o' || o);
	END IF;
EXCEPTION WHEN unique_violation OR foreign_key_violation THEN
	NULL;
END $$;
});
}

# How many (order_id, version) the audit saw written more than once.
sub written_twice
{
	my ($node) = @_;
	return $node->safe_psql('postgres',
		'SELECT count(*) FROM (SELECT FROM audit GROUP BY order_id, version HAVING count(*) > 1) d');
}

1;
