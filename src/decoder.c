/*-------------------------------------------------------------------------
 *
 * decoder.c
 *		The logical decoding output plugin "cqrs".
 *
 * Emits the inserts into cqrs.command_log and nothing else: no other
 * table, no UPDATE or DELETE (the log has none), no transaction without a
 * command.  The projector's own writes carry its replication origin and are
 * filtered out before the reorder buffer even queues them.
 *
 * Two sinks share one extraction.  In the projector process, which keeps
 * one decoding context open for its whole life, each command is copied into
 * cqrs_decoding_queue as a CqrsRecord, with the commit LSN and time filled
 * in by the commit callback: no text is formatted or parsed on the hot
 * path.  Anywhere else (pg_logical_slot_peek_changes() and friends) each
 * command becomes one compact text line and each transaction ends with a
 * COMMIT line:
 *
 *	 command log_id=3 command_id=... type=SHIP_ORDER order="o-1" sequence=2 payload={...}
 *	 COMMIT commands=1
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "replication/logical.h"
#include "replication/origin.h"
#include "replication/output_plugin.h"
#include "storage/buffile.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/timestamp.h"

#include "cqrs.h"

PGDLLEXPORT void _PG_output_plugin_init(OutputPluginCallbacks *cb);

CqrsQueue  *cqrs_decoding_queue = NULL;

static const char *const col_names[NUM_COLS] = {
	[COL_LOG_ID] = "log_id",
	[COL_COMMAND_ID] = "command_id",
	[COL_COMMAND_TYPE] = "command_type",
	[COL_AGGREGATE_ID] = "aggregate_id",
	[COL_SEQUENCE_ID] = "sequence_id",
	[COL_PAYLOAD] = "payload",
	[COL_TRACEPARENT] = "traceparent",
	[COL_CREATED_AT] = "created_at",
};

/*
 * The attribute numbers of the columns of cqrs.command_log in desc (the
 * table's, or its row type's), by CqrsLogColumn; ERROR if one is missing.
 */
void
cqrs_log_attnums(TupleDesc desc, AttrNumber *attnums)
{
	for (int c = 0; c < NUM_COLS; c++)
	{
		attnums[c] = InvalidAttrNumber;
		for (int i = 0; i < desc->natts; i++)
		{
			Form_pg_attribute att = TupleDescAttr(desc, i);

			if (!att->attisdropped &&
				strcmp(NameStr(att->attname), col_names[c]) == 0)
				attnums[c] = att->attnum;
		}
		if (attnums[c] == InvalidAttrNumber)
			elog(ERROR, "cqrs.command_log has no column \"%s\"", col_names[c]);
	}
}

typedef struct CqrsDecodingState
{
	MemoryContext context;		/* per change, reset after each */
	CqrsQueue  *queue;			/* projector process: the sink */
	Oid			log_relid;		/* cqrs.command_log as last recognised */
	AttrNumber	attnums[NUM_COLS];
	int			xact_commands;	/* commands emitted in this transaction */
} CqrsDecodingState;

/*
 * A spilled command as written to the temporary file, followed by the
 * bytes of its command type, aggregate id, traceparent and payload (a
 * Jsonb varlena); a length of -1 stands for NULL.
 */
typedef struct CqrsSpilled
{
	int64		log_id;
	pg_uuid_t	command_id;
	int64		sequence_id;
	TimestampTz created_at;
	int32		len[4];
} CqrsSpilled;

/*
 * Empty the queue, keeping its allocation, and forget its records.
 */
void
cqrs_queue_reset(CqrsQueue *queue)
{
	if (queue->spill != NULL)
		BufFileClose(queue->spill);
	queue->spill = NULL;
	queue->nspilled = 0;
	queue->nunspilled = 0;
	MemoryContextReset(queue->context);
	queue->records = NULL;
	queue->nrecords = 0;
	queue->capacity = 0;
	queue->xact_start = 0;
	queue->last_commit_lsn = InvalidXLogRecPtr;
	queue->last_commit_time = 0;
	queue->catalog_changed = false;
}

/*
 * startup_cb: textual output, no options.
 */
