/*-------------------------------------------------------------------------
 *
 * trace.c
 *		OpenTelemetry spans of the command path and of the projector:
 *		which commands are traced, the spans, the ring in shared memory
 *		they wait in, and cqrs.spans(), which reads them from SQL.
 *
 * A command is traced when the W3C trace context it is submitted with
 * (cqrs.traceparent) is sampled: a sampled parent is always followed.
 * Without one, it is traced with probability cqrs.trace_sample_ratio, as
 * the root of a trace whose id is its command_id.  Both decisions are
 * made from what the log row holds (the traceparent and the command_id),
 * so the projector, which sees only the row, decides the same way and
 * finds the command's span: the span id of a command (and of its apply)
 * is derived from its command_id.
 *
 * Spans:
 *   cqrs.command  validation and append, a child of the client's span;
 *   cqrs.batch    one projector batch, in the trace of its first traced
 *                 command (a child of that command's span), linked to the
 *                 spans of the traced commands it applied (at most
 *                 CQRS_SPAN_LINKS);
 *   cqrs.apply    a traced command's part of the batch, a child of the
 *                 command's span, linked to the batch span;
 *   cqrs.redis    the batch's Redis write-through, a child of the batch.
 *
 * Finished spans go to a ring of cqrs.trace_max_spans spans in shared
 * memory.  Writing one is a copy under a spinlock; when the ring is full
 * the oldest span is dropped and counted, so nothing that writes spans
 * ever waits for the exporter (otel.c) or for a reader of cqrs.spans().
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "common/pg_prng.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "cqrs.h"

PG_FUNCTION_INFO_V1(spans);

int			cqrs_trace_max_spans = 4096;
double		cqrs_trace_sample_ratio = 0;

typedef struct CqrsTraceRing
{
	slock_t		mutex;
	uint64		head;			/* spans written since the server started */
	uint64		tail;			/* of them, taken or dropped */
	uint64		dropped;		/* overwritten before anyone took them */
	uint64		exported;		/* accepted by the collector */
	uint64		failed;			/* taken for a request that failed */
	uint64		ntaken;			/* between tail and head, read with consume */
	Latch	   *exporter_latch; /* set when the ring is half full */
	int			size;
	CqrsSpan	spans[FLEXIBLE_ARRAY_MEMBER];
} CqrsTraceRing;

static CqrsTraceRing *ring = NULL;

static const char *const span_names[] = {
	[CQRS_SPAN_COMMAND] = "cqrs.command",
	[CQRS_SPAN_BATCH] = "cqrs.batch",
	[CQRS_SPAN_APPLY] = "cqrs.apply",
	[CQRS_SPAN_REDIS] = "cqrs.redis",
};

/* OTLP's SpanKind of each, and the name cqrs.spans() shows for it */
static const int span_otlp_kinds[] = {
	[CQRS_SPAN_COMMAND] = 2,	/* SERVER */
	[CQRS_SPAN_BATCH] = 5,		/* CONSUMER */
	[CQRS_SPAN_APPLY] = 1,		/* INTERNAL */
	[CQRS_SPAN_REDIS] = 3,		/* CLIENT */
};
static const char *const span_kind_names[] = {
	[CQRS_SPAN_COMMAND] = "server",
	[CQRS_SPAN_BATCH] = "consumer",
	[CQRS_SPAN_APPLY] = "internal",
	[CQRS_SPAN_REDIS] = "client",
};

Size
cqrs_trace_shmem_size(void)
{
	return add_size(offsetof(CqrsTraceRing, spans),
					mul_size(sizeof(CqrsSpan), cqrs_trace_max_spans));
}

void
cqrs_trace_shmem_startup(void)
{
	bool		found;

	ring = ShmemInitStruct("cqrs spans", cqrs_trace_shmem_size(), &found);
	if (!found)
	{
		memset(ring, 0, offsetof(CqrsTraceRing, spans));
		SpinLockInit(&ring->mutex);
		ring->size = cqrs_trace_max_spans;
	}
}

/*
 * Ids.  A hex digit pair per byte, lowercase, as W3C Trace Context and
 * OTLP/JSON write them.
 */
static void
trace_hex(char *dst, const uint8 *bytes, int n)
{
	static const char digits[] = "0123456789abcdef";

	for (int i = 0; i < n; i++)
	{
		dst[2 * i] = digits[bytes[i] >> 4];
		dst[2 * i + 1] = digits[bytes[i] & 0xf];
	}
	dst[2 * n] = '\0';
}

static int
trace_unhex_digit(char c)
{
	return (c >= '0' && c <= '9') ? c - '0' : c - 'a' + 10;
}

