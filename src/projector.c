/*-------------------------------------------------------------------------
 *
 * projector.c
 *		Apply decoded commands to cqrs.read_model: one batch, one
 *		transaction, a handful of set-based statements.
 *
 * A batch is folded in memory and written back with one statement per
 * table: load the current rows (and any parked commands) of the orders the
 * batch touches, apply the projection rules in sequence order, then insert
 * the changed rows, park, unpark and dead-letter with unnest() arrays.
 *
 * Projection rules, per order, in sequence order:
 * - sequence_id <= version: already applied, skipped (redelivery after a
 *   crash, or overlap with the catch-up from the log);
 * - sequence_id > version + 1: parked until the gap fills;
 * - otherwise the command is applied: CREATE_ORDER inserts the row
 *   (created, version 1); SHIP_ORDER and CANCEL_ORDER move created to
 *   shipped or cancelled; any other transition, a CREATE_ORDER for an order
 *   that exists, a malformed payload or an unknown type is dead-lettered
 *   with a reason, and the version still advances so later commands are
 *   not blocked.  A first command (sequence 1) that does not create a valid
 *   order is dead-lettered and leaves no row.
 * Because the outcome depends only on the set of commands, never on how
 * often or in which order they arrive, at-least-once delivery yields
 * exactly-once effects.  The caller commits the position in the same
 * transaction.
 *
 * Errors: the batch runs in a subtransaction.  An error a command can be
 * to blame for (see cqrs_blames_command) splits the batch in halves
 * until the one command that fails alone is found; it is dead-lettered
 * with the error text.  Any other error is re-thrown for the caller to
 * retry the whole batch with backoff.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/pg_lsn.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"

#include "cqrs.h"

typedef enum OrderStatus
{
	STATUS_CREATED,
	STATUS_SHIPPED,
	STATUS_CANCELLED
} OrderStatus;

static const char *const status_names[] = {"created", "shipped", "cancelled"};

/* One order touched by the batch. */
typedef struct OrderState
{
	const char *order_id;		/* hash key (a pointer to the string) */
	bool		exists;			/* has a read-model row */
	bool		stored;			/* the row was in the table before the batch */
	bool		dirty;			/* row to write back */
	int64		min_sequence;	/* lowest sequence_id of the batch */
	bool		lookup;			/* look for its read-model row */
	/* rebuild: the row as it was, to write only what differs */
	char	   *old_user_id;
	Datum		old_amount;
	OrderStatus old_status;
	int64		old_version;
	char	   *user_id;
	Datum		total_amount;	/* numeric */
	OrderStatus status;
	int64		version;
	List	   *parked;			/* ParkedCommand *, by sequence */
} OrderState;

typedef struct ParkedCommand
{
	CqrsRecord *rec;
	bool		stored;			/* already in cqrs.parked */
	bool		drained;		/* applied in this batch */
} ParkedCommand;

/* Everything one fold produces. */
typedef struct FoldResult
{
	HTAB	   *orders;
	List	   *dead;			/* CqrsDeadLetter * */
	CqrsApplyStats stats;
} FoldResult;

/* Kept plans, prepared on first use. */
static SPIPlanPtr load_rows_plan = NULL;
static SPIPlanPtr load_parked_plan[2];	/* by cqrs_schema_020() */
static SPIPlanPtr parked_exists_plan = NULL;
static SPIPlanPtr insert_plan = NULL;
static SPIPlanPtr update_plan = NULL;
static SPIPlanPtr park_plan[2];
static SPIPlanPtr unpark_plan = NULL;
static SPIPlanPtr dead_plan[2];
static SPIPlanPtr bump_plan = NULL;
static SPIPlanPtr offset_plan = NULL;
static SPIPlanPtr load_offset_plan = NULL;
static SPIPlanPtr rebuild_prune_plan = NULL;

/*
 * Whether cqrs.parked has rows: -1 unknown, 0 empty, 1 not empty.  Only
 * the projector parks commands, so while the table is known empty the
 * batch need not look for parked commands of its orders.  Any rollback
 * makes it unknown again (cqrs_project_forget()).
 */
static int	parked_known = -1;

/*
 * While cqrs.rebuild() replays the log in this process: every order is
 * folded from nothing (its whole history is in the chunk), compared with
 * its row, and only what differs is written; errors are not split but
 * thrown, for the rebuild to fall back to rewriting everything.
 */
static bool rebuild_mode = false;

/*
 * Rebuild: the command_ids of every dead letter the replay derived so far
 * (allocated in rebuild_context), for cqrs_project_rebuild_prune().
 */
static MemoryContext rebuild_context = NULL;
static pg_uuid_t *rebuild_dead = NULL;
static int64 rebuild_ndead = 0;
static int64 rebuild_dead_size = 0;
/* Rebuild: how many orders the replay made a row for. */
static int64 rebuild_nrows = 0;

/* The command being applied, for the error context. */
static CqrsRecord *current_record = NULL;
static int	current_batch_size = 0;

/*
 * Error context: name the command (or batch) being applied and its LSN.
 */
static void
projector_error_context(void *arg)
{
	CqrsRecord *rec = current_record;

	if (rec == NULL)
		return;
	if (current_batch_size > 1)
		errcontext("cqrs projector applying a batch of %d commands ending at %X/%X",
				   current_batch_size, LSN_FORMAT_ARGS(rec->commit_lsn));
	else
		errcontext("cqrs projector applying %s command %s (log_id " INT64_FORMAT ", order \"%s\", sequence " INT64_FORMAT "%s%s) committed at %X/%X",
				   rec->command_type ? rec->command_type : "(null)",
				   DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(&rec->command_id))),
				   rec->log_id,
				   rec->aggregate_id ? rec->aggregate_id : "(null)",
				   rec->sequence_id,
				   rec->traceparent ? ", traceparent " : "",
				   rec->traceparent ? rec->traceparent : "",
				   LSN_FORMAT_ARGS(rec->commit_lsn));
}

/*
 * Build a one-dimensional array of n datums of type elemtype.
 */
Datum
cqrs_array(Datum *elems, bool *nulls, int n, Oid elemtype)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;
	int			dims[1] = {n};
	int			lbs[1] = {1};

	get_typlenbyvalalign(elemtype, &typlen, &typbyval, &typalign);
	return PointerGetDatum(construct_md_array(elems, nulls, 1, dims, lbs,
											  elemtype, typlen, typbyval,
											  typalign));
}

/* Add the counts of "from" to "to". */
void
cqrs_stats_add(CqrsApplyStats *to, const CqrsApplyStats *from)
{
	to->applied += from->applied;
	to->skipped += from->skipped;
	to->parked += from->parked;
	to->unparked += from->unparked;
	to->dead += from->dead;
	to->poisoned += from->poisoned;
}

/* Hash support: keys are pointers to NUL-terminated ids. */
static uint32
id_hash(const void *key, Size keysize)
{
	const char *s = *(const char *const *) key;

	return string_hash(s, strlen(s) + 1);
}

static int
id_match(const void *key1, const void *key2, Size keysize)
{
	return strcmp(*(const char *const *) key1, *(const char *const *) key2);
}

/*
 * A hash table in the current memory context whose entries (entrysize
 * bytes) begin with a pointer to a NUL-terminated id, their key: the
 * strings are not copied, and must outlive the table.
 */
