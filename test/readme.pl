#!/usr/bin/perl
# test/readme.pl: run the README's examples, in order, and compare what
# they print with what the README shows.  Called by test/readme.sh, which
# starts a fresh demo cluster first.
#
# Every ```sql and ```sh block of the README is an example.  An HTML
# comment on the line before a block, invisible when the README is
# rendered, can say how to run it:
#
#   <!-- doctest: skip: REASON -->        not run (say why)
#   <!-- doctest: user=NAME vary=a,b mask=REGEX -->
#
# user: the role psql connects as (default postgres); vary: result columns
# whose values differ from run to run (only checked to be present in both);
# mask: a Perl regex whose matches are replaced by "*" in both outputs.
#
# A sql block whose lines start with "=> " is a psql session: each
# statement after a prompt (up to its ";" or a backslash command ending in
# \g...) runs in one psql process for the whole block, and the lines after
# it up to the next prompt are its output, as psql prints it without
# footers.  Without prompts, the block is one script that must run without
# error.  A sh block runs with bash from the top of the tree and must exit
# with 0; lines starting with "$ " are commands whose output follows them.
#
# Prints one line per example and closes with "All N tests passed." or
# "F of N tests failed.", as pg_regress does.
use strict;
use warnings;

my $readme = shift // 'README.md';
my $psql = $ENV{CQRS_PSQL} or die "CQRS_PSQL is not set\n";
my @as_pg = split ' ', ($ENV{CQRS_AS_PG} // '');
my $host = $ENV{CQRS_DEMO_DIR} // '/tmp/cqrs-demo';
my $port = $ENV{CQRS_DEMO_PORT} // '54320';
my $verbose = $ENV{CQRS_README_VERBOSE};

open my $fh, '<', $readme or die "$readme: $!\n";
my @lines = <$fh>;
close $fh;
chomp @lines;

# The blocks, with their annotations.
my @blocks;
my $note;
for (my $i = 0; $i < @lines; $i++)
{
	if ($lines[$i] =~ /^<!-- doctest: (.*) -->$/)
	{
		$note = $1;
		next;
	}
	if ($lines[$i] =~ /^```(\S*)\s*$/)
	{
		my ($lang, $start) = ($1, $i + 1);
		my @body;
		$i++;
		while ($i < @lines && $lines[$i] !~ /^```\s*$/)
		{
			push @body, $lines[$i++];
		}
		die "$readme:$start: block not closed\n" if $i >= @lines;
		push @blocks, { lang => $lang, line => $start, body => \@body,
			note => $note // '' }
		  if $lang eq 'sql' || $lang eq 'sh';
		$note = undef;
		next;
	}
	$note = undef if $lines[$i] =~ /\S/;
}

my ($passed, $failed) = (0, 0);

sub result
{
	my ($ok, $what, $detail) = @_;
	if ($ok) { $passed++; print "ok - $what\n"; }
	else
	{
		$failed++;
		print "not ok - $what\n";
		print map { "#   $_\n" } split /\n/, $detail // '';
	}
}

sub options
{
	my ($note) = @_;
	my %o = (user => 'postgres', vary => {}, mask => []);
	for my $word (split ' ', $note)
	{
		if ($word =~ /^user=(\S+)$/) { $o{user} = $1 }
		elsif ($word =~ /^vary=(\S+)$/) { $o{vary}{$_} = 1 for split /,/, $1 }
		elsif ($word =~ /^mask=(\S+)$/) { push @{ $o{mask} }, $1 }
		else { die "unknown doctest option \"$word\"\n" }
	}
	return \%o;
}

# Is this SQL statement complete (ends with ";" outside a trailing
# comment, or is a backslash command)?
sub complete
{
	my ($sql) = @_;
	my $last = (split /\n/, $sql)[-1];
	return 1 if $last =~ /\\g\w*(\s+\S+)*\s*$/ || $sql =~ /^\\/;
	$last =~ s/\s+--\s.*$//;
	return $last =~ /;\s*$/;
}

# psql's aligned output as comparable lines: table rows become their
# trimmed cells joined by " | ", with the cells of "vary" columns replaced
# by "*" when present; other lines lose trailing blanks.
sub normalize
{
	my ($text, $o) = @_;
	my @in = split /\n/, $text, -1;
	pop @in while @in && $in[-1] !~ /\S/;
	for my $re (@{ $o->{mask} })
	{
		s/$re/*/g for @in;
	}
	my @out;
	for (my $i = 0; $i < @in; $i++)
	{
		if ($i + 1 < @in && $in[$i + 1] =~ /^-+(\+-+)*$/)
		{
			# a table: column bounds from the separator line
			my @bounds;
			my $sep = $in[$i + 1];
			my $from = 0;
			while ($sep =~ /\+/g)
			{
				push @bounds, [ $from, pos($sep) - 1 - $from ];
				$from = pos($sep);
			}
			push @bounds, [ $from, length($sep) - $from ];
			my $cells = sub {
				my ($line) = @_;
				return map {
					my $c = length($line) > $_->[0] ? substr($line, $_->[0], $_->[1]) : '';
					$c =~ s/^\s+|\s+$//g;
					$c
				} @bounds;
			};
			my @names = $cells->($in[$i]);
			push @out, join ' | ', @names;
			$i += 2;
			while ($i < @in && $in[$i] =~ /\S/)
			{
				my @c = $cells->($in[$i]);
				for my $k (0 .. $#c)
				{
					$c[$k] = '*' if $o->{vary}{ $names[$k] // '' } && $c[$k] ne '';
				}
				push @out, join ' | ', @c;
				$i++;
			}
			push @out, '' if $i < @in;
			next;
		}
		(my $l = $in[$i]) =~ s/\s+$//;
		push @out, $l;
	}
	return join "\n", @out;
}

sub run_capture
{
	my ($input, @cmd) = @_;
	my $in = "/tmp/cqrs-readme.$$.in";
	open my $w, '>', $in or die "$in: $!";
	print $w $input;
	close $w;
	chmod 0644, $in;
	my $q = join ' ', map { my $s = $_; $s =~ s/'/'\\''/g; "'$s'" } @cmd;
	my $out = `$q < $in 2>&1`;
	my $status = $?;
	unlink $in;
	return ($out, $status);
}

sub run_sql
{
	my ($b, $o) = @_;
	my @body = @{ $b->{body} };
	my @psql = (@as_pg, 'stdbuf', '-o0', '-e0', $psql, '-X', '-q',
		'-h', $host, '-p', $port, '-U', $o->{user}, '-d', 'postgres',
		'-P', 'footer=off');

	unless (grep { /^=> / } @body)
	{
		my ($out, $status) = run_capture(join("\n", @body) . "\n",
			@psql, '-v', 'ON_ERROR_STOP=1');
		result($status == 0 && $out !~ /ERROR:/,
			"README line $b->{line}: SQL script", $out);
		return;
	}

	# a session: statements and the output shown after each
	my @stmts;
	my $open = 0;
	for my $l (@body)
	{
		if ($l =~ /^=> (.*)$/)
		{
			push @stmts, { sql => $1, expected => [] };
			$open = !complete($1);
		}
		elsif ($open)
		{
			$stmts[-1]{sql} .= "\n$l";
			$open = !complete($stmts[-1]{sql});
		}
		elsif (@stmts) { push @{ $stmts[-1]{expected} }, $l }
		elsif ($l =~ /\S/ && $l !~ /^--/)
		{
			die "$readme:$b->{line}: text before the first prompt: $l\n";
		}
	}
	my $script = '';
	for my $k (0 .. $#stmts)
	{
		$script .= "\\echo '\@\@ $k'\n$stmts[$k]{sql}\n";
	}
	$script .= "\\echo '\@\@ end'\n";
	my ($out) = run_capture($script, @psql, '-v', 'ON_ERROR_STOP=0');
	$out =~ s/^psql:[^:\n]*:\d+: //mg;
	my @parts = split /^\@\@ (\d+|end)\n/m, $out, -1;
	shift @parts;
	my %got = @parts;
	for my $k (0 .. $#stmts)
	{
		my $s = $stmts[$k];
		my $what = "README line $b->{line}: " . (split /\n/, $s->{sql})[0];
		my $actual = $got{$k} // '(no output: psql stopped)';
		my $shown = join "\n", @{ $s->{expected} };
		if ($shown !~ /\S/)
		{
			result($actual !~ /^(ERROR|FATAL|WARNING):/m, $what, $actual);
			next;
		}
		my ($e, $a) = (normalize($shown, $o), normalize($actual, $o));
		result($e eq $a, $what,
			"shown:\n$shown\nprinted:\n$actual" . ($verbose ? "\nas compared:\n$e\n---\n$a" : ''));
	}
}

sub run_sh
{
	my ($b, $o) = @_;
	my @body = @{ $b->{body} };
	unless (grep { /^\$ / } @body)
	{
		my ($out, $status) = run_capture('', 'bash', '-euo', 'pipefail', '-c',
			join("\n", @body));
		result($status == 0, "README line $b->{line}: shell", $out);
		return;
	}
	my @cmds;
	for my $l (@body)
	{
		if ($l =~ /^\$ (.*)$/) { push @cmds, { cmd => $1, expected => [] } }
		elsif (@cmds) { push @{ $cmds[-1]{expected} }, $l }
	}
	for my $c (@cmds)
	{
		my ($out, $status) = run_capture('', 'bash', '-o', 'pipefail', '-c', $c->{cmd});
		my $shown = join "\n", @{ $c->{expected} };
		my $ok = $status == 0
		  && ($shown !~ /\S/ || normalize($shown, $o) eq normalize($out, $o));
		result($ok, "README line $b->{line}: \$ $c->{cmd}",
			"exit status " . ($status >> 8) . "\nshown:\n$shown\nprinted:\n$out");
	}
}

for my $b (@blocks)
{
	if ($b->{note} =~ /^skip:\s*\S/)
	{
		print "skip - README line $b->{line}: $b->{note}\n";
		next;
	}
	my $o = options($b->{note});
	if ($b->{lang} eq 'sql') { run_sql($b, $o) }
	else { run_sh($b, $o) }
}

my $total = $passed + $failed;
if ($failed) { print "$failed of $total tests failed.\n" }
else { print "All $total tests passed.\n" }
exit($failed ? 1 : 0);