static void
trace_unhex(uint8 *dst, const char *src, int n)
{
	for (int i = 0; i < n; i++)
		dst[i] = (trace_unhex_digit(src[2 * i]) << 4) |
			trace_unhex_digit(src[2 * i + 1]);
}

static bool
trace_id_is_zero(const uint8 *id, int n)
{
	for (int i = 0; i < n; i++)
		if (id[i] != 0)
			return false;
	return true;
}

/* A span id derived from a command_id: "which" tells command from apply. */
static void
trace_derived_span_id(uint8 *dst, const pg_uuid_t *command_id, uint64 which)
{
	uint64		h = DatumGetUInt64(hash_bytes_extended(command_id->data,
													   UUID_LEN, which));

	if (h == 0)
		h = 1;
	memcpy(dst, &h, CQRS_SPAN_ID_LEN);
}

static void
trace_random_span_id(uint8 *dst)
{
	uint64		r;

	do
		r = pg_prng_uint64(&pg_global_prng_state);
	while (r == 0);
	memcpy(dst, &r, CQRS_SPAN_ID_LEN);
}

/*
 * Is a command with this traceparent (NULL or empty: none) and command_id
 * traced?  If so, fill in its trace id and the span id of its parent (all
 * zeros: it is a root).  The traceparent was checked when it was set
 * (cqrs.traceparent's check hook), so its fields are where they belong.
 */
bool
cqrs_trace_sampled(const char *traceparent, const pg_uuid_t *command_id,
				   uint8 *trace_id, uint8 *parent_id)
{
	if (ring == NULL)
		return false;
	if (traceparent != NULL && traceparent[0] != '\0')
	{
		/* version(2) - trace-id(32) - parent-id(16) - flags(2) */
		if (strlen(traceparent) < 55 ||
			(trace_unhex_digit(traceparent[54]) & 1) == 0)
			return false;
		trace_unhex(trace_id, traceparent + 3, CQRS_TRACE_ID_LEN);
		trace_unhex(parent_id, traceparent + 36, CQRS_SPAN_ID_LEN);
		return true;
	}
	if (cqrs_trace_sample_ratio <= 0 || command_id == NULL ||
		trace_id_is_zero(command_id->data, UUID_LEN))
		return false;
	if (cqrs_trace_sample_ratio < 1)
	{
		uint64		h = DatumGetUInt64(hash_bytes_extended(command_id->data,
														   UUID_LEN, 0));

		if ((double) h >= cqrs_trace_sample_ratio * 18446744073709551616.0)
			return false;
	}
	memcpy(trace_id, command_id->data, CQRS_TRACE_ID_LEN);
	memset(parent_id, 0, CQRS_SPAN_ID_LEN);
	return true;
}

/*
 * Could a command submitted now be traced (a sampled traceparent, or none
 * and a ratio)?  Cheap enough for every command: only then does the
 * command path read the clock and look up what its span names.
 */
bool
cqrs_trace_maybe(void)
{
	if (ring == NULL)
		return false;
	if (cqrs_traceparent != NULL && cqrs_traceparent[0] != '\0')
		return strlen(cqrs_traceparent) >= 55 &&
			(trace_unhex_digit(cqrs_traceparent[54]) & 1) != 0;
	return cqrs_trace_sample_ratio > 0;
}

/* Hand a finished span over: into the ring, dropping the oldest if full. */
static void
trace_emit(const CqrsSpan *span)
{
	Latch	   *wake = NULL;

	SpinLockAcquire(&ring->mutex);
	if (ring->head - ring->tail >= (uint64) ring->size)
	{
		if (ring->spans[ring->tail % ring->size].taken)
			ring->ntaken--;
		else
			ring->dropped++;
		ring->tail++;
	}
	memcpy(&ring->spans[ring->head % ring->size], span, sizeof(CqrsSpan));
	ring->head++;
	if (ring->head - ring->tail == (uint64) (ring->size + 1) / 2)
		wake = ring->exporter_latch;
	SpinLockRelease(&ring->mutex);
	if (wake != NULL)
		SetLatch(wake);
}

/*
 * Copy what fits of src into dst[size], cut at a character boundary.  Kept
 * in the database's encoding: converting needs the catalogs, and the
 * projector's spans end outside a transaction (see trace_json_string()).
 */
static void
trace_copy(char *dst, const char *src, int size)
{
	int			len = pg_mbcliplen(src, strlen(src), size - 1);

	memcpy(dst, src, len);
	dst[len] = '\0';
}

/*
 * A span's string as a JSON string.  OTLP/JSON is UTF-8: a span of a
 * database in another encoding has its non-ASCII bytes written as '?'
 * (the exporter has no database to convert with).
 */