HTAB *
cqrs_id_hash_create(const char *name, long nelem, Size entrysize)
{
	HASHCTL		hctl;

	hctl.keysize = sizeof(char *);
	hctl.entrysize = entrysize;
	hctl.hash = id_hash;
	hctl.match = id_match;
	hctl.hcxt = CurrentMemoryContext;
	return hash_create(name, Max(nelem, 16), &hctl,
					   HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
}

/*
 * The ids of the orders in the hash table, as a text[] parameter; with
 * "lookup_only", only those of orders marked for a row lookup.  *nkeys is
 * set to the number of ids.
 */
static Datum
projector_order_keys(HTAB *orders, int norders, bool lookup_only, int *nkeys)
{
	Datum	   *keys = palloc(sizeof(Datum) * norders);
	HASH_SEQ_STATUS seq;
	OrderState *o;
	int			n = 0;

	hash_seq_init(&seq, orders);
	while ((o = hash_seq_search(&seq)) != NULL)
	{
		if (!lookup_only || o->lookup)
			keys[n++] = CStringGetTextDatum(o->order_id);
	}
	*nkeys = n;
	return cqrs_array(keys, NULL, n, TEXTOID);
}

/*
 * Load the read-model rows of the orders marked for a lookup.
 */
static void
projector_load_rows(HTAB *orders, int norders)
{
	static const char *sql =
		"SELECT order_id, user_id, total_amount, status, version"
		" FROM cqrs.read_model"
		" WHERE order_id OPERATOR(pg_catalog.=) ANY ($1)";
	Oid			argtypes[1] = {TEXTARRAYOID};
	Datum		values[1];
	OrderState *o;
	int			nkeys;

	values[0] = projector_order_keys(orders, norders, true, &nkeys);
	if (nkeys == 0)
		return;
	(void) cqrs_exec(cqrs_keep_plan(&load_rows_plan, sql, 1, argtypes),
						 values, NULL, 0, SPI_OK_SELECT);

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *order_id = cqrs_spi_text(tup, desc, 1);
		char	   *status = cqrs_spi_text(tup, desc, 4);
		bool		isnull;
		char	   *user_id = cqrs_spi_text(tup, desc, 2);
		Datum		amount = datumCopy(SPI_getbinval(tup, desc, 3, &isnull),
									   false, -1);
		OrderStatus st = strcmp(status, "shipped") == 0 ? STATUS_SHIPPED :
			strcmp(status, "cancelled") == 0 ? STATUS_CANCELLED : STATUS_CREATED;
		int64		version = DatumGetInt64(SPI_getbinval(tup, desc, 5, &isnull));

		o = hash_search(orders, &order_id, HASH_FIND, NULL);
		if (o == NULL)
			continue;
		o->stored = true;
		if (rebuild_mode)
		{
			/* the fold starts from nothing; the row is for comparison */
			o->old_user_id = user_id;
			o->old_amount = amount;
			o->old_status = st;
			o->old_version = version;
			continue;
		}
		o->exists = true;
		o->user_id = user_id;
		o->total_amount = amount;
		o->status = st;
		o->version = version;
	}
}

/*
 * The parked commands of the aggregates whose ids are in the text[]
 * aggregate_ids, as CqrsRecord *, by aggregate and sequence.
 */
List *
cqrs_parked_load(Datum aggregate_ids)
{
	static const char *const sql[2] = {
		"SELECT aggregate_id, sequence_id, command_id, log_id, command_type,"
		" payload, traceparent, NULL::pg_catalog.timestamptz FROM cqrs.parked"
		" WHERE aggregate_id OPERATOR(pg_catalog.=) ANY ($1)"
		" ORDER BY aggregate_id, sequence_id",
		"SELECT aggregate_id, sequence_id, command_id, log_id, command_type,"
		" payload, traceparent, created_at FROM cqrs.parked"
		" WHERE aggregate_id OPERATOR(pg_catalog.=) ANY ($1)"
		" ORDER BY aggregate_id, sequence_id"};
	int			v = cqrs_schema_020() ? 1 : 0;
	Oid			argtypes[1] = {TEXTARRAYOID};
	List	   *parked = NIL;

	(void) cqrs_exec(cqrs_keep_plan(&load_parked_plan[v], sql[v], 1, argtypes),
					 &aggregate_ids, NULL, 0, SPI_OK_SELECT);

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		CqrsRecord *rec = palloc0(sizeof(CqrsRecord));
		bool		isnull;
		Datum		d;

		rec->aggregate_id = cqrs_spi_text(tup, desc, 1);
		rec->sequence_id = DatumGetInt64(SPI_getbinval(tup, desc, 2, &isnull));
		memcpy(&rec->command_id,
			   DatumGetUUIDP(SPI_getbinval(tup, desc, 3, &isnull)),
			   sizeof(pg_uuid_t));
		d = SPI_getbinval(tup, desc, 4, &isnull);
		rec->log_id = isnull ? 0 : DatumGetInt64(d);
		rec->command_type = cqrs_spi_text(tup, desc, 5);
		d = SPI_getbinval(tup, desc, 6, &isnull);
		rec->payload = isnull ? NULL : DatumGetJsonbPCopy(d);
		rec->traceparent = cqrs_spi_text(tup, desc, 7);
		d = SPI_getbinval(tup, desc, 8, &isnull);
		rec->created_at = isnull ? 0 : DatumGetTimestampTz(d);
		parked = lappend(parked, rec);
	}
	return parked;
}

/*
 * Load the parked commands of every order in the hash table.
 */
static void
projector_load_parked(HTAB *orders, int norders)
{
	List	   *parked;
	ListCell   *lc;
	int			nkeys;

	parked = cqrs_parked_load(projector_order_keys(orders, norders, false,
												   &nkeys));
	foreach(lc, parked)
	{
		CqrsRecord *rec = lfirst(lc);
		ParkedCommand *pc;
		OrderState *o;

		o = hash_search(orders, &rec->aggregate_id, HASH_FIND, NULL);
		if (o == NULL)
			continue;
		pc = palloc0(sizeof(ParkedCommand));
		pc->rec = rec;
		pc->stored = true;
		o->parked = lappend(o->parked, pc);
	}
}

/* Columns of a batch of commands to park (cqrs_parked_put()). */
static const Oid park_types[9] = {TEXTOID, INT8OID, UUIDOID, INT8OID, INT8OID, TEXTOID, JSONBOID, TEXTOID, TIMESTAMPTZOID};
static const Oid unpark_types[2] = {TEXTOID, INT8OID};

/* Add rec, waiting for sequence waiting_for, to a batch to park. */
void
cqrs_parked_put(CqrsBatch *park, CqrsRecord *rec, int64 waiting_for)
{
	if (park->ncols == 0)
		cqrs_batch_init(park, 64, 9, park_types);
	cqrs_batch_grow(park);
	cqrs_batch_put_text(park, 0, rec->aggregate_id);
	cqrs_batch_put(park, 1, Int64GetDatum(rec->sequence_id));
	cqrs_batch_put(park, 2, UUIDPGetDatum(&rec->command_id));
	cqrs_batch_put(park, 3, Int64GetDatum(waiting_for));
	cqrs_batch_put(park, 4, Int64GetDatum(rec->log_id));
	cqrs_batch_put_text(park, 5, rec->command_type);
	if (rec->payload)
		cqrs_batch_put(park, 6, JsonbPGetDatum(rec->payload));
	else
		park->nulls[6][park->nrows] = true;
	cqrs_batch_put_text(park, 7, rec->traceparent);
	if (rec->created_at != 0)
		cqrs_batch_put(park, 8, TimestampTzGetDatum(rec->created_at));
	else
		park->nulls[8][park->nrows] = true;
	park->nrows++;
}

/* Add rec to a batch of parked commands to remove (cqrs_parked_remove()). */
void
cqrs_unpark_put(CqrsBatch *unpark, CqrsRecord *rec)
{
	if (unpark->ncols == 0)
		cqrs_batch_init(unpark, 64, 2, unpark_types);
	cqrs_batch_grow(unpark);
	cqrs_batch_put_text(unpark, 0, rec->aggregate_id);
	cqrs_batch_put(unpark, 1, Int64GetDatum(rec->sequence_id));
	unpark->nrows++;
}

