# OpenTelemetry spans.  From SQL (cqrs.spans()), whatever the build: which
# commands are traced (a sampled traceparent always, an unsampled one
# never, none by cqrs.trace_sample_ratio), the command, batch, apply and
# Redis spans with their parents, links and attributes, errors, and the
# ring dropping its oldest spans when full.  Then, built with libcurl,
# the export to an OTLP/HTTP receiver this test starts on 127.0.0.1: what
# arrives, and a receiver that hangs or is gone costing spans (counted)
# but no command and no projection.  Built without libcurl, the endpoint
# setting is refused.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use CqrsTest;
use IO::Socket::INET;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);

# A database in LATIN1, not UTF-8: spans keep its characters, and the
# projector, which ends its spans outside a transaction, converts nothing.
# The test talks UTF-8 to it.
$ENV{PGCLIENTENCODING} = 'UTF8';
my $node = cqrs_node('tracing', initdb => [ '--encoding=LATIN1', '--locale=C' ],
	conf => qq{
cqrs.trace_max_spans = 64
cqrs.otel_naptime = '100ms'
cqrs.otel_timeout = '500ms'
});
sub sql { return $node->safe_psql('postgres', $_[0]); }

sub metric
{
	return sql(qq{SELECT value FROM cqrs.metrics() WHERE name = '$_[0]'});
}

my $trace = '4bf92f3577b34da6a3ce929d0e0e4736';
my $client_span = '00f067aa0ba902b7';