static void
trace_json_string(StringInfo buf, const char *str, bool ascii)
{
	char	   *copy;

	if (!ascii)
	{
		escape_json(buf, str);
		return;
	}
	copy = pstrdup(str);
	for (char *c = copy; *c; c++)
		if (IS_HIGHBIT_SET(*c))
			*c = '?';
	escape_json(buf, copy);
	pfree(copy);
}

/*
 * A span of "kind" from start to now, in "database": the command's (read
 * in its transaction), or cqrs.database for the projector's spans, which
 * end outside a transaction.
 */
static void
trace_span_init(CqrsSpan *span, CqrsSpanKind kind, TimestampTz start,
				const char *database)
{
	memset(span, 0, sizeof(CqrsSpan));
	span->kind = kind;
	span->dbid = MyDatabaseId;
	span->encoding = GetDatabaseEncoding();
	span->start = start;
	span->end = GetCurrentTimestamp();
	if (database != NULL)
		trace_copy(span->database, database, NAMEDATALEN);
}

static void
trace_set_error(CqrsSpan *span, int sqlerrcode, const char *message)
{
	span->error = true;
	strlcpy(span->sqlstate, unpack_sql_state(sqlerrcode), sizeof(span->sqlstate));
	if (message != NULL)
		trace_copy(span->message, message, sizeof(span->message));
}

/*
 * The span of one command function call, from call->start to now.  Called
 * only when cqrs_trace_maybe() said so when the call began; the command
 * is traced if it is sampled.
 */
void
cqrs_trace_command(const CqrsTraceCommand *call)
{
	CqrsSpan	span;
	uint8		trace_id[CQRS_TRACE_ID_LEN];
	uint8		parent_id[CQRS_SPAN_ID_LEN];
	bool		have_id = call->command_id != NULL &&
		!trace_id_is_zero(call->command_id->data, UUID_LEN);

	if (!cqrs_trace_sampled(cqrs_traceparent, have_id ? call->command_id : NULL,
							trace_id, parent_id))
		return;
	trace_span_init(&span, CQRS_SPAN_COMMAND, call->start, call->database);
	memcpy(span.trace_id, trace_id, CQRS_TRACE_ID_LEN);
	memcpy(span.parent_id, parent_id, CQRS_SPAN_ID_LEN);
	/*
	 * The span the projector parents its own to; a retry of a command in
	 * the log, or a refused command, has another.
	 */
	if (have_id && !call->duplicate && call->edata == NULL)
		trace_derived_span_id(span.span_id, call->command_id, 1);
	else
		trace_random_span_id(span.span_id);
	if (have_id)
	{
		span.command_id = *call->command_id;
		span.has_command = true;
	}
	span.sequence_id = call->sequence_id;
	if (call->operation != NULL)
		trace_copy(span.operation, call->operation, NAMEDATALEN);
	if (call->user != NULL)
		trace_copy(span.user, call->user, NAMEDATALEN);
	if (call->command_type != NULL)
		trace_copy(span.command_type, call->command_type, NAMEDATALEN);
	if (call->aggregate_id != NULL)
		trace_copy(span.aggregate_id, call->aggregate_id, sizeof(span.aggregate_id));
	span.duplicate = call->duplicate;
	if (call->edata != NULL)
		trace_set_error(&span, call->edata->sqlerrcode, call->edata->message);
	trace_emit(&span);
}

/*
 * The projector's spans of one batch (or part of a large one): begin
 * before it is applied, redis_* around its Redis write-through, end once
 * it committed.  Only a batch with a traced command has spans.
 */
typedef enum TraceOutcome
{
	TRACE_APPLIED,
	TRACE_PARKED,
	TRACE_DEAD_LETTERED
} TraceOutcome;

static const char *const outcome_names[] = {
	[TRACE_APPLIED] = "applied",
	[TRACE_PARKED] = "parked",
	[TRACE_DEAD_LETTERED] = "dead_lettered",
};

/* A traced command of the batch: where, in which trace, what became of it. */
typedef struct TracedCommand
{
	int			index;			/* in the batch's records */
	uint8		trace_id[CQRS_TRACE_ID_LEN];
	uint8		outcome;		/* TraceOutcome, once read */
	char		reason[128];	/* of a dead letter */
} TracedCommand;

static struct
{
	bool		active;
	TimestampTz start;
	CqrsSpan	batch;
	TimestampTz redis_start;
	int			redis_keys;
	TracedCommand *traced;		/* in record order */
	int			ntraced;
	int			capacity;
	bool		outcomes;		/* their outcomes were read */
} tb;

/*
 * Before a batch (or part of a large one) is applied: which of its
 * records are traced.  Only a batch with a traced command has spans, and
 * only its traced commands are looked at again.
 */