/* Insert a batch of commands to park into cqrs.parked. */
void
cqrs_parked_store(CqrsBatch *park)
{
#define PARK_SQL(created_at_col, created_at_array) \
		"INSERT INTO cqrs.parked (aggregate_id, sequence_id, command_id," \
		" waiting_for, log_id, command_type, payload, traceparent" created_at_col ")" \
		" SELECT * FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[])," \
		" pg_catalog.unnest($2::pg_catalog.int8[])," \
		" pg_catalog.unnest($3::pg_catalog.uuid[])," \
		" pg_catalog.unnest($4::pg_catalog.int8[])," \
		" pg_catalog.unnest($5::pg_catalog.int8[])," \
		" pg_catalog.unnest($6::pg_catalog.text[])," \
		" pg_catalog.unnest($7::pg_catalog.jsonb[])," \
		" pg_catalog.unnest($8::pg_catalog.text[])" created_at_array ")" \
		" ON CONFLICT DO NOTHING"
	static const char *const sql[2] = {
		PARK_SQL("", ""),
		PARK_SQL(", created_at", ", pg_catalog.unnest($9::pg_catalog.timestamptz[])")};
#undef PARK_SQL
	int			v = cqrs_schema_020() ? 1 : 0;

	if (park->nrows == 0)
		return;
	/* a 0.1.0 installation not updated yet has no created_at */
	park->ncols = v ? 9 : 8;
	cqrs_batch_exec(park, &park_plan[v], sql[v], SPI_OK_INSERT);
}

/* Delete a batch of parked commands, now applied, from cqrs.parked. */
void
cqrs_parked_remove(CqrsBatch *unpark)
{
	static const char *sql =
		"DELETE FROM cqrs.parked p"
		" USING ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]),"
		" pg_catalog.unnest($2::pg_catalog.int8[]))"
		" AS u(aggregate_id, sequence_id)"
		" WHERE p.aggregate_id OPERATOR(pg_catalog.=) u.aggregate_id"
		" AND p.sequence_id OPERATOR(pg_catalog.=) u.sequence_id";

	cqrs_batch_exec(unpark, &unpark_plan, sql, SPI_OK_DELETE);
}

/*
 * Dead-letter rec with a reason.
 */
static void
fold_dead(FoldResult *fr, CqrsRecord *rec, const char *reason)
{
	CqrsDeadLetter *dl = palloc0(sizeof(CqrsDeadLetter));

	dl->rec = rec;
	dl->reason = pstrdup(reason);
	fr->dead = lappend(fr->dead, dl);
}

/*
 * A JSON string or number member of the payload, or NULL.
 */
static JsonbValue *
fold_member(Jsonb *payload, const char *key, enum jbvType type)
{
	JsonbValue *v;

	if (payload == NULL || !JB_ROOT_IS_OBJECT(payload))
		return NULL;
	v = getKeyJsonValueFromContainer(&payload->root, key, strlen(key), NULL);
	if (v == NULL || v->type != type)
		return NULL;
	return v;
}

/*
 * The orders' rules: what command "type" with "payload" makes of an order
 * that exists or not, in status *status.  Returns NULL when it applies
 * (*status, and for a create *user_id and *amount, set), or why not.
 */
static char *
order_rule(const char *order_id, bool exists, OrderStatus *status,
		   const char *type, Jsonb *payload, int64 sequence_id,
		   char **user_id, Datum *amount)
{
	if (!exists)
	{
		JsonbValue *u = fold_member(payload, "user_id", jbvString);
		JsonbValue *a = fold_member(payload, "amount", jbvNumeric);

		if (strcmp(type, "CREATE_ORDER") != 0)
			return psprintf("the first command of order \"%s\" is %s, not CREATE_ORDER",
							order_id, type);
		if (u == NULL || a == NULL)
			return pstrdup("malformed CREATE_ORDER payload: it needs a string \"user_id\" and a numeric \"amount\"");
		*user_id = pnstrdup(u->val.string.val, u->val.string.len);
		*amount = NumericGetDatum(a->val.numeric);
		*status = STATUS_CREATED;
		return NULL;
	}
	if (strcmp(type, "SHIP_ORDER") == 0 || strcmp(type, "CANCEL_ORDER") == 0)
	{
		if (*status != STATUS_CREATED)
			return psprintf("invalid transition: %s on a %s order",
							type, status_names[*status]);
		*status = (type[0] == 'S') ? STATUS_SHIPPED : STATUS_CANCELLED;
		return NULL;
	}
	if (strcmp(type, "CREATE_ORDER") == 0)
		return psprintf("invalid transition: CREATE_ORDER at sequence " INT64_FORMAT " of an existing order",
						sequence_id);
	return psprintf("unknown command type \"%s\"", type);
}

/*
 * Apply rec, whose sequence is the order's next, to the order.  A command
 * the rules refuse is dead-lettered; the version still advances past it
 * (but a first command that creates nothing leaves no row).
 */
static void
fold_apply(FoldResult *fr, OrderState *o, CqrsRecord *rec)
{
	const char *type = rec->command_type ? rec->command_type : "";
	OrderStatus status = o->status;
	char	   *user_id = NULL;
	Datum		amount = (Datum) 0;
	char	   *reason;

	fr->stats.applied++;
	reason = order_rule(o->order_id, o->exists, &status, type, rec->payload,
						rec->sequence_id, &user_id, &amount);
	if (reason != NULL)
	{
		fold_dead(fr, rec, reason);
		if (!o->exists)
			return;
	}
	else if (!o->exists)
	{
		o->exists = true;
		o->user_id = user_id;
		o->total_amount = amount;
	}
	o->status = status;
	o->version = rec->sequence_id;
	o->dirty = true;
}

/*
 * cqrs.apply_order(state cqrs.read_model, command cqrs.command_log)
 * RETURNS cqrs.read_model
 *
 * The built-in projection's rules as an apply function, registered in
 * cqrs.projection as any other: the projector runs the same rules
 * (order_rule()) in its set-based fold, and this lets them be folded in
 * SQL.  A command the rules refuse is an error (23514, 22023 for a
 * malformed create), as a declared projection's apply function raises
 * one; updated_at is the command's created_at.
 */
PG_FUNCTION_INFO_V1(apply_order);

Datum
apply_order(PG_FUNCTION_ARGS)
{
	HeapTupleHeader command;
	TupleDesc	desc;
	bool		isnull;
	Datum		d;
	char	   *type;
	char	   *order_id;
	int64		sequence_id;
	Jsonb	   *payload = NULL;
	bool		exists = !PG_ARGISNULL(0);
	OrderStatus status = STATUS_CREATED;
	char	   *user_id = NULL;
	Datum		amount = (Datum) 0;
	char	   *reason;
	Datum		values[6];
	bool		nulls[6] = {false, false, false, false, false, false};
	static const char *const cols[6] = {"order_id", "user_id", "total_amount",
	"status", "version", "updated_at"};

	if (PG_ARGISNULL(1))
		PG_RETURN_DATUM(PG_GETARG_DATUM(0));
	command = PG_GETARG_HEAPTUPLEHEADER(1);
	d = GetAttributeByName(command, "command_type", &isnull);
	type = isnull ? "" : TextDatumGetCString(d);
	d = GetAttributeByName(command, "aggregate_id", &isnull);
	order_id = isnull ? "" : TextDatumGetCString(d);
	d = GetAttributeByName(command, "sequence_id", &isnull);
	sequence_id = isnull ? 0 : DatumGetInt64(d);
	d = GetAttributeByName(command, "payload", &isnull);
	if (!isnull)
		payload = DatumGetJsonbP(d);

	if (exists)
	{
		HeapTupleHeader state = PG_GETARG_HEAPTUPLEHEADER(0);
		const char *st;

		d = GetAttributeByName(state, "status", &isnull);
		st = isnull ? "" : TextDatumGetCString(d);
		status = strcmp(st, "shipped") == 0 ? STATUS_SHIPPED :
			strcmp(st, "cancelled") == 0 ? STATUS_CANCELLED : STATUS_CREATED;
		for (int c = 0; c < 6; c++)
			values[c] = GetAttributeByName(state, cols[c], &nulls[c]);
	}
	reason = order_rule(order_id, exists, &status, type, payload, sequence_id,
						&user_id, &amount);
	if (reason != NULL)
		ereport(ERROR,
				(errcode(strncmp(reason, "malformed", 9) == 0 ?
						 ERRCODE_INVALID_PARAMETER_VALUE : ERRCODE_CHECK_VIOLATION),
				 errmsg("%s", reason)));
	if (!exists)
	{
		values[0] = CStringGetTextDatum(order_id);
		values[1] = CStringGetTextDatum(user_id);
		values[2] = amount;
	}
	values[3] = CStringGetTextDatum(status_names[status]);
	values[4] = Int64GetDatum(sequence_id);
	values[5] = GetAttributeByName(command, "created_at", &nulls[5]);
	for (int c = 0; c < 6; c++)
		if (c != 5)
			nulls[c] = false;

	desc = lookup_rowtype_tupdesc(get_fn_expr_rettype(fcinfo->flinfo), -1);
	{
		Datum	   *all = palloc0(sizeof(Datum) * desc->natts);
		bool	   *allnulls = palloc(sizeof(bool) * desc->natts);
		HeapTuple	tuple;

		memset(allnulls, true, sizeof(bool) * desc->natts);
		for (int c = 0; c < 6; c++)
		{
			for (int i = 0; i < desc->natts; i++)
			{
				Form_pg_attribute att = TupleDescAttr(desc, i);

				if (!att->attisdropped && strcmp(NameStr(att->attname), cols[c]) == 0)
				{
					all[i] = values[c];
					allnulls[i] = nulls[c];
				}
			}
		}
		tuple = heap_form_tuple(desc, all, allnulls);
		ReleaseTupleDesc(desc);
		PG_RETURN_DATUM(HeapTupleGetDatum(tuple));
	}
}