static void
decoder_startup(LogicalDecodingContext *ctx, OutputPluginOptions *opt,
				bool is_init)
{
	CqrsDecodingState *state = palloc0(sizeof(CqrsDecodingState));
	ListCell   *lc;

	foreach(lc, ctx->output_plugin_options)
	{
		DefElem    *elem = lfirst(lc);

		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("option \"%s\" is not recognized by the cqrs output plugin",
						elem->defname)));
	}

	state->context = AllocSetContextCreate(ctx->context,
										   "cqrs decoding change",
										   ALLOCSET_DEFAULT_SIZES);
	state->queue = cqrs_decoding_queue;
	state->log_relid = InvalidOid;
	ctx->output_plugin_private = state;

	opt->output_type = OUTPUT_PLUGIN_TEXTUAL_OUTPUT;
	opt->receive_rewrites = false;
}

/*
 * shutdown_cb
 */
static void
decoder_shutdown(LogicalDecodingContext *ctx)
{
	CqrsDecodingState *state = ctx->output_plugin_private;

	MemoryContextDelete(state->context);
}

/*
 * filter_by_origin_cb: drop changes the projector made (they carry an
 * origin); commands come from ordinary sessions, which have none.
 */
static bool
decoder_filter_origin(LogicalDecodingContext *ctx, RepOriginId origin_id)
{
	return origin_id != InvalidRepOriginId;
}

/*
 * begin_cb
 */
static void
decoder_begin(LogicalDecodingContext *ctx, ReorderBufferTXN *txn)
{
	CqrsDecodingState *state = ctx->output_plugin_private;

	state->xact_commands = 0;
	if (state->queue)
		state->queue->xact_start = state->queue->nrecords;
}

/*
 * Is relation cqrs.command_log?  Recognised by name once per relation OID,
 * so that a dropped and re-created extension is followed.
 */
static bool
decoder_is_command_log(CqrsDecodingState *state, Relation relation)
{
	char	   *nspname;

	if (RelationGetRelid(relation) == state->log_relid)
		return true;
	if (strcmp(RelationGetRelationName(relation), "command_log") != 0)
		return false;
	nspname = get_namespace_name(RelationGetNamespace(relation));
	if (nspname == NULL || strcmp(nspname, "cqrs") != 0)
		return false;

	cqrs_log_attnums(RelationGetDescr(relation), state->attnums);
	state->log_relid = RelationGetRelid(relation);
	return true;
}

/*
 * Column c of the decoded tuple, or NULL when it is null.
 */
static Datum
decoder_column(CqrsDecodingState *state, HeapTuple tuple, TupleDesc desc,
			   int c, bool *isnull)
{
	return heap_getattr(tuple, state->attnums[c], desc, isnull);
}

/*
 * Text of column c, or NULL.
 */