void
cqrs_trace_batch_begin(CqrsRecord *records, int n)
{
	uint8		parent_id[CQRS_SPAN_ID_LEN];

	tb.active = false;
	tb.ntraced = 0;
	tb.outcomes = false;
	if (ring == NULL)
		return;
	for (int i = 0; i < n; i++)
	{
		CqrsRecord *rec = &records[i];
		TracedCommand *t;

		if (tb.ntraced == tb.capacity)
		{
			tb.capacity = Max(16, tb.capacity * 2);
			tb.traced = tb.traced == NULL ?
				MemoryContextAlloc(TopMemoryContext, sizeof(TracedCommand) * tb.capacity) :
				repalloc(tb.traced, sizeof(TracedCommand) * tb.capacity);
		}
		t = &tb.traced[tb.ntraced];
		if (rec->aggregate_id == NULL ||
			!cqrs_trace_sampled(rec->traceparent, &rec->command_id,
								t->trace_id, parent_id))
			continue;
		t->index = i;
		tb.ntraced++;
		if (!tb.active)
		{
			tb.active = true;
			tb.start = GetCurrentTimestamp();
			memset(&tb.batch, 0, sizeof(CqrsSpan));
			memcpy(tb.batch.trace_id, t->trace_id, CQRS_TRACE_ID_LEN);
			trace_derived_span_id(tb.batch.parent_id, &rec->command_id, 1);
			trace_random_span_id(tb.batch.span_id);
			tb.batch.lsn_start = records[0].commit_lsn;
			tb.batch.lsn_end = records[n - 1].commit_lsn;
		}
		if (tb.batch.nlinks < CQRS_SPAN_LINKS)
		{
			CqrsSpanLink *link = &tb.batch.links[tb.batch.nlinks++];

			memcpy(link->trace_id, t->trace_id, CQRS_TRACE_ID_LEN);
			trace_derived_span_id(link->span_id, &rec->command_id, 1);
		}
	}
	tb.batch.traced = tb.ntraced;
}

static void trace_read_outcomes(void *arg);

/*
 * In the batch's transaction, once it is applied: what became of each
 * traced command (a dead letter of it, or a parked row, or neither).
 * Only a batch with a traced command asks, with one statement, in a
 * subtransaction: should it fail, the batch goes on without outcomes.
 */
void
cqrs_trace_batch_outcomes(CqrsRecord *records)
{
	ErrorData  *edata;

	tb.outcomes = false;
	if (!tb.active)
		return;
	edata = cqrs_try_subtransaction(trace_read_outcomes, records);
	if (edata != NULL)
	{
		ereport(WARNING,
				(errmsg("cqrs projector could not read what became of the traced commands of a batch: %s",
						edata->message),
				 errdetail("Their apply spans say nothing of it.")));
		FreeErrorData(edata);
	}
}

static void
trace_read_outcomes(void *arg)
{
	CqrsRecord *records = arg;
	static SPIPlanPtr plan = NULL;
	static const char *sql =
		"SELECT d.reason, p.command_id IS NOT NULL"
		" FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.uuid[]),"
		" pg_catalog.unnest($2::pg_catalog.text[]),"
		" pg_catalog.unnest($3::pg_catalog.int8[])) WITH ORDINALITY"
		" AS c (id, aggregate_id, sequence_id, i)"
		" LEFT JOIN cqrs.dead_letter AS d ON d.command_id OPERATOR(pg_catalog.=) c.id"
		" LEFT JOIN cqrs.parked AS p"
		" ON p.aggregate_id OPERATOR(pg_catalog.=) c.aggregate_id"
		" AND p.sequence_id OPERATOR(pg_catalog.=) c.sequence_id"
		" AND p.command_id OPERATOR(pg_catalog.=) c.id"
		" ORDER BY c.i";
	Oid			argtypes[3] = {UUIDARRAYOID, TEXTARRAYOID, INT8ARRAYOID};
	int			k = tb.ntraced;
	Datum	   *ids = palloc(sizeof(Datum) * k);
	Datum	   *aggregates = palloc(sizeof(Datum) * k);
	Datum	   *sequences = palloc(sizeof(Datum) * k);
	Datum		values[3];

	for (int j = 0; j < k; j++)
	{
		CqrsRecord *rec = &records[tb.traced[j].index];

		ids[j] = UUIDPGetDatum(&rec->command_id);
		aggregates[j] = CStringGetTextDatum(rec->aggregate_id);
		sequences[j] = Int64GetDatum(rec->sequence_id);
	}
	values[0] = cqrs_array(ids, NULL, k, UUIDOID);
	values[1] = cqrs_array(aggregates, NULL, k, TEXTOID);
	values[2] = cqrs_array(sequences, NULL, k, INT8OID);
	if (cqrs_exec(cqrs_keep_plan(&plan, sql, 3, argtypes), values, NULL, 0,
				  SPI_OK_SELECT) != (uint64) k)
		elog(ERROR, "could not read what became of the traced commands");
	for (int j = 0; j < k; j++)
	{
		TracedCommand *t = &tb.traced[j];
		HeapTuple	tup = SPI_tuptable->vals[j];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		Datum		reason = SPI_getbinval(tup, desc, 1, &isnull);

		t->reason[0] = '\0';
		if (!isnull)
		{
			t->outcome = TRACE_DEAD_LETTERED;
			trace_copy(t->reason, TextDatumGetCString(reason), sizeof(t->reason));
		}
		else if (DatumGetBool(SPI_getbinval(tup, desc, 2, &isnull)))
			t->outcome = TRACE_PARKED;
		else
			t->outcome = TRACE_APPLIED;
	}
	tb.outcomes = true;
}