/*
 * Apply the order's parked commands that are now next in line.
 */
static void
fold_drain(FoldResult *fr, OrderState *o)
{
	bool		progress = true;

	while (progress)
	{
		ListCell   *lc;

		progress = false;
		foreach(lc, o->parked)
		{
			ParkedCommand *pc = lfirst(lc);

			if (pc->drained || pc->rec->sequence_id != o->version + 1)
				continue;
			/* a row-less order only moves on with its sequence 1 */
			if (!o->exists && pc->rec->sequence_id != 1)
				continue;
			pc->drained = true;
			fr->stats.unparked++;
			fold_apply(fr, o, pc->rec);
			progress = true;
		}
	}
}

/*
 * Fold one record into its order.
 */
static void
fold_record(FoldResult *fr, OrderState *o, CqrsRecord *rec)
{
	ListCell   *lc;
	ParkedCommand *pc;

	if (rec->sequence_id <= o->version)
	{
		fr->stats.skipped++;
		return;
	}
	if (rec->sequence_id == o->version + 1)
	{
		fold_apply(fr, o, rec);
		fold_drain(fr, o);
		return;
	}

	/* a gap: park it, once */
	foreach(lc, o->parked)
	{
		pc = lfirst(lc);
		if (pc->rec->sequence_id == rec->sequence_id)
		{
			fr->stats.skipped++;
			return;
		}
	}
	pc = palloc0(sizeof(ParkedCommand));
	pc->rec = rec;
	o->parked = lappend(o->parked, pc);
	fr->stats.parked++;
}


void
cqrs_batch_init(CqrsBatch *b, int capacity, int ncols, const Oid *types)
{
	Assert(ncols <= CQRS_BATCH_MAX_COLS);
	b->ncols = ncols;
	b->nrows = 0;
	b->capacity = Max(capacity, 1);
	for (int c = 0; c < ncols; c++)
	{
		b->types[c] = types[c];
		b->values[c] = palloc(sizeof(Datum) * Max(capacity, 1));
		b->nulls[c] = palloc0(sizeof(bool) * Max(capacity, 1));
	}
}

/* Make room for one more row. */
void
cqrs_batch_grow(CqrsBatch *b)
{
	if (b->nrows < b->capacity)
		return;
	b->capacity *= 2;
	for (int c = 0; c < b->ncols; c++)
	{
		b->values[c] = repalloc(b->values[c], sizeof(Datum) * b->capacity);
		b->nulls[c] = repalloc(b->nulls[c], sizeof(bool) * b->capacity);
		memset(b->nulls[c] + b->nrows, 0,
			   sizeof(bool) * (b->capacity - b->nrows));
	}
}

/* Set column c of the row being added. */
void
cqrs_batch_put(CqrsBatch *b, int c, Datum value)
{
	b->values[c][b->nrows] = value;
}

/* Set text column c of the row being added; NULL makes it null. */
void
cqrs_batch_put_text(CqrsBatch *b, int c, const char *s)
{
	if (s != NULL)
		b->values[c][b->nrows] = CStringGetTextDatum(s);
	else
		b->nulls[c][b->nrows] = true;
}

/*
 * Run sql (kept in *plan) with the arrays as its parameters, unless the
 * batch is empty; returns the number of rows processed.
 */
uint64
cqrs_batch_exec(CqrsBatch *b, SPIPlanPtr *plan, const char *sql, int expected)
{
	Datum		values[CQRS_BATCH_MAX_COLS];

	if (b->nrows == 0)
		return 0;
	if (*plan == NULL)
	{
		Oid			argtypes[CQRS_BATCH_MAX_COLS];

		for (int c = 0; c < b->ncols; c++)
			argtypes[c] = get_array_type(b->types[c]);
		(void) cqrs_keep_plan(plan, sql, b->ncols, argtypes);
	}
	for (int c = 0; c < b->ncols; c++)
		values[c] = cqrs_array(b->values[c], b->nulls[c], b->nrows,
									b->types[c]);
	return cqrs_exec(*plan, values, NULL, 0, expected);
}

/*
 * Dead letters as a relation, from the arrays $1-$8 (the last two, the
 * projection and the SQLSTATE, not on a 0.1.0 installation not updated
 * yet: DEAD_LETTER_INSERT_SQL_010), to insert.
 */
#define DEAD_LETTER_INSERT_SQL_010 \
	"INSERT INTO cqrs.dead_letter (command_id, command_type, aggregate_id," \
	" sequence_id, reason, traceparent)" \
	" SELECT * FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.uuid[])," \
	" pg_catalog.unnest($2::pg_catalog.text[])," \
	" pg_catalog.unnest($3::pg_catalog.text[])," \
	" pg_catalog.unnest($4::pg_catalog.int8[])," \
	" pg_catalog.unnest($5::pg_catalog.text[])," \
	" pg_catalog.unnest($6::pg_catalog.text[]))"
#define DEAD_LETTER_INSERT_SQL \
	"INSERT INTO cqrs.dead_letter (command_id, command_type, aggregate_id," \
	" sequence_id, reason, traceparent, projection, sqlstate)" \
	" SELECT * FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.uuid[])," \
	" pg_catalog.unnest($2::pg_catalog.text[])," \
	" pg_catalog.unnest($3::pg_catalog.text[])," \
	" pg_catalog.unnest($4::pg_catalog.int8[])," \
	" pg_catalog.unnest($5::pg_catalog.text[])," \
	" pg_catalog.unnest($6::pg_catalog.text[])," \
	" pg_catalog.unnest($7::pg_catalog.text[])," \
	" pg_catalog.unnest($8::pg_catalog.text[]))"
static const Oid dead_letter_types[8] = {UUIDOID, TEXTOID, TEXTOID, INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};

/* Add a dead letter to a batch of them (columns as DEAD_LETTER_INSERT_SQL). */
static void
batch_put_dead(CqrsBatch *b, CqrsDeadLetter *dl)
{
	cqrs_batch_put(b, 0, UUIDPGetDatum(&dl->rec->command_id));
	cqrs_batch_put_text(b, 1, dl->rec->command_type);
	cqrs_batch_put_text(b, 2, dl->rec->aggregate_id);
	cqrs_batch_put(b, 3, Int64GetDatum(dl->rec->sequence_id));
	cqrs_batch_put_text(b, 4, dl->reason);
	cqrs_batch_put_text(b, 5, dl->rec->traceparent);
	cqrs_batch_put_text(b, 6, dl->projection);
	cqrs_batch_put_text(b, 7, dl->sqlstate);
	b->nrows++;
}