static char *
decoder_text(CqrsDecodingState *state, HeapTuple tuple, TupleDesc desc, int c)
{
	bool		isnull;
	Datum		d = decoder_column(state, tuple, desc, c, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/*
 * Write the command to the queue's temporary file.
 */
static void
decoder_spill(CqrsDecodingState *state, HeapTuple tuple, TupleDesc desc)
{
	CqrsQueue  *queue = state->queue;
	CqrsSpilled hdr;
	void	   *data[4];
	bool		isnull;
	Datum		d;

	memset(&hdr, 0, sizeof(hdr));
	d = decoder_column(state, tuple, desc, COL_LOG_ID, &isnull);
	hdr.log_id = isnull ? 0 : DatumGetInt64(d);
	d = decoder_column(state, tuple, desc, COL_COMMAND_ID, &isnull);
	if (!isnull)
		memcpy(&hdr.command_id, DatumGetUUIDP(d), sizeof(pg_uuid_t));
	d = decoder_column(state, tuple, desc, COL_SEQUENCE_ID, &isnull);
	hdr.sequence_id = isnull ? 0 : DatumGetInt64(d);
	d = decoder_column(state, tuple, desc, COL_CREATED_AT, &isnull);
	hdr.created_at = isnull ? 0 : DatumGetTimestampTz(d);

	for (int i = 0; i < 4; i++)
	{
		static const int cols[4] = {COL_COMMAND_TYPE, COL_AGGREGATE_ID,
		COL_TRACEPARENT, COL_PAYLOAD};

		d = decoder_column(state, tuple, desc, cols[i], &isnull);
		if (isnull)
		{
			hdr.len[i] = -1;
			data[i] = NULL;
		}
		else if (cols[i] == COL_PAYLOAD)
		{
			Jsonb	   *payload = DatumGetJsonbP(d);

			hdr.len[i] = VARSIZE(payload);
			data[i] = payload;
		}
		else
		{
			text	   *t = DatumGetTextPP(d);

			hdr.len[i] = VARSIZE_ANY_EXHDR(t);
			data[i] = VARDATA_ANY(t);
		}
	}

	BufFileWrite(queue->spill, &hdr, sizeof(hdr));
	for (int i = 0; i < 4; i++)
		if (hdr.len[i] > 0)
			BufFileWrite(queue->spill, data[i], hdr.len[i]);
	queue->nspilled++;
}

/*
 * Read up to max spilled commands back into records, allocated in the
 * current memory context; returns how many.  They all belong to the last
 * transaction decoded.
 */
int
cqrs_queue_unspill(CqrsQueue *queue, CqrsRecord *records, int max)
{
	int			n = 0;

	if (queue->spill == NULL)
		return 0;
	if (queue->nunspilled == 0 &&
		BufFileSeek(queue->spill, 0, 0, SEEK_SET) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not rewind cqrs spill file: %m")));

	while (n < max && queue->nunspilled < queue->nspilled)
	{
		CqrsRecord *rec = &records[n++];
		CqrsSpilled hdr;
		char	   *data[4];

		CQRS_BUFFILE_READ(queue->spill, &hdr, sizeof(hdr));
		for (int i = 0; i < 4; i++)
		{
			if (hdr.len[i] < 0)
			{
				data[i] = NULL;
				continue;
			}
			data[i] = palloc(hdr.len[i] + 1);
			if (hdr.len[i] > 0)
				CQRS_BUFFILE_READ(queue->spill, data[i], hdr.len[i]);
			data[i][hdr.len[i]] = '\0';
		}
		memset(rec, 0, sizeof(CqrsRecord));
		rec->log_id = hdr.log_id;
		rec->command_id = hdr.command_id;
		rec->sequence_id = hdr.sequence_id;
		rec->created_at = hdr.created_at;
		rec->command_type = data[0];
		rec->aggregate_id = data[1];
		rec->traceparent = data[2];
		rec->payload = (Jsonb *) data[3];
		rec->commit_lsn = queue->last_commit_lsn;
		rec->commit_time = queue->last_commit_time;
		queue->nunspilled++;
	}
	return n;
}

/*
 * Append the command to the projector's queue, in the queue's context;
 * to its temporary file once the queue holds cqrs.projector_work_mem.
 */
static void
decoder_enqueue(CqrsDecodingState *state, HeapTuple tuple, TupleDesc desc)
{
	CqrsQueue  *queue = state->queue;
	MemoryContext old = MemoryContextSwitchTo(queue->context);
	CqrsRecord *rec;
	bool		isnull;
	Datum		d;

	if (queue->spill == NULL &&
		MemoryContextMemAllocated(queue->context, true) >=
		(Size) cqrs_projector_work_mem * 1024)
	{
		/* outlives the transaction decoding runs in; closed by reset */
		queue->spill = BufFileCreateTemp(true);
	}
	if (queue->spill != NULL)
	{
		/* what detoasting allocates goes with the change */
		MemoryContextSwitchTo(old);
		decoder_spill(state, tuple, desc);
		return;
	}

	if (queue->nrecords == queue->capacity)
	{
		queue->capacity = Max(1024, queue->capacity * 2);
		if (queue->records == NULL)
			queue->records = palloc(sizeof(CqrsRecord) * queue->capacity);
		else
			queue->records = repalloc(queue->records,
									  sizeof(CqrsRecord) * queue->capacity);
	}
	rec = &queue->records[queue->nrecords++];
	memset(rec, 0, sizeof(CqrsRecord));

	d = decoder_column(state, tuple, desc, COL_LOG_ID, &isnull);
	rec->log_id = isnull ? 0 : DatumGetInt64(d);
	d = decoder_column(state, tuple, desc, COL_COMMAND_ID, &isnull);
	if (!isnull)
		memcpy(&rec->command_id, DatumGetUUIDP(d), sizeof(pg_uuid_t));
	rec->command_type = decoder_text(state, tuple, desc, COL_COMMAND_TYPE);
	rec->aggregate_id = decoder_text(state, tuple, desc, COL_AGGREGATE_ID);
	d = decoder_column(state, tuple, desc, COL_SEQUENCE_ID, &isnull);
	rec->sequence_id = isnull ? 0 : DatumGetInt64(d);
	d = decoder_column(state, tuple, desc, COL_PAYLOAD, &isnull);
	rec->payload = isnull ? NULL : DatumGetJsonbPCopy(d);
	rec->traceparent = decoder_text(state, tuple, desc, COL_TRACEPARENT);
	d = decoder_column(state, tuple, desc, COL_CREATED_AT, &isnull);
	rec->created_at = isnull ? 0 : DatumGetTimestampTz(d);

	MemoryContextSwitchTo(old);
}

/*
 * Write the command as one text line.
 */
static void
decoder_write_text(LogicalDecodingContext *ctx, CqrsDecodingState *state,
				   HeapTuple tuple, TupleDesc desc)
{
	bool		isnull;
	Datum		d;
	char	   *s;

	OutputPluginPrepareWrite(ctx, true);
	appendStringInfoString(ctx->out, "command");

	d = decoder_column(state, tuple, desc, COL_LOG_ID, &isnull);
	if (!isnull)
		appendStringInfo(ctx->out, " log_id=" INT64_FORMAT, DatumGetInt64(d));
	d = decoder_column(state, tuple, desc, COL_COMMAND_ID, &isnull);
	if (!isnull)
		appendStringInfo(ctx->out, " command_id=%s",
						 DatumGetCString(DirectFunctionCall1(uuid_out, d)));
	s = decoder_text(state, tuple, desc, COL_COMMAND_TYPE);
	appendStringInfo(ctx->out, " type=%s", s ? s : "null");
	s = decoder_text(state, tuple, desc, COL_AGGREGATE_ID);
	appendStringInfoString(ctx->out, " order=");
	if (s)
		escape_json(ctx->out, s);
	else
		appendStringInfoString(ctx->out, "null");
	d = decoder_column(state, tuple, desc, COL_SEQUENCE_ID, &isnull);
	if (!isnull)
		appendStringInfo(ctx->out, " sequence=" INT64_FORMAT, DatumGetInt64(d));
	d = decoder_column(state, tuple, desc, COL_PAYLOAD, &isnull);
	appendStringInfo(ctx->out, " payload=%s",
					 isnull ? "null" : DatumGetCString(DirectFunctionCall1(jsonb_out, d)));
	s = decoder_text(state, tuple, desc, COL_TRACEPARENT);
	if (s)
		appendStringInfo(ctx->out, " traceparent=%s", s);

	OutputPluginWrite(ctx, true);
}

/*
 * change_cb: emit inserts into cqrs.command_log.
 */
static void
decoder_change(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
			   Relation relation, ReorderBufferChange *change)
{
	CqrsDecodingState *state = ctx->output_plugin_private;
	MemoryContext old;
	HeapTuple	tuple;

	if (change->action != REORDER_BUFFER_CHANGE_INSERT)
		return;
	if (!decoder_is_command_log(state, relation))
		return;
	tuple = CQRS_CHANGE_NEWTUPLE(change);
	if (tuple == NULL)
		return;

	old = MemoryContextSwitchTo(state->context);
	if (state->queue)
		decoder_enqueue(state, tuple, RelationGetDescr(relation));
	else
		decoder_write_text(ctx, state, tuple, RelationGetDescr(relation));
	state->xact_commands++;
	MemoryContextSwitchTo(old);
	MemoryContextReset(state->context);
}

/*
 * commit_cb: close the transaction if it carried commands.
 */
static void
decoder_commit(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
			   XLogRecPtr commit_lsn)
{
	CqrsDecodingState *state = ctx->output_plugin_private;
	CqrsQueue  *queue = state->queue;

	if (queue)
	{
		/* catalog changes invalidate what the apply side has cached */
		if (rbtxn_has_catalog_changes(txn))
			queue->catalog_changed = true;
		if (state->xact_commands == 0)
			return;
		for (int i = queue->xact_start; i < queue->nrecords; i++)
		{
			queue->records[i].commit_lsn = txn->end_lsn;
			queue->records[i].commit_time = txn->xact_time.commit_time;
		}
		queue->last_commit_lsn = txn->end_lsn;
		queue->last_commit_time = txn->xact_time.commit_time;
		return;
	}

	if (state->xact_commands == 0)
		return;
	OutputPluginPrepareWrite(ctx, true);
	appendStringInfo(ctx->out, "COMMIT commands=%d", state->xact_commands);
	OutputPluginWrite(ctx, true);
}

/*
 * Output plugin entry point.
 */
void
_PG_output_plugin_init(OutputPluginCallbacks *cb)
{
	cb->startup_cb = decoder_startup;
	cb->begin_cb = decoder_begin;
	cb->change_cb = decoder_change;
	cb->commit_cb = decoder_commit;
	cb->filter_by_origin_cb = decoder_filter_origin;
	cb->shutdown_cb = decoder_shutdown;
}