void
cqrs_trace_redis_begin(int keys)
{
	if (!tb.active)
		return;
	tb.redis_start = GetCurrentTimestamp();
	tb.redis_keys = keys;
}

void
cqrs_trace_redis_end(bool ok)
{
	CqrsSpan	span;

	if (!tb.active || tb.redis_start == 0)
		return;
	trace_span_init(&span, CQRS_SPAN_REDIS, tb.redis_start, cqrs_database);
	memcpy(span.trace_id, tb.batch.trace_id, CQRS_TRACE_ID_LEN);
	memcpy(span.parent_id, tb.batch.span_id, CQRS_SPAN_ID_LEN);
	trace_random_span_id(span.span_id);
	span.batch_size = tb.redis_keys;
	if (!ok)
		trace_set_error(&span, ERRCODE_CONNECTION_FAILURE,
						"the write-through failed: the keys wait in cqrs.redis_backlog");
	tb.redis_start = 0;
	span.lsn_start = tb.batch.lsn_start;
	span.lsn_end = tb.batch.lsn_end;
	trace_emit(&span);
}

/*
 * The batch of records[0 .. n-1] (as cqrs_trace_batch_begin() saw them)
 * committed after "attempts" tries: its span, and the apply span of each
 * traced command.
 */
void
cqrs_trace_batch_end(CqrsRecord *records, int n, int attempts)
{
	CqrsSpan	span;

	if (!tb.active)
		return;
	tb.active = false;
	trace_span_init(&span, CQRS_SPAN_BATCH, tb.start, cqrs_database);
	memcpy(span.trace_id, tb.batch.trace_id, CQRS_TRACE_ID_LEN);
	memcpy(span.parent_id, tb.batch.parent_id, CQRS_SPAN_ID_LEN);
	memcpy(span.span_id, tb.batch.span_id, CQRS_SPAN_ID_LEN);
	memcpy(span.links, tb.batch.links, sizeof(span.links));
	span.nlinks = tb.batch.nlinks;
	span.traced = tb.batch.traced;
	span.batch_size = n;
	span.attempts = attempts;
	span.lsn_start = tb.batch.lsn_start;
	span.lsn_end = tb.batch.lsn_end;

	for (int j = 0; j < tb.ntraced; j++)
	{
		TracedCommand *t = &tb.traced[j];
		CqrsRecord *rec = &records[t->index];
		CqrsSpan	apply;

		memset(&apply, 0, sizeof(CqrsSpan));
		apply.kind = CQRS_SPAN_APPLY;
		apply.dbid = span.dbid;
		apply.encoding = span.encoding;
		apply.start = span.start;
		apply.end = span.end;
		strlcpy(apply.database, span.database, NAMEDATALEN);
		memcpy(apply.trace_id, t->trace_id, CQRS_TRACE_ID_LEN);
		trace_derived_span_id(apply.parent_id, &rec->command_id, 1);
		trace_derived_span_id(apply.span_id, &rec->command_id, 2);
		apply.nlinks = 1;
		memcpy(apply.links[0].trace_id, span.trace_id, CQRS_TRACE_ID_LEN);
		memcpy(apply.links[0].span_id, span.span_id, CQRS_SPAN_ID_LEN);
		apply.command_id = rec->command_id;
		apply.has_command = true;
		apply.sequence_id = rec->sequence_id;
		trace_copy(apply.command_type, rec->command_type, NAMEDATALEN);
		trace_copy(apply.aggregate_id, rec->aggregate_id, sizeof(apply.aggregate_id));
		apply.lsn_start = span.lsn_start;
		apply.lsn_end = span.lsn_end;
		apply.batch_size = n;
		if (tb.outcomes)
		{
			apply.outcome = t->outcome + 1;
			if (t->outcome == TRACE_DEAD_LETTERED)
			{
				apply.error = true;
				memcpy(apply.message, t->reason, sizeof(apply.message));
			}
		}
		trace_emit(&apply);
	}
	trace_emit(&span);
}