/*
 * Insert dead letters; returns how many were new.
 */
int64
cqrs_write_dead(List *dead)
{
	static const char *const sql[2] = {
		DEAD_LETTER_INSERT_SQL_010 " ON CONFLICT (command_id) DO NOTHING",
		DEAD_LETTER_INSERT_SQL " ON CONFLICT (command_id) DO NOTHING"};
	int			v;
	CqrsBatch	b;
	ListCell   *lc;

	if (dead == NIL)
		return 0;
	v = cqrs_schema_020() ? 1 : 0;
	cqrs_batch_init(&b, list_length(dead), 8, dead_letter_types);
	foreach(lc, dead)
		batch_put_dead(&b, lfirst(lc));
	b.ncols = v ? 8 : 6;
	return (int64) cqrs_batch_exec(&b, &dead_plan[v], sql[v], SPI_OK_INSERT);
}

/* A dead letter in the table, by command_id. */
typedef struct StoredDeadLetter
{
	pg_uuid_t	command_id;		/* hash key */
	char	   *reason;
} StoredDeadLetter;

/*
 * Rebuild: write only the derived dead letters the table does not have
 * with the same reason (a dead letter kept keeps its failed_at), and
 * remember every derived command_id for cqrs_project_rebuild_prune().
 * Returns how many dead letters were derived.
 */
static int64
projector_write_dead_rebuild(List *dead)
{
	static const char *load_sql =
		"SELECT command_id, reason FROM cqrs.dead_letter"
		" WHERE command_id OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.uuid[])";
#define DEAD_LETTER_REWRITE_SQL \
		" ON CONFLICT (command_id) DO UPDATE SET" \
		" command_type = excluded.command_type," \
		" aggregate_id = excluded.aggregate_id," \
		" sequence_id = excluded.sequence_id, reason = excluded.reason," \
		" traceparent = excluded.traceparent, failed_at = excluded.failed_at"
	static const char *const write_sql[2] = {
		DEAD_LETTER_INSERT_SQL_010 DEAD_LETTER_REWRITE_SQL,
		DEAD_LETTER_INSERT_SQL DEAD_LETTER_REWRITE_SQL
		", projection = excluded.projection, sqlstate = excluded.sqlstate"};
#undef DEAD_LETTER_REWRITE_SQL
	int			v = cqrs_schema_020() ? 1 : 0;
	static SPIPlanPtr load_plan = NULL;
	static SPIPlanPtr write_plan[2];
	static const Oid uuid_type[1] = {UUIDOID};
	int			ndead = list_length(dead);
	CqrsBatch		ids;
	CqrsBatch		b;
	HASHCTL		hctl;
	HTAB	   *stored;
	ListCell   *lc;

	if (ndead == 0)
		return 0;

	/* remember them all, and look up those the table has */
	if (rebuild_ndead + ndead > rebuild_dead_size)
	{
		int64		size = Max(rebuild_dead_size * 2, rebuild_ndead + ndead + 1024);

		rebuild_dead = rebuild_dead == NULL ?
			MemoryContextAllocHuge(rebuild_context, sizeof(pg_uuid_t) * size) :
			repalloc_huge(rebuild_dead, sizeof(pg_uuid_t) * size);
		rebuild_dead_size = size;
	}
	cqrs_batch_init(&ids, ndead, 1, uuid_type);
	foreach(lc, dead)
	{
		CqrsDeadLetter *dl = lfirst(lc);

		rebuild_dead[rebuild_ndead++] = dl->rec->command_id;
		cqrs_batch_put(&ids, 0, UUIDPGetDatum(&dl->rec->command_id));
		ids.nrows++;
	}
	cqrs_batch_exec(&ids, &load_plan, load_sql, SPI_OK_SELECT);

	hctl.keysize = sizeof(pg_uuid_t);
	hctl.entrysize = sizeof(StoredDeadLetter);
	hctl.hcxt = CurrentMemoryContext;
	stored = hash_create("cqrs stored dead letters", Max(16, SPI_processed),
						 &hctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		bool		isnull;
		Datum		id = SPI_getbinval(tup, SPI_tuptable->tupdesc, 1, &isnull);
		StoredDeadLetter *sdl;

		sdl = hash_search(stored, DatumGetUUIDP(id), HASH_ENTER, NULL);
		sdl->reason = cqrs_spi_text(tup, SPI_tuptable->tupdesc, 2);
	}

	cqrs_batch_init(&b, ndead, 8, dead_letter_types);
	foreach(lc, dead)
	{
		CqrsDeadLetter *dl = lfirst(lc);
		StoredDeadLetter *sdl;

		sdl = hash_search(stored, &dl->rec->command_id, HASH_FIND, NULL);
		if (sdl == NULL || sdl->reason == NULL ||
			strcmp(sdl->reason, dl->reason) != 0)
			batch_put_dead(&b, dl);
	}
	b.ncols = v ? 8 : 6;
	cqrs_batch_exec(&b, &write_plan[v], write_sql[v], SPI_OK_INSERT);
	return ndead;
}

/*
 * Rebuild: delete the dead letters the replay did not derive (a command
 * a later fix made valid, or one skipped with cqrs.skip_parked() that is
 * parked again), and the rows of orders the log does not have, if the
 * read model has more rows than the replay made.  Call after the whole
 * log was replayed in rebuild mode.
 */
void
cqrs_project_rebuild_prune(void)
{
	static const char *sql =
		"DELETE FROM cqrs.dead_letter AS d WHERE NOT EXISTS"
		" (SELECT FROM pg_catalog.unnest($1::pg_catalog.uuid[]) AS u(id)"
		" WHERE u.id OPERATOR(pg_catalog.=) d.command_id)";
	Oid			argtypes[1] = {UUIDARRAYOID};
	Datum		values[1];
	Datum	   *elems;
	bool		isnull;

	Assert(rebuild_mode);
	elems = palloc(sizeof(Datum) * Max(rebuild_ndead, 1));
	for (int64 i = 0; i < rebuild_ndead; i++)
		elems[i] = UUIDPGetDatum(&rebuild_dead[i]);
	values[0] = cqrs_array(elems, NULL, (int) rebuild_ndead, UUIDOID);
	(void) cqrs_exec(cqrs_keep_plan(&rebuild_prune_plan, sql, 1, argtypes),
					 values, NULL, 0, SPI_OK_DELETE);

	/* read-write: a snapshot that sees the replay's own writes */
	if (SPI_execute("SELECT pg_catalog.count(*) FROM cqrs.read_model",
					false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not count the rows of cqrs.read_model");
	if (DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
									SPI_tuptable->tupdesc, 1, &isnull)) <=
		rebuild_nrows)
		return;
	if (SPI_execute("DELETE FROM cqrs.read_model AS r"
					" WHERE NOT EXISTS (SELECT FROM cqrs.command_log AS l"
					" WHERE l.aggregate_id OPERATOR(pg_catalog.=) r.order_id)"
					" RETURNING r.order_id",
					false, 0) != SPI_OK_DELETE_RETURNING)
		elog(ERROR, "could not delete the rows of orders not in the log");
	for (uint64 i = 0; i < SPI_processed; i++)
		cqrs_redis_stale(cqrs_spi_text(SPI_tuptable->vals[i],
									   SPI_tuptable->tupdesc, 1));
	cqrs_redis_flush_stale();
}

/*
 * Add the order's read-model row to a batch of rows, and to what goes to
 * Redis once the batch commits.
 */
static void
batch_put_order(CqrsBatch *b, OrderState *o)
{
	cqrs_batch_put_text(b, 0, o->order_id);
	cqrs_batch_put_text(b, 1, o->user_id);
	cqrs_batch_put(b, 2, o->total_amount);
	cqrs_batch_put_text(b, 3, status_names[o->status]);
	cqrs_batch_put(b, 4, Int64GetDatum(o->version));
	b->nrows++;
	cqrs_redis_row(o->order_id, o->user_id, o->total_amount,
				   status_names[o->status], o->version);
}