# Submit one order in its own transaction under a traceparent (undef:
# none); returns its command_id.
sub submit
{
	my ($id, $traceparent, $amount) = @_;
	my $set = defined $traceparent ? "SET LOCAL cqrs.traceparent = '$traceparent';" : '';
	return sql(qq{BEGIN; $set SELECT command_id FROM cqrs.submit_order('$id', 'u-$id', ${\($amount // 5)}); COMMIT;});
}

# The spans waiting, as hashes, taken out of the ring.
sub take_spans
{
	my $rows = sql(q{SELECT json_agg(s ORDER BY start_time, name) FROM cqrs.spans(true) s});
	return $rows eq '' ? [] : decode_json($rows);
}

sub by_name
{
	my ($spans, $name) = @_;
	return grep { $_->{name} eq $name } @$spans;
}

# --- which commands are traced

take_spans();
submit('untraced-1', "00-$trace-$client_span-00");
submit('untraced-2', undef);
wait_projected($node);
is(scalar @{ take_spans() }, 0,
	'an unsampled traceparent, or none with cqrs.trace_sample_ratio 0: no spans');

my $cid = submit('traced-1', "00-$trace-$client_span-01");
wait_projected($node);
my $spans = take_spans();
my ($command) = by_name($spans, 'cqrs.command');
my ($batch) = by_name($spans, 'cqrs.batch');
my ($apply) = by_name($spans, 'cqrs.apply');
ok($command && $batch && $apply, 'a sampled traceparent: a command, a batch and an apply span')
  or diag explain $spans;
is($command->{trace_id}, $trace, 'the command span is in the client\'s trace');
is($command->{parent_span_id}, $client_span, 'as a child of the client\'s span');
is($command->{kind}, 'server', 'of kind server');
is_deeply(
	{ map { $_ => $command->{attributes}{$_} } qw(db.system db.namespace db.operation.name
		  cqrs.command_id cqrs.aggregate_id cqrs.command_type cqrs.sequence_id enduser.id) },
	{ 'db.system' => 'postgresql', 'db.namespace' => 'postgres',
	  'db.operation.name' => 'submit_order', 'cqrs.command_id' => $cid,
	  'cqrs.aggregate_id' => 'traced-1', 'cqrs.command_type' => 'CREATE_ORDER',
	  'cqrs.sequence_id' => 1, 'enduser.id' => scalar(getpwuid($<)) },
	'with the command\'s attributes');
is($batch->{trace_id}, $trace, 'the batch span is in the same trace');
is($batch->{parent_span_id}, $command->{span_id}, 'as a child of the command span');
is_deeply($batch->{links}, [ { trace_id => $trace, span_id => $command->{span_id} } ],
	'linked to the command it applied');
ok($batch->{attributes}{'cqrs.batch_id'} && $batch->{attributes}{'cqrs.batch.size'} >= 1
	  && $batch->{attributes}{'cqrs.lsn_end'} eq $batch->{attributes}{'cqrs.batch_id'},
	'with its id, size and LSN range') or diag explain $batch;
is($apply->{parent_span_id}, $command->{span_id}, 'the apply span is a child of the command span');
is($apply->{links}[0]{span_id}, $batch->{span_id}, 'linked to its batch');
is($apply->{attributes}{'cqrs.batch_id'}, $batch->{attributes}{'cqrs.batch_id'},
	'with the batch id');
ok($command->{end_time} le $batch->{end_time}, 'the batch ends after the command');

# a refused command: its span says why, and nothing is projected
my ($ret, $out, $err) = $node->psql('postgres', qq{
	SET cqrs.traceparent = '00-$trace-$client_span-01';
	SELECT cqrs.submit_order('refused-1', 'u', -1)});
isnt($ret, 0, 'a negative amount is refused');
$spans = take_spans();
($command) = by_name($spans, 'cqrs.command');
is($command->{status}, 'error', 'its span has status error');
is($command->{attributes}{'error.type'}, '22023', 'with the SQLSTATE');
like($command->{attributes}{'status.message'}, qr/amount/, 'and the message');

# what became of a command: its apply span says
sql(q{SELECT cqrs.submit_order('fate-1', 'u', 1); SELECT cqrs.cancel_order('fate-1')});
my $dead = sql(qq{BEGIN; SET LOCAL cqrs.traceparent = '00-$trace-$client_span-01';
	SELECT command_id FROM cqrs.ship_order('fate-1'); COMMIT;});
my $parked = sql(qq{BEGIN; SET LOCAL cqrs.traceparent = '00-$trace-$client_span-01';
	SELECT command_id FROM cqrs.ship_order('fate-2', sequence_id => 3); COMMIT;});
$cid = submit('fate-3', "00-$trace-$client_span-01");
wait_projected($node);
my %fate = map { $_->{attributes}{'cqrs.command_id'} => $_ } by_name(take_spans(), 'cqrs.apply');
is($fate{$cid}{attributes}{'cqrs.outcome'}, 'applied', 'an applied command\'s apply span says applied');
is($fate{$parked}{attributes}{'cqrs.outcome'}, 'parked', 'a parked one\'s says parked');
is($fate{$dead}{attributes}{'cqrs.outcome'}, 'dead_lettered', 'a dead-lettered one\'s says dead_lettered');
is($fate{$dead}{status}, 'error', 'with status error');
is($fate{$dead}{attributes}{'status.message'},
	sql(qq{SELECT reason FROM cqrs.dead_letter WHERE command_id = '$dead'}), 'and the reason');

# a character outside ASCII, in the LATIN1 database
submit("caf\xc3\xa9-1", "00-$trace-$client_span-01");
wait_projected($node);
my @accented = grep { ($_->{attributes}{'cqrs.aggregate_id'} // '') eq "caf\x{e9}-1" } @{ take_spans() };
is(scalar @accented, 2, 'in a LATIN1 database the command and apply spans keep the aggregate id as it is');

# without a traceparent, by ratio: the trace is the command's own
sql(q{ALTER SYSTEM SET cqrs.trace_sample_ratio = 1; SELECT pg_reload_conf()});
$node->poll_query_until('postgres', q{SELECT current_setting('cqrs.trace_sample_ratio') = '1'});
$cid = submit('sampled-1', undef);
wait_projected($node);
$spans = take_spans();
($command) = by_name($spans, 'cqrs.command');
(my $cid_hex = $cid) =~ s/-//g;
is($command->{trace_id}, $cid_hex, 'cqrs.trace_sample_ratio 1: a trace whose id is the command_id');
ok(!defined $command->{parent_span_id}, 'rooted at the command span');
ok(by_name($spans, 'cqrs.apply'), 'and projected in it');
sql(q{ALTER SYSTEM RESET cqrs.trace_sample_ratio; SELECT pg_reload_conf()});
$node->poll_query_until('postgres', q{SELECT current_setting('cqrs.trace_sample_ratio') = '0'});

# a full ring drops its oldest spans, counted; commands go on
my $dropped = metric('cqrs_spans_dropped_total');
sql(qq{SET cqrs.traceparent = '00-$trace-$client_span-01';
	SELECT cqrs.submit_order('many-' || i, 'u', 1) FROM generate_series(1, 100) i});
wait_projected($node);
is(sql('SELECT count(*) FROM cqrs.spans()'), '64', 'the ring keeps cqrs.trace_max_spans spans');
cmp_ok(metric('cqrs_spans_dropped_total') - $dropped, '>=', 100 + 100 + 1 - 64,
	'and counts the ones it dropped');
is(sql(q{SELECT count(*) FROM cqrs.read_model WHERE order_id LIKE 'many-%'}), '100',
	'every command was projected');
take_spans();

# --- Redis: the write-through span, a child of the batch span

my $rport = PostgreSQL::Test::Cluster::get_free_port();
my $rdir = PostgreSQL::Test::Utils::tempdir();
if (sql('SELECT redis FROM cqrs.status') ne 'unavailable')
{
	system('redis-server', '--port', $rport, '--bind', '127.0.0.1', '--save', '',
		'--appendonly', 'no', '--daemonize', 'yes', '--pidfile', "$rdir/redis.pid",
		'--dir', $rdir, '--logfile', "$rdir/redis.log") == 0
	  or die "could not start redis-server";
	sql(qq{ALTER SYSTEM SET cqrs.redis_url = 'redis://127.0.0.1:$rport/0'; SELECT pg_reload_conf()});
	$node->poll_query_until('postgres', q{SELECT redis = 'connected' FROM cqrs.status})
	  or die 'Redis did not connect';
	submit('redis-1', "00-$trace-$client_span-01");
	wait_projected($node);
	$spans = take_spans();
	($batch) = by_name($spans, 'cqrs.batch');
	my ($redis) = by_name($spans, 'cqrs.redis');
	ok($redis, 'with Redis: a cqrs.redis span') or diag explain $spans;
	is($redis->{parent_span_id}, $batch->{span_id}, 'a child of the batch span');
	is($redis->{attributes}{'db.system'}, 'redis', 'db.system redis');
	is($redis->{attributes}{'cqrs.redis.keys'}, 1, 'with the keys it wrote');
	sql(q{ALTER SYSTEM RESET cqrs.redis_url; SELECT pg_reload_conf()});
	kill 'KILL', slurp_file("$rdir/redis.pid") + 0;
}

# --- export over OTLP/HTTP

($ret, $out, $err) = $node->psql('postgres',
	q{ALTER SYSTEM SET cqrs.otel_endpoint = 'http://127.0.0.1:1/v1/traces'});
if ($ret != 0)
{
	like($err, qr/built without libcurl/, 'built without libcurl: cqrs.otel_endpoint is refused');
	$node->stop;
	done_testing();
	exit;
}

# A tiny OTLP/HTTP receiver: it appends each request (request line,
# content type, body) as a JSON line to $dir/received and answers as
# $dir/mode says: "ok" (200), "hang" (never), "error" (503).
my $dir = PostgreSQL::Test::Utils::tempdir();
my $port = PostgreSQL::Test::Cluster::get_free_port();
sub mode { open my $f, '>', "$dir/mode" or die; print $f $_[0]; close $f; }
mode('ok');
my $listener = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $port,
	Listen => 16, ReuseAddr => 1, Proto => 'tcp') or die "cannot listen: $!";
my $receiver = fork();
die "fork: $!" unless defined $receiver;
if ($receiver == 0)
{
	while (my $c = $listener->accept)
	{
		my ($line, %h) = (scalar <$c>);
		while (my $l = <$c>)
		{
			$l =~ s/\r?\n$//;
			last if $l eq '';
			$h{ lc $1 } = $2 if $l =~ /^([^:]+):\s*(.*)$/;
		}
		my $body = '';
		read($c, $body, $h{'content-length'} // 0);
		my $mode = slurp_file("$dir/mode");
		open my $f, '>>', "$dir/received" or die;
		print $f encode_json({ request => ($line =~ s/\r?\n$//r), type => $h{'content-type'},
			body => $body, mode => $mode }), "\n";
		close $f;
		if ($mode eq 'hang')
		{
			# answer nothing until the mode changes (10 s at most)
			for (1 .. 100)
			{
				last if slurp_file("$dir/mode") ne 'hang';
				usleep(100_000);
			}
			close $c;
			next;
		}
		my $status = $mode eq 'ok' ? '200 OK' : '503 Service Unavailable';
		print $c "HTTP/1.1 $status\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
		close $c;
	}
	exit 0;
}
close $listener;
END { kill 'KILL', $receiver if $receiver; }

sub received
{
	return [] unless -e "$dir/received";
	return [ map { decode_json($_) } grep { length } split /\n/, slurp_file("$dir/received") ];
}

sql(qq{ALTER SYSTEM SET cqrs.otel_endpoint = 'http://127.0.0.1:$port/v1/traces'; SELECT pg_reload_conf()});
$node->poll_query_until('postgres', q{SELECT setting <> '' FROM pg_settings WHERE name = 'cqrs.otel_endpoint'});
$cid = submit('exported-1', "00-$trace-$client_span-01");
wait_projected($node);
my @otlp;
my $deadline = time + 10;
while (time < $deadline)
{
	@otlp = map {
		my $r = decode_json($_->{body});
		map { @{ $_->{scopeSpans}[0]{spans} } } @{ $r->{resourceSpans} }
	} grep { $_->{mode} eq 'ok' } @{ received() };
	last if grep { $_->{name} eq 'cqrs.apply' } @otlp;
	usleep(100_000);
}
my $req = received()->[0];
is($req->{request}, 'POST /v1/traces HTTP/1.1', 'the exporter posts to the endpoint');
is($req->{type}, 'application/json', 'OTLP/JSON');
is(decode_json($req->{body})->{resourceSpans}[0]{resource}{attributes}[0]{value}{stringValue},
	'cqrs', 'with service.name cqrs');
($command) = grep { $_->{name} eq 'cqrs.command' } @otlp;
($batch) = grep { $_->{name} eq 'cqrs.batch' } @otlp;
($apply) = grep { $_->{name} eq 'cqrs.apply' } @otlp;
ok($command && $batch && $apply, 'the command, batch and apply spans arrive') or diag explain \@otlp;
is($command->{traceId}, $trace, 'the command span in the client\'s trace');
is($command->{parentSpanId}, $client_span, 'a child of the client\'s span');
is($command->{kind}, 2, 'SPAN_KIND_SERVER');
my %attr = map { $_->{key} => $_->{value} } @{ $command->{attributes} };
is($attr{'cqrs.command_id'}{stringValue}, $cid, 'cqrs.command_id');
is($attr{'cqrs.sequence_id'}{intValue}, '1', 'cqrs.sequence_id as an OTLP intValue');
is($batch->{traceId}, $trace, 'the batch span in the same trace');
is($batch->{parentSpanId}, $command->{spanId}, 'a child of the command span');
is($batch->{links}[0]{spanId}, $command->{spanId}, 'linked to the command');
is($apply->{parentSpanId}, $command->{spanId}, 'the apply span a child of the command span');
cmp_ok($command->{startTimeUnixNano}, '<=', $command->{endTimeUnixNano}, 'times in order');
cmp_ok(abs($command->{startTimeUnixNano} / 1e9 - time), '<', 60, 'in Unix nanoseconds');
ok($node->poll_query_until('postgres',
	q{SELECT value >= 3 FROM cqrs.metrics() WHERE name = 'cqrs_spans_exported_total'}),
	'cqrs_spans_exported_total counts them');
submit("caf\xc3\xa9-2", "00-$trace-$client_span-01");
my @exported_accent;
$deadline = time + 10;
until (@exported_accent || time > $deadline)
{
	usleep(100_000);
	@exported_accent = grep { $_->{key} eq 'cqrs.aggregate_id' && $_->{value}{stringValue} eq 'caf?-2' }
	  map { @{ $_->{attributes} } }
	  map { map { @{ $_->{scopeSpans}[0]{spans} } } @{ decode_json($_->{body})->{resourceSpans} } }
	  grep { $_->{mode} eq 'ok' } @{ received() };
}
ok(@exported_accent, 'exported from the LATIN1 database as valid JSON, the non-ASCII byte as ?');

# A receiver that answers 503: the request's spans are counted as failed
# and the server log says why.
mode('error');
my $failed = metric('cqrs_spans_failed_total');
submit('error-1', "00-$trace-$client_span-01");
ok($node->poll_query_until('postgres',
	qq{SELECT value > $failed FROM cqrs.metrics() WHERE name = 'cqrs_spans_failed_total'}),
	'a 503 counts the request\'s spans as failed');
like(slurp_file($node->logfile),
	qr/cqrs could not export spans to the collector \(cqrs.otel_endpoint\): HTTP status 503/,
	'and the server log says so, without the URL');

# A receiver that hangs: spans fail after cqrs.otel_timeout (here 2 s),
# counted; each command is projected within 1 s all the same, so neither
# the command nor the projector waits for the exporter.
mode('hang');
sql(q{ALTER SYSTEM SET cqrs.otel_timeout = '2s'; SELECT pg_reload_conf()});
$failed = metric('cqrs_spans_failed_total');
my $waited = '';
for my $i (1 .. 5)
{
	my $id = submit("hang-$i", "00-$trace-$client_span-01");
	$waited .= sql(qq{SELECT cqrs.wait_for('$id', '1 s')});
	usleep(300_000);
}
is($waited, 'ttttt', 'with the receiver hanging, each traced command is projected within 1 s');
ok($node->poll_query_until('postgres',
	qq{SELECT value > $failed FROM cqrs.metrics() WHERE name = 'cqrs_spans_failed_total'}),
	'spans of requests that time out are counted as failed');
sql(q{ALTER SYSTEM RESET cqrs.otel_timeout; SELECT pg_reload_conf()});

# No receiver at all.
kill 'KILL', $receiver;
waitpid($receiver, 0);
$receiver = undef;
$failed = metric('cqrs_spans_failed_total');
$waited = '';
for my $i (1 .. 5)
{
	my $id = submit("gone-$i", "00-$trace-$client_span-01");
	$waited .= sql(qq{SELECT cqrs.wait_for('$id', '1 s')});
}
is($waited, 'ttttt', 'with no receiver, each traced command is projected within 1 s');
ok($node->poll_query_until('postgres',
	qq{SELECT value > $failed FROM cqrs.metrics() WHERE name = 'cqrs_spans_failed_total'}),
	'spans sent to no receiver are counted as failed');
is(sql(q{SELECT count(*) FROM cqrs.read_model WHERE order_id LIKE 'hang-%' OR order_id LIKE 'gone-%' OR order_id LIKE 'error-%'}),
	'11', 'no command was lost meanwhile');

$node->stop;
done_testing();