/* The exporter's latch, woken when the ring is half full. */
void
cqrs_trace_set_exporter(Latch *latch)
{
	SpinLockAcquire(&ring->mutex);
	ring->exporter_latch = latch;
	SpinLockRelease(&ring->mutex);
}

/*
 * Spans are copied out of the ring at most CQRS_TRACE_CHUNK at a time, so
 * that a writer never spins on the lock for long.
 */
#define CQRS_TRACE_CHUNK		16

/*
 * The exporter's take: up to max of the spans waiting, oldest first, out
 * of the ring (those read with cqrs.spans(consume => true) are skipped).
 * Returns how many.
 */
int
cqrs_trace_take(CqrsSpan *out, int max)
{
	int			n = 0;
	bool		more = true;

	while (more && n < max)
	{
		SpinLockAcquire(&ring->mutex);
		for (int got = 0; got < CQRS_TRACE_CHUNK && n < max &&
			 ring->tail < ring->head; got++)
		{
			CqrsSpan   *s = &ring->spans[ring->tail % ring->size];

			if (s->taken)
				ring->ntaken--;
			else
				memcpy(&out[n++], s, sizeof(CqrsSpan));
			ring->tail++;
		}
		more = ring->tail < ring->head;
		SpinLockRelease(&ring->mutex);
	}
	return n;
}

/*
 * cqrs.spans()'s read: up to max of the spans of database dbid waiting,
 * oldest first; with consume, they are marked taken (the exporter skips
 * them, the ring reuses their place).  Returns how many.
 */
static int
trace_read(CqrsSpan *out, int max, Oid dbid, bool consume)
{
	int			n = 0;
	uint64		pos = 0;
	bool		more = true;

	while (more && n < max)
	{
		SpinLockAcquire(&ring->mutex);
		pos = Max(pos, ring->tail);
		for (int got = 0; got < CQRS_TRACE_CHUNK && n < max && pos < ring->head;
			 got++, pos++)
		{
			CqrsSpan   *s = &ring->spans[pos % ring->size];

			if (s->taken || s->dbid != dbid)
				continue;
			memcpy(&out[n++], s, sizeof(CqrsSpan));
			if (consume)
			{
				s->taken = true;
				ring->ntaken++;
			}
		}
		more = pos < ring->head;
		SpinLockRelease(&ring->mutex);
	}
	return n;
}

/* The exporter's outcome for n spans it took. */
void
cqrs_trace_exported(int n, bool ok)
{
	SpinLockAcquire(&ring->mutex);
	if (ok)
		ring->exported += n;
	else
		ring->failed += n;
	SpinLockRelease(&ring->mutex);
}

/* The counters, for cqrs.metrics(); false when there is no ring. */
bool
cqrs_trace_counts(uint64 *buffered, uint64 *dropped, uint64 *exported,
				  uint64 *failed)
{
	if (ring == NULL)
		return false;
	SpinLockAcquire(&ring->mutex);
	*buffered = ring->head - ring->tail - ring->ntaken;
	*dropped = ring->dropped;
	*exported = ring->exported;
	*failed = ring->failed;
	SpinLockRelease(&ring->mutex);
	return true;
}

/*
 * Attributes, written either as OTLP/JSON KeyValues or as the members of
 * one JSON object (what cqrs.spans() shows).
 */
typedef struct AttrWriter
{
	StringInfo	buf;
	bool		otlp;
	bool		ascii;			/* see trace_json_string() */
	bool		first;
} AttrWriter;

static void
attr_key(AttrWriter *w, const char *key)
{
	if (!w->first)
		appendStringInfoChar(w->buf, ',');
	w->first = false;
	if (w->otlp)
	{
		appendStringInfoString(w->buf, "{\"key\":");
		escape_json(w->buf, key);
		appendStringInfoString(w->buf, ",\"value\":");
	}
	else
	{
		escape_json(w->buf, key);
		appendStringInfoChar(w->buf, ':');
	}
}

static void
attr_str(AttrWriter *w, const char *key, const char *value)
{
	if (value == NULL || value[0] == '\0')
		return;
	attr_key(w, key);
	if (w->otlp)
		appendStringInfoString(w->buf, "{\"stringValue\":");
	trace_json_string(w->buf, value, w->ascii);
	if (w->otlp)
		appendStringInfoString(w->buf, "}}");
}