/* Is the folded row the row the table had (rebuild)? */
static bool
order_unchanged(OrderState *o)
{
	return o->stored &&
		o->old_version == o->version && o->old_status == o->status &&
		strcmp(o->old_user_id, o->user_id) == 0 &&
		DatumGetBool(DirectFunctionCall2(numeric_eq, o->old_amount,
										 o->total_amount));
}

/*
 * Write the fold back: read-model rows, parked and unparked commands,
 * dead letters.
 *
 * Only the projector writes the read model, and the batch loaded every row
 * it touches: new rows are plain inserts (no speculative insertion
 * needed), known rows plain updates that never move a row backwards.  A
 * row someone else inserted meanwhile makes the insert fail, and that
 * command is dead-lettered.  A rebuild writes the rows that differ from
 * the table, every column, and deletes those its fold did not make.
 */
static void
projector_write(FoldResult *fr, int norders)
{
	/* Read-model rows as a relation "u", from the arrays $1-$5. */
#define ROW_ARRAYS_SQL \
	" FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[])," \
	" pg_catalog.unnest($2::pg_catalog.text[])," \
	" pg_catalog.unnest($3::pg_catalog.numeric[])," \
	" pg_catalog.unnest($4::pg_catalog.text[])," \
	" pg_catalog.unnest($5::pg_catalog.int8[]))" \
	" AS u(order_id, user_id, total_amount, status, version)"
	static const char *insert_sql =
		"INSERT INTO cqrs.read_model"
		" (order_id, user_id, total_amount, status, version, updated_at)"
		" SELECT u.order_id, u.user_id, u.total_amount, u.status, u.version,"
		" pg_catalog.now()" ROW_ARRAYS_SQL;
	static const char *update_sql =
		"UPDATE cqrs.read_model AS r SET status = u.status,"
		" version = u.version, updated_at = pg_catalog.now()" ROW_ARRAYS_SQL
		" WHERE r.order_id OPERATOR(pg_catalog.=) u.order_id"
		" AND r.version OPERATOR(pg_catalog.<) u.version";
	static const char *rebuild_update_sql =
		"UPDATE cqrs.read_model AS r SET user_id = u.user_id,"
		" total_amount = u.total_amount, status = u.status,"
		" version = u.version, updated_at = pg_catalog.now()" ROW_ARRAYS_SQL
		" WHERE r.order_id OPERATOR(pg_catalog.=) u.order_id";
#undef ROW_ARRAYS_SQL
	static const char *delete_sql =
		"DELETE FROM cqrs.read_model"
		" WHERE order_id OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.text[])";
	static SPIPlanPtr rebuild_update_plan = NULL;
	static SPIPlanPtr delete_plan = NULL;
	static const Oid row_types[5] = {TEXTOID, TEXTOID, NUMERICOID, TEXTOID, INT8OID};
	CqrsBatch		inserts,
				updates,
				gone,
				park,
				unpark;
	HASH_SEQ_STATUS seq;
	OrderState *o;
	ListCell   *lc;

	cqrs_batch_init(&inserts, norders, 5, row_types);
	cqrs_batch_init(&updates, norders, 5, row_types);
	cqrs_batch_init(&gone, norders, 1, row_types);
	memset(&park, 0, sizeof(park));
	memset(&unpark, 0, sizeof(unpark));

	hash_seq_init(&seq, fr->orders);
	while ((o = hash_seq_search(&seq)) != NULL)
	{
		foreach(lc, o->parked)
		{
			ParkedCommand *pc = lfirst(lc);
			CqrsRecord *rec = pc->rec;

			if (pc->drained && pc->stored)
				cqrs_unpark_put(&unpark, rec);
			else if (!pc->drained && !pc->stored)
				cqrs_parked_put(&park, rec, o->version + 1);
		}

		if (rebuild_mode)
		{
			if (o->exists)
				rebuild_nrows++;
			if (!o->exists)
			{
				if (o->stored)
				{
					cqrs_batch_put_text(&gone, 0, o->order_id);
					gone.nrows++;
					cqrs_redis_stale(o->order_id);
				}
			}
			else if (!order_unchanged(o))
				batch_put_order(o->stored ? &updates : &inserts, o);
		}
		else if (o->dirty && o->exists)
			batch_put_order(o->stored ? &updates : &inserts, o);
	}

	cqrs_batch_exec(&inserts, &insert_plan, insert_sql, SPI_OK_INSERT);
	if (rebuild_mode)
		cqrs_batch_exec(&updates, &rebuild_update_plan, rebuild_update_sql,
				   SPI_OK_UPDATE);
	else
		cqrs_batch_exec(&updates, &update_plan, update_sql, SPI_OK_UPDATE);
	cqrs_batch_exec(&gone, &delete_plan, delete_sql, SPI_OK_DELETE);
	cqrs_parked_store(&park);
	cqrs_parked_remove(&unpark);

	if (rebuild_mode)
		fr->stats.dead += projector_write_dead_rebuild(fr->dead);
	else
		fr->stats.dead += cqrs_write_dead(fr->dead);
	cqrs_redis_flush_stale();
}

/*
 * Does cqrs.parked have any row?
 */