static void
attr_int(AttrWriter *w, const char *key, int64 value)
{
	attr_key(w, key);
	if (w->otlp)
		appendStringInfo(w->buf, "{\"intValue\":\"" INT64_FORMAT "\"}}", value);
	else
		appendStringInfo(w->buf, INT64_FORMAT, value);
}

static void
attr_bool(AttrWriter *w, const char *key, bool value)
{
	attr_key(w, key);
	if (w->otlp)
		appendStringInfo(w->buf, "{\"boolValue\":%s}}", value ? "true" : "false");
	else
		appendStringInfoString(w->buf, value ? "true" : "false");
}

static void
attr_lsn(AttrWriter *w, const char *key, XLogRecPtr lsn)
{
	char		s[32];

	if (XLogRecPtrIsInvalid(lsn))
		return;
	snprintf(s, sizeof(s), "%X/%X", LSN_FORMAT_ARGS(lsn));
	attr_str(w, key, s);
}

static void
trace_attributes(AttrWriter *w, const CqrsSpan *s)
{
	char		uuid[UUID_LEN * 2 + 5];
	char		batch_id[32];

	attr_str(w, "db.system", s->kind == CQRS_SPAN_REDIS ? "redis" : "postgresql");
	attr_str(w, "db.namespace", s->database);
	if (s->kind == CQRS_SPAN_COMMAND)
	{
		attr_str(w, "db.operation.name", s->operation);
		attr_str(w, "enduser.id", s->user);
	}
	if (s->has_command)
	{
		const uint8 *u = s->command_id.data;

		snprintf(uuid, sizeof(uuid),
				 "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
				 u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9],
				 u[10], u[11], u[12], u[13], u[14], u[15]);
		attr_str(w, "cqrs.command_id", uuid);
	}
	attr_str(w, "cqrs.command_type", s->command_type);
	attr_str(w, "cqrs.aggregate_id", s->aggregate_id);
	if (s->sequence_id > 0)
		attr_int(w, "cqrs.sequence_id", s->sequence_id);
	if (s->duplicate)
		attr_bool(w, "cqrs.duplicate", true);
	if (s->kind != CQRS_SPAN_COMMAND && !XLogRecPtrIsInvalid(s->lsn_end))
	{
		snprintf(batch_id, sizeof(batch_id), "%X/%X", LSN_FORMAT_ARGS(s->lsn_end));
		attr_str(w, "cqrs.batch_id", batch_id);
	}
	if (s->kind == CQRS_SPAN_BATCH)
	{
		attr_int(w, "cqrs.batch.size", s->batch_size);
		attr_int(w, "messaging.batch.message_count", s->batch_size);
		attr_int(w, "cqrs.batch.traced_commands", s->traced);
		attr_int(w, "cqrs.batch.attempts", s->attempts);
		attr_lsn(w, "cqrs.lsn_start", s->lsn_start);
		attr_lsn(w, "cqrs.lsn_end", s->lsn_end);
	}
	if (s->kind == CQRS_SPAN_REDIS)
		attr_int(w, "cqrs.redis.keys", s->batch_size);
	if (s->outcome > 0)
		attr_str(w, "cqrs.outcome", outcome_names[s->outcome - 1]);
	if (s->error)
		attr_str(w, "error.type", s->sqlstate);
}

/* Microseconds since 2000-01-01 to nanoseconds since 1970-01-01 */
static uint64
trace_unix_nanos(TimestampTz t)
{
	return (uint64) (t + (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) *
					 SECS_PER_DAY * USECS_PER_SEC) * 1000;
}

/*
 * One span as an OTLP/JSON Span object (opentelemetry-proto's
 * trace/v1/trace.proto in the protobuf JSON mapping: ids in hex, 64-bit
 * integers as strings).
 */