static bool
projector_parked_exists(void)
{
	static const char *sql = "SELECT EXISTS (SELECT FROM cqrs.parked)";
	bool		isnull;

	(void) cqrs_exec(cqrs_keep_plan(&parked_exists_plan, sql, 0, NULL),
						 NULL, NULL, 0, SPI_OK_SELECT);
	return DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
									  SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * May cqrs.parked have rows?  False only while it is known to be empty.
 */
bool
cqrs_parked_maybe(void)
{
	return parked_known != 0;
}

/*
 * A fold parked and unparked that many commands: learn what cqrs.parked
 * holds now.
 */
void
cqrs_parked_note(int64 parked, int64 unparked)
{
	if (parked > 0)
		parked_known = 1;
	else if (parked_known == -1 || unparked > 0)
		parked_known = projector_parked_exists() ? 1 : 0;
}

/*
 * Forget what is known about cqrs.parked: the transaction that learnt it
 * rolled back.
 */
void
cqrs_project_forget(void)
{
	parked_known = -1;
}

/*
 * Fold and write records[lo, hi) in the current (sub)transaction.
 *
 * With "trust_creates", an order whose first command in the range has
 * sequence 1 is taken to have no read-model row, and not looked up: under a
 * load of new orders that lookup is a fifth of the projector's work.  Its
 * row can only exist if that command was applied already (the catch-up
 * from the log overlapping the slot, or a row written by hand), and then
 * inserting the row fails with a unique violation, and projector_range()
 * splits the range into halves that look every row up.
 */
static void
projector_fold(CqrsRecord *records, int lo, int hi, CqrsApplyStats *stats,
			   bool trust_creates)
{
	FoldResult	fr;
	int			norders;

	memset(&fr, 0, sizeof(fr));
	fr.orders = cqrs_id_hash_create("cqrs batch orders", hi - lo, sizeof(OrderState));

	for (int i = lo; i < hi; i++)
	{
		CqrsRecord *rec = &records[i];
		bool		found;
		OrderState *o;

		if (rec->aggregate_id == NULL)
		{
			current_record = rec;
			fold_dead(&fr, rec, "command without an aggregate_id");
			continue;
		}
		o = hash_search(fr.orders, &rec->aggregate_id, HASH_ENTER, &found);
		if (!found)
		{
			memset(((char *) o) + sizeof(char *), 0,
				   sizeof(OrderState) - sizeof(char *));
			o->order_id = rec->aggregate_id;
			o->min_sequence = rec->sequence_id;
		}
		o->min_sequence = Min(o->min_sequence, rec->sequence_id);
		o->lookup = !(trust_creates && o->min_sequence == 1);
	}
	norders = hash_get_num_entries(fr.orders);
	if (norders > 0)
	{
		projector_load_rows(fr.orders, norders);
		if (parked_known != 0)
			projector_load_parked(fr.orders, norders);
	}

	for (int i = lo; i < hi; i++)
	{
		CqrsRecord *rec = &records[i];
		OrderState *o;

		if (rec->aggregate_id == NULL)
			continue;
		current_record = rec;
		o = hash_search(fr.orders, &rec->aggregate_id, HASH_FIND, NULL);
		fold_record(&fr, o, rec);
	}
	current_record = &records[hi - 1];

	projector_write(&fr, norders);

	cqrs_stats_add(stats, &fr.stats);

	cqrs_parked_note(fr.stats.parked, fr.stats.unparked);
}

/*
 * Can a single command be to blame for this error?  Only errors about the
 * data a command carries (bad values, constraint or trigger rejections)
 * are worth splitting the batch for.  Everything else (serialization
 * failures, deadlocks, lock or statement timeouts, out of memory, I/O,
 * missing or inaccessible objects) is the pipeline's, and the whole batch
 * is retried with backoff instead of dead-lettering good commands.
 */
bool
cqrs_blames_command(int sqlerrcode)
{
	switch (ERRCODE_TO_CATEGORY(sqlerrcode))
	{
		case ERRCODE_TO_CATEGORY(ERRCODE_DATA_EXCEPTION):
		case ERRCODE_TO_CATEGORY(ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION):
		case ERRCODE_TO_CATEGORY(ERRCODE_RAISE_EXCEPTION):
		case ERRCODE_TO_CATEGORY(ERRCODE_SQL_ROUTINE_EXCEPTION):
		case ERRCODE_TO_CATEGORY(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION):
		case ERRCODE_TO_CATEGORY(ERRCODE_TRIGGERED_ACTION_EXCEPTION):
			return true;
		default:
			return false;
	}
}

/*
 * Dead-letter one command that fails on its own, and move its order past
 * it when it was next in line.
 */
static void
projector_poison(CqrsRecord *rec, const char *message, CqrsApplyStats *stats)
{
	static const char *bump_sql =
		"UPDATE cqrs.read_model SET version = $2, updated_at = pg_catalog.now()"
		" WHERE order_id OPERATOR(pg_catalog.=) $1"
		" AND version OPERATOR(pg_catalog.=) ($2 OPERATOR(pg_catalog.-) 1)";
	Oid			bump_types[2] = {TEXTOID, INT8OID};
	CqrsDeadLetter dl = {rec, unconstify(char *, message), NULL, NULL};

	ereport(LOG,
			(errmsg("cqrs projector dead-lettered command %s: %s",
					DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(&rec->command_id))),
					message),
			 rec->traceparent ? errdetail("traceparent %s", rec->traceparent) : 0));

	stats->dead += cqrs_write_dead(list_make1(&dl));
	stats->applied++;
	stats->poisoned++;

	if (rec->aggregate_id != NULL)
	{
		Datum		values[2];

		values[0] = CStringGetTextDatum(rec->aggregate_id);
		values[1] = Int64GetDatum(rec->sequence_id);
		(void) cqrs_exec(cqrs_keep_plan(&bump_plan, bump_sql, 2, bump_types),
							 values, NULL, 0, SPI_OK_UPDATE);
		if (SPI_processed > 0)
		{
			cqrs_redis_stale(rec->aggregate_id);
			cqrs_redis_flush_stale();
		}
	}
}

/*
 * Apply records[lo, hi) in a subtransaction; on a non-transient error,
 * split until the failing command is alone, and dead-letter it.
 */
typedef struct FoldArgs
{
	CqrsRecord *records;
	int			lo;
	int			hi;
	bool		trust_creates;
	CqrsApplyStats *stats;
} FoldArgs;

static void
projector_fold_args(void *arg)
{
	FoldArgs   *a = arg;

	projector_fold(a->records, a->lo, a->hi, a->stats, a->trust_creates);
}

static void
projector_range(CqrsRecord *records, int lo, int hi, CqrsApplyStats *stats,
				bool trust_creates)
{
	CqrsApplyStats local;
	/* a range of one is not split, so it must not trust either */
	FoldArgs	args = {records, lo, hi, trust_creates && hi - lo > 1, &local};
	ErrorData  *edata;
	int			redis_mark = cqrs_redis_mark();

	memset(&local, 0, sizeof(local));
	current_batch_size = hi - lo;

	edata = cqrs_try_subtransaction(projector_fold_args, &args);
	if (edata != NULL)
	{
		cqrs_project_forget();
		cqrs_redis_forget(redis_mark);
		if (rebuild_mode || !cqrs_blames_command(edata->sqlerrcode))
			ReThrowError(edata);

		memset(&local, 0, sizeof(local));
		if (hi - lo == 1)
		{
			current_batch_size = 1;
			current_record = &records[lo];
			projector_poison(&records[lo], edata->message, &local);
		}
		else
		{
			int			mid = lo + (hi - lo) / 2;

			/* the halves look every row up (see projector_fold) */
			projector_range(records, lo, mid, &local, false);
			projector_range(records, mid, hi, &local, false);
		}
	}
	cqrs_stats_add(stats, &local);
}

/*
 * Is this one of the built-in orders commands?
 */
bool
cqrs_is_order_command(const char *type)
{
	return strcmp(type, "CREATE_ORDER") == 0 ||
		strcmp(type, "SHIP_ORDER") == 0 ||
		strcmp(type, "CANCEL_ORDER") == 0;
}

/*
 * Apply a batch of decoded commands in the current transaction, with SPI
 * connected.  Errors that are not the batch's fault propagate.
 */
void
cqrs_project(CqrsRecord *records, int nrecords, CqrsApplyStats *stats)
{
	ErrorContextCallback errcallback;

	/*
	 * Commands of declared types go to the declared projections (aggregate
	 * ids are one namespace, so none of them is about an order); a rebuild
	 * of the orders leaves them alone.
	 */
	for (int i = 0; i < nrecords; i++)
	{
		if (records[i].command_type != NULL &&
			!cqrs_is_order_command(records[i].command_type))
		{
			CqrsRecord *orders = palloc(sizeof(CqrsRecord) * nrecords);
			CqrsRecord *declared = palloc(sizeof(CqrsRecord) * nrecords);
			int			kept = 0;
			int			ndeclared = 0;

			for (int j = 0; j < nrecords; j++)
			{
				if (records[j].command_type == NULL ||
					cqrs_is_order_command(records[j].command_type))
					orders[kept++] = records[j];
				else
					declared[ndeclared++] = records[j];
			}
			if (rebuild_mode)
				stats->skipped += ndeclared;
			else
				cqrs_project_declared(declared, ndeclared, stats);
			records = orders;
			nrecords = kept;
			break;
		}
	}
	if (nrecords == 0)
		return;

	errcallback.callback = projector_error_context;
	errcallback.arg = NULL;
	errcallback.previous = error_context_stack;
	error_context_stack = &errcallback;

	projector_range(records, 0, nrecords, stats, !rebuild_mode);

	error_context_stack = errcallback.previous;
	current_record = NULL;
}

/*
 * Record the position of slot_name, in the current transaction.
 */
void
cqrs_save_offset(const char *slot_name, XLogRecPtr lsn)
{
	static const char *sql =
		"INSERT INTO cqrs.offset_tracking (slot_name, last_lsn, updated_at)"
		" VALUES ($1, $2, pg_catalog.now())"
		" ON CONFLICT (slot_name) DO UPDATE SET last_lsn = excluded.last_lsn,"
		" updated_at = excluded.updated_at";
	Oid			argtypes[2] = {TEXTOID, PG_LSNOID};
	Datum		values[2];

	values[0] = CStringGetTextDatum(slot_name);
	values[1] = LSNGetDatum(lsn);
	(void) cqrs_exec(cqrs_keep_plan(&offset_plan, sql, 2, argtypes),
						 values, NULL, 0, SPI_OK_INSERT);
}