void
cqrs_trace_otlp_span(StringInfo buf, const CqrsSpan *s)
{
	char		hex[CQRS_TRACE_ID_LEN * 2 + 1];
	bool		ascii = s->encoding != PG_UTF8;
	AttrWriter	w = {.buf = buf, .otlp = true, .ascii = ascii, .first = true};

	trace_hex(hex, s->trace_id, CQRS_TRACE_ID_LEN);
	appendStringInfo(buf, "{\"traceId\":\"%s\"", hex);
	trace_hex(hex, s->span_id, CQRS_SPAN_ID_LEN);
	appendStringInfo(buf, ",\"spanId\":\"%s\"", hex);
	if (!trace_id_is_zero(s->parent_id, CQRS_SPAN_ID_LEN))
	{
		trace_hex(hex, s->parent_id, CQRS_SPAN_ID_LEN);
		appendStringInfo(buf, ",\"parentSpanId\":\"%s\"", hex);
	}
	appendStringInfo(buf, ",\"name\":\"%s\",\"kind\":%d", span_names[s->kind],
					 span_otlp_kinds[s->kind]);
	appendStringInfo(buf, ",\"startTimeUnixNano\":\"" UINT64_FORMAT "\""
					 ",\"endTimeUnixNano\":\"" UINT64_FORMAT "\"",
					 trace_unix_nanos(s->start), trace_unix_nanos(s->end));
	appendStringInfoString(buf, ",\"attributes\":[");
	trace_attributes(&w, s);
	appendStringInfoChar(buf, ']');
	if (s->nlinks > 0)
	{
		appendStringInfoString(buf, ",\"links\":[");
		for (int i = 0; i < s->nlinks; i++)
		{
			trace_hex(hex, s->links[i].trace_id, CQRS_TRACE_ID_LEN);
			appendStringInfo(buf, "%s{\"traceId\":\"%s\"", i > 0 ? "," : "", hex);
			trace_hex(hex, s->links[i].span_id, CQRS_SPAN_ID_LEN);
			appendStringInfo(buf, ",\"spanId\":\"%s\"}", hex);
		}
		appendStringInfoChar(buf, ']');
	}
	if (s->error)
	{
		appendStringInfoString(buf, ",\"status\":{\"code\":2,\"message\":");
		trace_json_string(buf, s->message, ascii);
		appendStringInfoChar(buf, '}');
	}
	appendStringInfoChar(buf, '}');
}

/*
 * cqrs.spans(consume boolean DEFAULT false) RETURNS TABLE (trace_id text,
 * span_id text, parent_span_id text, name text, kind text, start_time
 * timestamptz, end_time timestamptz, status text, attributes jsonb, links
 * jsonb): the spans of this database (so in its encoding) waiting to be
 * exported, oldest first; with consume, they are taken out (and not exported).
 */
Datum
spans(PG_FUNCTION_ARGS)
{
	bool		consume = PG_GETARG_BOOL(0);
	ReturnSetInfo *rsinfo;
	CqrsSpan   *buf;
	int			n;

	InitMaterializedSRF(fcinfo, 0);
	rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	if (ring == NULL)
		return (Datum) 0;

	SpinLockAcquire(&ring->mutex);
	n = (int) (ring->head - ring->tail);
	SpinLockRelease(&ring->mutex);
	buf = palloc(sizeof(CqrsSpan) * Max(n, 1));
	n = trace_read(buf, n, MyDatabaseId, consume);
	for (int i = 0; i < n; i++)
	{
		CqrsSpan   *s = &buf[i];
		Datum		values[10];
		bool		nulls[10] = {0};
		char		hex[CQRS_TRACE_ID_LEN * 2 + 1];
		StringInfoData json;
		AttrWriter	w = {.buf = &json, .otlp = false, .first = true};

		trace_hex(hex, s->trace_id, CQRS_TRACE_ID_LEN);
		values[0] = CStringGetTextDatum(hex);
		trace_hex(hex, s->span_id, CQRS_SPAN_ID_LEN);
		values[1] = CStringGetTextDatum(hex);
		if (trace_id_is_zero(s->parent_id, CQRS_SPAN_ID_LEN))
			nulls[2] = true;
		else
		{
			trace_hex(hex, s->parent_id, CQRS_SPAN_ID_LEN);
			values[2] = CStringGetTextDatum(hex);
		}
		values[3] = CStringGetTextDatum(span_names[s->kind]);
		values[4] = CStringGetTextDatum(span_kind_names[s->kind]);
		values[5] = TimestampTzGetDatum(s->start);
		values[6] = TimestampTzGetDatum(s->end);
		values[7] = CStringGetTextDatum(s->error ? "error" : "unset");

		initStringInfo(&json);
		appendStringInfoChar(&json, '{');
		trace_attributes(&w, s);
		if (s->error)
		{
			attr_str(&w, "status.message", s->message);
		}
		appendStringInfoChar(&json, '}');
		values[8] = DirectFunctionCall1(jsonb_in, CStringGetDatum(json.data));

		resetStringInfo(&json);
		appendStringInfoChar(&json, '[');
		for (int l = 0; l < s->nlinks; l++)
		{
			trace_hex(hex, s->links[l].trace_id, CQRS_TRACE_ID_LEN);
			appendStringInfo(&json, "%s{\"trace_id\":\"%s\"", l > 0 ? "," : "", hex);
			trace_hex(hex, s->links[l].span_id, CQRS_SPAN_ID_LEN);
			appendStringInfo(&json, ",\"span_id\":\"%s\"}", hex);
		}
		appendStringInfoChar(&json, ']');
		values[9] = DirectFunctionCall1(jsonb_in, CStringGetDatum(json.data));

		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