/*
 * The recorded position of slot_name, or InvalidXLogRecPtr.
 */
XLogRecPtr
cqrs_load_offset(const char *slot_name)
{
	static const char *sql =
		"SELECT last_lsn FROM cqrs.offset_tracking"
		" WHERE slot_name OPERATOR(pg_catalog.=) $1";
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1];
	bool		isnull;

	values[0] = CStringGetTextDatum(slot_name);
	(void) cqrs_exec(cqrs_keep_plan(&load_offset_plan, sql, 1, argtypes),
						 values, NULL, 0, SPI_OK_SELECT);
	if (SPI_processed == 0)
		return InvalidXLogRecPtr;
	return DatumGetLSN(SPI_getbinval(SPI_tuptable->vals[0],
									 SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * Copy a record and what it points to into the current memory context.
 */
static void
projector_copy_record(CqrsRecord *dst, const CqrsRecord *src)
{
	*dst = *src;
	dst->command_type = src->command_type ? pstrdup(src->command_type) : NULL;
	dst->aggregate_id = src->aggregate_id ? pstrdup(src->aggregate_id) : NULL;
	dst->traceparent = src->traceparent ? pstrdup(src->traceparent) : NULL;
	if (src->payload)
	{
		dst->payload = palloc(VARSIZE(src->payload));
		memcpy(dst->payload, src->payload, VARSIZE(src->payload));
	}
}

/*
 * Switch the fold of this process into (or out of) rebuild mode; see
 * rebuild_mode.
 */
void
cqrs_project_rebuild_mode(bool on)
{
	rebuild_mode = on;
	rebuild_context = CurrentMemoryContext;
	rebuild_dead = NULL;
	rebuild_ndead = 0;
	rebuild_dead_size = 0;
	rebuild_nrows = 0;
}

/* cqrs_project() as a CqrsFoldFn. */
static void
projector_project_chunk(CqrsRecord *records, int n, void *arg)
{
	cqrs_project(records, n, (CqrsApplyStats *) arg);
}

/*
 * Fold the whole command log into the read model, in the current
 * transaction: the catch-up after a slot is created (first start, or a
 * lost slot).  Commands already applied are skipped by the version rule,
 * so this is safe to run over a read model of any age.  Returns the
 * number of log rows read.
 */
int64
cqrs_project_log(CqrsApplyStats *stats)
{
	static const char *sql =
		"SELECT log_id, command_id, command_type, aggregate_id, sequence_id,"
		" payload, traceparent, created_at FROM cqrs.command_log"
		" ORDER BY aggregate_id, sequence_id";

	return cqrs_scan_log(sql, 0, NULL, NULL, rebuild_mode,
						 projector_project_chunk, stats);
}

/*
 * Read the commands sql selects (the columns of cqrs_project_log()'s
 * query, ordered by aggregate and sequence) in chunks, and pass each
 * chunk to fold.  With "whole_aggregates", an aggregate's commands are
 * never split between two chunks.  Returns the number of rows read.
 */
int64
cqrs_scan_log(const char *sql, int nargs, Oid *argtypes, Datum *values,
			  bool whole_aggregates, CqrsFoldFn fold, void *arg)
{
	SPIPlanPtr	plan;
	Portal		portal;
	int64		total = 0;
	MemoryContext chunk_context[2];
	int			cur = 0;
	MemoryContext oldcontext;
	CqrsRecord *carry = NULL;
	int			ncarry = 0;

	plan = SPI_prepare(sql, nargs, argtypes);
	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed for \"%s\": %s",
			 sql, SPI_result_code_string(SPI_result));
	/* read-write: a snapshot taken now, after the caller's locks */
	portal = SPI_cursor_open("cqrs_catch_up", plan, values, NULL, false);
	for (int i = 0; i < 2; i++)
		chunk_context[i] = AllocSetContextCreate(CurrentMemoryContext,
												 "cqrs catch-up chunk",
												 ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		CqrsRecord *records;
		int			n;
		int			fetched;
		int			upto;

		SPI_cursor_fetch(portal, true, 50000);
		n = fetched = (int) SPI_processed;
		total += fetched;
		if (n == 0 && ncarry == 0)
			break;

		oldcontext = MemoryContextSwitchTo(chunk_context[cur]);
		records = palloc0(sizeof(CqrsRecord) * (ncarry + n));
		for (int i = 0; i < ncarry; i++)
			projector_copy_record(&records[i], &carry[i]);
		for (int i = 0; i < n; i++)
		{
			CqrsRecord *rec = &records[ncarry + i];
			HeapTuple	tup = SPI_tuptable->vals[i];
			TupleDesc	desc = SPI_tuptable->tupdesc;
			bool		isnull;
			Datum		d;

			d = SPI_getbinval(tup, desc, 1, &isnull);
			rec->log_id = isnull ? 0 : DatumGetInt64(d);
			d = SPI_getbinval(tup, desc, 2, &isnull);
			if (!isnull)
				memcpy(&rec->command_id, DatumGetUUIDP(d), sizeof(pg_uuid_t));
			rec->command_type = cqrs_spi_text(tup, desc, 3);
			rec->aggregate_id = cqrs_spi_text(tup, desc, 4);
			d = SPI_getbinval(tup, desc, 5, &isnull);
			rec->sequence_id = isnull ? 0 : DatumGetInt64(d);
			d = SPI_getbinval(tup, desc, 6, &isnull);
			rec->payload = isnull ? NULL : DatumGetJsonbPCopy(d);
			rec->traceparent = cqrs_spi_text(tup, desc, 7);
			d = SPI_getbinval(tup, desc, 8, &isnull);
			rec->created_at = isnull ? 0 : DatumGetTimestampTz(d);
		}
		SPI_freetuptable(SPI_tuptable);
		n += ncarry;

		/*
		 * A rebuild folds every order from nothing, so an order's commands
		 * must all be in one chunk: hold back the last order, whose next
		 * commands may be in the next fetch (all of the chunk, when it is
		 * one order).
		 */
		upto = n;
		if (whole_aggregates && fetched > 0)
		{
			while (upto > 0 &&
				   strcmp(records[upto - 1].aggregate_id,
						  records[n - 1].aggregate_id) == 0)
				upto--;
		}
		if (upto > 0)
			fold(&records[0], upto, arg);
		carry = &records[upto];
		ncarry = n - upto;
		MemoryContextSwitchTo(oldcontext);

		/* the carried records live in this chunk's context: keep it */
		cur = 1 - cur;
		MemoryContextReset(chunk_context[cur]);
	}
	SPI_cursor_close(portal);
	SPI_freeplan(plan);
	for (int i = 0; i < 2; i++)
		MemoryContextDelete(chunk_context[i]);
	return total;
}

/*
 * Take the projection lock for the rest of the transaction: every batch
 * of the projector holds it, and so do the repair functions and
 * cqrs.rebuild(), so none of them interleaves with a batch.  Without
 * "wait", returns false at once when someone else holds it.
 */
bool
cqrs_lock_projection(bool wait)
{
	static uint64 repairs_seen = 0;
	LOCKTAG		tag;
	uint64		repairs;

	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, 0, 0, CQRS_APPLY_LOCK_SPACE);
	if (LockAcquire(&tag, ExclusiveLock, false, !wait) == LOCKACQUIRE_NOT_AVAIL)
		return false;

	/*
	 * A definition committed by whoever held the lock before (a projection
	 * created and filled) must be seen by what this holder folds next.
	 */
	AcceptInvalidationMessages();

	/*
	 * What this process knows of cqrs.parked holds only while nobody else
	 * folds: a repair or rebuild in another session may have parked or
	 * unparked commands since.  (They bump the generation while holding
	 * this lock, so the new value is visible now.)
	 */
	if (cqrs_shared != NULL)
	{
		repairs = pg_atomic_read_u64(&cqrs_shared->repair_generation);
		if (repairs != repairs_seen)
		{
			cqrs_project_forget();
			repairs_seen = repairs;
		}
	}
	return true;
}
