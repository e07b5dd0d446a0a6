/*-------------------------------------------------------------------------
 *
 * projection.c
 *		Projections declared in SQL: cqrs.projection, the functions that
 *		manage it, and the fold of declared commands into their tables.
 *
 * A declared projection follows one aggregate type.  Its target table
 * has one row per aggregate, keyed by a text column holding the aggregate
 * id, and its apply function (state target, command cqrs.command_log)
 * RETURNS target is folded over each aggregate's commands in sequence
 * order, as an aggregate's state transition function is: the state is
 * the aggregate's row (NULL before its first command), a NULL result
 * deletes the row.
 *
 * A batch is folded the way the orders are (projector.c): the rows and
 * versions of the aggregates it touches are loaded with one statement per
 * projection, the apply functions are called through fmgr in memory, and
 * each projection's changed rows are written back with one INSERT ... ON
 * CONFLICT and one DELETE, its versions with one more; never a statement
 * per row.  The version of each (projection, aggregate) is kept in
 * cqrs.projection_version, in the same transaction, so redelivered
 * commands are skipped and a deleted row keeps its place in the sequence.
 * A command past a gap in its aggregate's sequence is parked in
 * cqrs.parked until the gap fills, as an order's is.
 *
 * The apply function runs, and the target table is read and written, as
 * the role that declared the projection, with the restrictions of an
 * operation run on another role's behalf (SECURITY_RESTRICTED_OPERATION):
 * never as the projector's superuser.  Statements on the target are built
 * once per definition from the catalog's names, each quoted
 * (quote_identifier), as ri_triggers.c builds its queries; no value is
 * ever spliced into them.
 *
 * An error raised by an apply function makes the batch fold again with
 * each call in a subtransaction of its own; the failing command is
 * dead-lettered with the projection's name, the message and the SQLSTATE,
 * the projection's version moves past it, and the other projections still
 * apply it.  An error of the target table refusing a row splits the batch
 * in halves until the command that fails alone is found.
 *
 * pg_dump dumps a projection's table (the user's) and its versions (a
 * configuration table) from one snapshot, but a restore loads them, the
 * definition and the log in any order (pg_restore -j), while the new
 * server's projector runs.  Each projection's versions include a marker
 * row (aggregate id '', which no aggregate has), written with the
 * definition: until it is there, the projection is not "ready", and the
 * projector leaves it alone, so that it never folds restored commands
 * into a table whose versions have not arrived yet.  Everything a dump
 * carries is already in its versions.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/relation.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_attribute.h"
#include "catalog/pg_class.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/regproc.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"

#include "cqrs.h"

PG_FUNCTION_INFO_V1(create_projection);
PG_FUNCTION_INFO_V1(drop_projection);
PG_FUNCTION_INFO_V1(rebuild_projection);
PG_FUNCTION_INFO_V1(verify_projection);

/* A declared projection, as the fold uses it. */
typedef struct Projection
{
	char		name[NAMEDATALEN];
	char		aggregate_type[NAMEDATALEN];
	Oid			target;
	Oid			rowtype;
	AttrNumber	key_attno;
	Oid			apply;
	Oid			owner;
	bool		ready;			/* its versions are there (see head) */
	FmgrInfo	flinfo;
	char	   *load_sql;
	char	   *insert_sql;
	char	   *upsert_sql;
	char	   *delete_sql;
	SPIPlanPtr	load_plan;
	SPIPlanPtr	insert_plan;
	SPIPlanPtr	upsert_plan;
	SPIPlanPtr	delete_plan;
} Projection;

/* A declared command type and the aggregate type it acts on. */
typedef struct CommandAggregate
{
	char		name[NAMEDATALEN];	/* hash key */
	char		aggregate_type[NAMEDATALEN];
} CommandAggregate;

/* The definitions, read once per process until one changes. */
static MemoryContext defs_context = NULL;
static Projection *projections = NULL;
static int	nprojections = 0;
static HTAB *command_aggregates = NULL;
static bool defs_valid = false;
static TupleDesc log_desc = NULL;	/* cqrs.command_log's row type */

/* defs_aggregate_type()'s last answer; forgotten with the definitions */
static char last_command[NAMEDATALEN];
static CommandAggregate *last_aggregate = NULL;

/* Columns of cqrs.command_log's row type, as the apply function sees them */
static AttrNumber log_attnums[NUM_COLS];

/* One declared projection's state of one aggregate in a fold. */
typedef struct ProjState
{
	Datum		old_row;		/* rebuild: the stored row, to compare */
	Datum		row;			/* composite datum, when exists */
	bool		exists;
	bool		stored;			/* the table had a row before the fold */
	bool		dirty;
	int64		version;
	int64		stored_version; /* -1: no row in cqrs.projection_version */
} ProjState;

typedef struct Parked
{
	CqrsRecord *rec;
	bool		stored;			/* in cqrs.parked */
	bool		drained;		/* applied, or behind every version */
} Parked;

/* One aggregate touched by a fold. */
typedef struct ProjAggState
{
	const char *aggregate_id;	/* hash key (a pointer to the string) */
	const char *aggregate_type;
	int64		min_sequence;	/* lowest sequence of the fold's commands */
	bool		lookup;			/* look its rows and versions up */
	List	   *parked;			/* Parked * */
	ProjState	ps[FLEXIBLE_ARRAY_MEMBER];	/* by projection index */
} ProjAggState;

/* A (command, projection) the fold must dead-letter instead of apply. */
typedef struct Failure
{
	pg_uuid_t	command_id;
	int			projection;		/* index, or -1: every projection */
	char	   *message;
	char	   *sqlstate;
} Failure;

/* What kind of fold. */
typedef enum FoldMode
{
	FOLD_STREAM,				/* batches and catch-up: load, fold, write */
	FOLD_REBUILD,				/* from nothing: fold, write what differs */
	FOLD_VERIFY					/* fold from nothing, compare, write nothing */
} FoldMode;

typedef struct Fold
{
	FoldMode	mode;
	int			only;			/* fold this projection only, or -1 */
	List	   *failures;		/* Failure * */
	bool		careful;		/* each apply call in a subtransaction */
	bool		trust;			/* an aggregate whose sequence 1 the fold has
								 * is new: its rows are not looked up */
	CqrsApplyStats stats;
	/* verify: where the differences go */
	Tuplestorestate *out;
	TupleDesc	out_desc;
	int64		nfolded;		/* aggregates folded */
	FmgrInfo	image_eq;		/* rebuild: record_image_eq(), to compare */
	/* rebuild: the ids of every aggregate folded, in keep_context */
	MemoryContext keep_context;
	Datum	   *kept;
	int64		nkept;
	int64		kept_size;
} Fold;

/*
 * The projection whose code runs, for error attribution (-1: none), and
 * whether that is its apply function (else its table).
 */
static int	current_projection = -1;
static bool current_in_apply = false;
static CqrsRecord *current_record = NULL;

static bool fold_blames_command(int sqlerrcode);
static int	projection_lookup(const char *name);

/*
 * The catalog tables the definitions come from, as of the last load (not
 * spi.c's cache: its own callback may have forgotten them by the time
 * this one runs).
 */
static Oid	defs_relids[3];

static void
defs_invalidate(Datum arg, Oid relid)
{
	if (!defs_valid)
		return;
	if (relid == InvalidOid)
	{
		defs_valid = false;
		return;
	}
	for (int i = 0; i < nprojections; i++)
		if (projections[i].target == relid)
			defs_valid = false;
	for (int i = 0; i < (int) lengthof(defs_relids); i++)
		if (relid == defs_relids[i])
			defs_valid = false;
}

/* an apply function replaced or dropped, a type changed */
static void
defs_syscache_changed(Datum arg, int cacheid, uint32 hashvalue)
{
	defs_valid = false;
}

/*
 * The statements on a projection's target, from the catalog's names.
 */
static void
defs_build_sql(Projection *p, Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);
	char	   *target = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
													RelationGetRelationName(rel));
	const char *key = quote_identifier(NameStr(TupleDescAttr(desc, p->key_attno - 1)->attname));
	StringInfoData cols;
	StringInfoData sets;

	initStringInfo(&cols);
	initStringInfo(&sets);
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		const char *col;

		if (att->attisdropped || att->attgenerated)
			continue;
		col = quote_identifier(NameStr(att->attname));
		appendStringInfo(&cols, "%s%s", cols.len > 0 ? ", " : "", col);
		if (att->attnum != p->key_attno)
			appendStringInfo(&sets, "%s%s = excluded.%s",
							 sets.len > 0 ? ", " : "", col, col);
	}
	p->load_sql = psprintf("SELECT t.%s, t FROM %s AS t"
						   " WHERE t.%s OPERATOR(pg_catalog.=) ANY ($1)",
						   key, target, key);
	p->insert_sql = psprintf("INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE"
							 " SELECT %s FROM pg_catalog.unnest($1)",
							 target, cols.data, cols.data);
	p->upsert_sql = psprintf("INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE"
							 " SELECT %s FROM pg_catalog.unnest($1)"
							 " ON CONFLICT (%s) DO %s%s",
							 target, cols.data, cols.data, key,
							 sets.len > 0 ? "UPDATE SET " : "NOTHING",
							 sets.data);
	p->delete_sql = psprintf("DELETE FROM %s WHERE %s OPERATOR(pg_catalog.=) ANY ($1)",
							 target, key);
}

/*
 * Read the definitions again: the declared projections, and which
 * aggregate type each declared command type acts on.
 */
static void
defs_load(void)
{
	static bool registered = false;
	CqrsOwnerScope scope;
	HASHCTL		ctl;
	Oid			log_type;

	if (defs_valid)
		return;
	if (!registered)
	{
		CacheRegisterRelcacheCallback(defs_invalidate, (Datum) 0);
		CacheRegisterSyscacheCallback(PROCOID, defs_syscache_changed, (Datum) 0);
		CacheRegisterSyscacheCallback(TYPEOID, defs_syscache_changed, (Datum) 0);
		registered = true;
	}
	if (defs_context == NULL)
		defs_context = AllocSetContextCreate(CacheMemoryContext,
											 "cqrs projections",
											 ALLOCSET_SMALL_SIZES);
	for (int i = 0; i < nprojections; i++)
	{
		if (projections[i].load_plan)
			SPI_freeplan(projections[i].load_plan);
		if (projections[i].insert_plan)
			SPI_freeplan(projections[i].insert_plan);
		if (projections[i].upsert_plan)
			SPI_freeplan(projections[i].upsert_plan);
		if (projections[i].delete_plan)
			SPI_freeplan(projections[i].delete_plan);
	}
	MemoryContextReset(defs_context);
	projections = NULL;
	nprojections = 0;
	command_aggregates = NULL;
	last_aggregate = NULL;
	log_desc = NULL;
	/*
	 * From now on, an invalidation makes this load stale.  Each statement
	 * below reads with a new snapshot (not read-only): a definition this
	 * transaction just wrote is seen.
	 */
	defs_valid = true;

	defs_relids[0] = cqrs_relid(CQRS_REL_PROJECTION);
	defs_relids[1] = cqrs_relid(CQRS_REL_COMMAND_TYPE);
	defs_relids[2] = cqrs_relid(CQRS_REL_COMMAND_LOG);
	cqrs_spi_connect_as_owner(&scope);
	if (SPI_execute("SELECT name, aggregate_type,"
					" CAST(pg_catalog.to_regclass(target) AS pg_catalog.oid),"
					" key_column,"
					" CAST(pg_catalog.to_regprocedure(apply_function) AS pg_catalog.oid),"
					" CAST(owner AS pg_catalog.oid), target, apply_function,"
					" EXISTS (SELECT FROM pg_catalog.pg_roles AS r"
					"         WHERE r.oid OPERATOR(pg_catalog.=) CAST(owner AS pg_catalog.oid)),"
					" EXISTS (SELECT FROM cqrs.projection_version AS v"
					"         WHERE v.projection OPERATOR(pg_catalog.=) p.name"
					"         AND v.aggregate_id OPERATOR(pg_catalog.=) '')"
					" FROM cqrs.projection AS p WHERE NOT builtin ORDER BY name",
					false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read cqrs.projection");
	projections = MemoryContextAllocZero(defs_context,
										 sizeof(Projection) * Max(SPI_processed, 1));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		Projection *p = &projections[nprojections];
		bool		isnull;
		Datum		d;
		Relation	rel;
		MemoryContext old;

		strlcpy(p->name, cqrs_spi_text(tup, desc, 1), NAMEDATALEN);
		strlcpy(p->aggregate_type, cqrs_spi_text(tup, desc, 2), NAMEDATALEN);
		d = SPI_getbinval(tup, desc, 3, &isnull);
		if (isnull)
		{
			defs_valid = false;
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_TABLE),
					 errmsg("target table %s of projection \"%s\" does not exist",
							cqrs_spi_text(tup, desc, 7), p->name),
					 errhint("Create it again, or drop the projection with cqrs.drop_projection().")));
		}
		p->target = DatumGetObjectId(d);
		d = SPI_getbinval(tup, desc, 5, &isnull);
		if (isnull)
		{
			defs_valid = false;
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_FUNCTION),
					 errmsg("apply function %s of projection \"%s\" does not exist",
							cqrs_spi_text(tup, desc, 8), p->name),
					 errhint("Create it again, or drop the projection with cqrs.drop_projection().")));
		}
		p->apply = DatumGetObjectId(d);
		p->owner = DatumGetObjectId(SPI_getbinval(tup, desc, 6, &isnull));
		if (!DatumGetBool(SPI_getbinval(tup, desc, 9, &isnull)))
		{
			defs_valid = false;
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("the role that declared projection \"%s\" no longer exists",
							p->name),
					 errhint("Drop the projection and declare it again as an existing role.")));
		}
		p->ready = DatumGetBool(SPI_getbinval(tup, desc, 10, &isnull));
		p->rowtype = get_rel_type_id(p->target);
		p->key_attno = get_attnum(p->target, SPI_getvalue(tup, desc, 4));
		if (p->key_attno == InvalidAttrNumber)
		{
			defs_valid = false;
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("key column \"%s\" of projection \"%s\" does not exist",
							SPI_getvalue(tup, desc, 4), p->name)));
		}
		old = MemoryContextSwitchTo(defs_context);
		rel = relation_open(p->target, AccessShareLock);
		defs_build_sql(p, rel);
		relation_close(rel, AccessShareLock);
		fmgr_info_cxt(p->apply, &p->flinfo, defs_context);
		MemoryContextSwitchTo(old);
		nprojections++;
	}

	ctl.keysize = NAMEDATALEN;
	ctl.entrysize = sizeof(CommandAggregate);
	ctl.hcxt = defs_context;
	command_aggregates = hash_create("cqrs command aggregates", 64, &ctl,
									 HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	if (SPI_execute("SELECT name, aggregate_type FROM cqrs.command_type"
					" WHERE NOT builtin", false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read cqrs.command_type");
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		char		key[NAMEDATALEN];
		CommandAggregate *ca;

		memset(key, 0, sizeof(key));
		strlcpy(key, cqrs_spi_text(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1),
				NAMEDATALEN);
		ca = hash_search(command_aggregates, key, HASH_ENTER, NULL);
		strlcpy(ca->aggregate_type,
				cqrs_spi_text(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2),
				NAMEDATALEN);
	}
	cqrs_spi_finish(&scope);

	log_type = get_rel_type_id(cqrs_relid(CQRS_REL_COMMAND_LOG));
	{
		TupleDesc	desc = lookup_rowtype_tupdesc(log_type, -1);
		MemoryContext old = MemoryContextSwitchTo(defs_context);

		log_desc = CreateTupleDescCopy(desc);
		MemoryContextSwitchTo(old);
		ReleaseTupleDesc(desc);
	}
	cqrs_log_attnums(log_desc, log_attnums);
}

/*
 * Look again whether the projections that were not ready are: their
 * versions may have been restored since.
 */
static void
defs_check_ready(void)
{
	static SPIPlanPtr plan = NULL;
	Oid			argtypes[1] = {TEXTOID};

	for (int i = 0; i < nprojections; i++)
	{
		Datum		name;
		static TimestampTz said = 0;

		if (projections[i].ready)
			continue;
		name = CStringGetTextDatum(projections[i].name);
		if (cqrs_exec(cqrs_keep_plan(&plan,
									 "SELECT FROM cqrs.projection_version"
									 " WHERE projection OPERATOR(pg_catalog.=) $1"
									 " AND aggregate_id OPERATOR(pg_catalog.=) ''",
									 1, argtypes),
					  &name, NULL, 1, SPI_OK_SELECT) > 0)
		{
			projections[i].ready = true;
			continue;
		}
		if (TimestampDifferenceExceeds(said, GetCurrentTimestamp(), 60000))
		{
			said = GetCurrentTimestamp();
			ereport(LOG,
					(errmsg("cqrs projector leaves projection \"%s\" alone: its versions are not there",
							projections[i].name),
					 errdetail("A restore has not loaded cqrs.projection_version yet, or left it out."),
					 errhint("Once the restore is done, cqrs.rebuild('%s') fills the projection from the log.",
							 projections[i].name)));
		}
	}
}

/* The index of the declared projection named name, or -1. */
static int
defs_find(const char *name)
{
	for (int i = 0; i < nprojections; i++)
		if (strcmp(projections[i].name, name) == 0)
			return i;
	return -1;
}

/* The aggregate type of a declared command type, or NULL. */
static const char *
defs_aggregate_type(const char *command_type)
{
	char		key[NAMEDATALEN];
	CommandAggregate *ca;

	if (command_type == NULL || strlen(command_type) >= NAMEDATALEN)
		return NULL;
	/* commands come in runs of one type: the last answer first */
	if (last_aggregate != NULL && strcmp(command_type, last_command) == 0)
		return last_aggregate->aggregate_type;
	memset(key, 0, sizeof(key));
	strlcpy(key, command_type, sizeof(key));
	ca = hash_search(command_aggregates, key, HASH_FIND, NULL);
	if (ca != NULL)
	{
		strlcpy(last_command, command_type, sizeof(last_command));
		last_aggregate = ca;
	}
	return ca ? ca->aggregate_type : NULL;
}

/* Does the fold apply projection i to aggregates of aggregate_type? */
static inline bool
fold_follows(Fold *f, int i, const char *aggregate_type)
{
	return (f->only < 0 ? projections[i].ready : f->only == i) &&
		strcmp(projections[i].aggregate_type, aggregate_type) == 0;
}

/*
 * Become the projection's owner, restricted, until fold_leave(); the
 * (sub)transaction's abort restores the identity on error.
 */
static void
fold_enter(int i, Oid *save_userid, int *save_sec)
{
	GetUserIdAndSecContext(save_userid, save_sec);
	SetUserIdAndSecContext(projections[i].owner,
						   *save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	current_projection = i;
}

static void
fold_leave(Oid save_userid, int save_sec)
{
	current_projection = -1;
	SetUserIdAndSecContext(save_userid, save_sec);
}

/* Error context: the command and projection being applied. */
static void
fold_error_context(void *arg)
{
	CqrsRecord *rec = current_record;

	if (rec == NULL)
		return;
	errcontext("cqrs projector applying %s command %s (log_id " INT64_FORMAT ", aggregate \"%s\", sequence " INT64_FORMAT ")%s%s%s",
			   rec->command_type ? rec->command_type : "(null)",
			   DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(&rec->command_id))),
			   rec->log_id, rec->aggregate_id ? rec->aggregate_id : "(null)",
			   rec->sequence_id,
			   current_projection >= 0 ? " to projection \"" : "",
			   current_projection >= 0 ? projections[current_projection].name : "",
			   current_projection >= 0 ? "\"" : "");
}

/* The command as a row of cqrs.command_log. */
static Datum
fold_command_datum(CqrsRecord *rec)
{
	Datum	   *values = palloc0(sizeof(Datum) * log_desc->natts);
	bool	   *nulls = palloc(sizeof(bool) * log_desc->natts);

	memset(nulls, true, sizeof(bool) * log_desc->natts);
#define LOG_SET(c, v) \
	do { values[log_attnums[c] - 1] = (v); nulls[log_attnums[c] - 1] = false; } while (0)
	LOG_SET(COL_LOG_ID, Int64GetDatum(rec->log_id));
	LOG_SET(COL_COMMAND_ID, UUIDPGetDatum(&rec->command_id));
	LOG_SET(COL_COMMAND_TYPE, CStringGetTextDatum(rec->command_type));
	LOG_SET(COL_AGGREGATE_ID, CStringGetTextDatum(rec->aggregate_id));
	LOG_SET(COL_SEQUENCE_ID, Int64GetDatum(rec->sequence_id));
	if (rec->payload)
		LOG_SET(COL_PAYLOAD, JsonbPGetDatum(rec->payload));
	if (rec->created_at != 0)
		LOG_SET(COL_CREATED_AT, TimestampTzGetDatum(rec->created_at));
	if (rec->traceparent)
		LOG_SET(COL_TRACEPARENT, CStringGetTextDatum(rec->traceparent));
#undef LOG_SET
	return HeapTupleGetDatum(heap_form_tuple(log_desc, values, nulls));
}

/* The failure recorded for (rec, projection i), or NULL. */
static Failure *
fold_failure(Fold *f, CqrsRecord *rec, int i)
{
	ListCell   *lc;

	foreach(lc, f->failures)
	{
		Failure    *fl = lfirst(lc);

		if ((fl->projection == i || fl->projection == -1) &&
			memcmp(&fl->command_id, &rec->command_id, sizeof(pg_uuid_t)) == 0)
			return fl;
	}
	return NULL;
}

/*
 * Record that rec fails for projection i (-1: for every projection) with
 * edata, and say so in the server log.  A refusal by an apply function is
 * the domain's rule at work, as an invalid transition of an order is; one
 * by a table or from outside a projection ("poisoned") counts towards the
 * limit of such failures per batch (worker.c), past which the batch is
 * retried rather than dead-lettered command by command.
 */
static Failure *
fold_fail(Fold *f, CqrsRecord *rec, int i, ErrorData *edata, bool poisoned)
{
	Failure    *fl = palloc0(sizeof(Failure));

	fl->command_id = rec->command_id;
	fl->projection = i;
	fl->message = pstrdup(edata->message);
	fl->sqlstate = pstrdup(unpack_sql_state(edata->sqlerrcode));
	f->failures = lappend(f->failures, fl);
	if (poisoned)
		f->stats.poisoned++;
	if (f->mode != FOLD_VERIFY)
		ereport(LOG,
				(errmsg("cqrs projector dead-lettered command %s%s%s%s: %s",
						DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(&rec->command_id))),
						i >= 0 ? " for projection \"" : "",
						i >= 0 ? projections[i].name : "",
						i >= 0 ? "\"" : "",
						edata->message)));
	FreeErrorData(edata);
	return fl;
}

/*
 * Call projection i's apply function on the aggregate's state and rec.
 */
static void
fold_call(Fold *f, int i, ProjAggState *a, Datum command)
{
	Projection *p = &projections[i];
	ProjState  *ps = &a->ps[i];
	LOCAL_FCINFO(fcinfo, 2);
	Datum		result;
	Oid			save_userid;
	int			save_sec;

	InitFunctionCallInfoData(*fcinfo, &p->flinfo, 2, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = ps->exists ? ps->row : (Datum) 0;
	fcinfo->args[0].isnull = !ps->exists;
	fcinfo->args[1].value = command;
	fcinfo->args[1].isnull = false;

	fold_enter(i, &save_userid, &save_sec);
	current_in_apply = true;
	result = FunctionCallInvoke(fcinfo);
	if (!fcinfo->isnull)
	{
		HeapTupleHeader row = DatumGetHeapTupleHeader(result);
		bool		isnull;
		Datum		key = GetAttributeByNum(row, p->key_attno, &isnull);

		text	   *keytext = isnull ? NULL : DatumGetTextPP(key);

		if (isnull ||
			VARSIZE_ANY_EXHDR(keytext) != strlen(a->aggregate_id) ||
			memcmp(VARDATA_ANY(keytext), a->aggregate_id,
				   VARSIZE_ANY_EXHDR(keytext)) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("apply function %s of projection \"%s\" returned a row for %s%s%s, not for aggregate \"%s\"",
							format_procedure(p->apply), p->name,
							isnull ? "no aggregate" : "aggregate \"",
							isnull ? "" : TextDatumGetCString(key),
							isnull ? "" : "\"", a->aggregate_id),
					 errhint("Set the key column to the command's aggregate_id.")));
		/* in this context already (fmgr's rule for results), flat */
		ps->row = PointerGetDatum(row);
	}
	current_in_apply = false;
	fold_leave(save_userid, save_sec);

	ps->exists = !fcinfo->isnull;
	ps->dirty = true;
}

/* Dead-letter rec for projection i with a failure's reason. */
static void
fold_dead(List **dead, CqrsRecord *rec, int i, Failure *fl)
{
	CqrsDeadLetter *dl = palloc0(sizeof(CqrsDeadLetter));

	dl->rec = rec;
	dl->reason = fl->message;
	dl->projection = pstrdup(projections[i].name);
	dl->sqlstate = fl->sqlstate;
	*dead = lappend(*dead, dl);
}

typedef struct CallArgs
{
	Fold	   *fold;
	int			projection;
	ProjAggState *agg;
	Datum		command;
} CallArgs;

static void
fold_call_args(void *arg)
{
	CallArgs   *c = arg;

	fold_call(c->fold, c->projection, c->agg, c->command);
}

/*
 * fold_call() in a subtransaction: an error the command can be to blame
 * for dead-letters it for this projection, whose state stays as it was.
 */
static void
fold_call_careful(Fold *f, int i, ProjAggState *a, CqrsRecord *rec,
				  Datum command, List **dead)
{
	CallArgs	args = {f, i, a, command};
	ErrorData  *edata;
	Failure    *fl;

	edata = cqrs_try_subtransaction(fold_call_args, &args);
	current_projection = -1;
	current_in_apply = false;
	if (edata == NULL)
		return;
	if (!fold_blames_command(edata->sqlerrcode))
		ReThrowError(edata);
	fl = fold_fail(f, rec, i, edata, false);
	fold_dead(dead, rec, i, fl);
}

/* The version the aggregate's projections have all reached. */
static int64
fold_version(Fold *f, ProjAggState *a)
{
	int64		v = PG_INT64_MAX;

	for (int i = 0; i < nprojections; i++)
		if (fold_follows(f, i, a->aggregate_type))
			v = Min(v, a->ps[i].version);
	return v;
}

/*
 * Apply rec, next in its aggregate's sequence, to each projection of the
 * aggregate that has not applied it yet.
 */
static void
fold_apply(Fold *f, ProjAggState *a, CqrsRecord *rec, List **dead)
{
	Datum		command = (Datum) 0;

	f->stats.applied++;
	current_record = rec;
	for (int i = 0; i < nprojections; i++)
	{
		ProjState  *ps = &a->ps[i];
		Failure    *fl;

		if (!fold_follows(f, i, a->aggregate_type) ||
			ps->version >= rec->sequence_id)
			continue;
		ps->version = rec->sequence_id;
		if ((fl = fold_failure(f, rec, i)) != NULL)
		{
			fold_dead(dead, rec, i, fl);
			continue;
		}
		if (command == (Datum) 0)
			command = fold_command_datum(rec);
		if (f->careful)
			fold_call_careful(f, i, a, rec, command, dead);
		else
			fold_call(f, i, a, command);
	}
}

/* Apply the aggregate's parked commands that are now next in line. */
static void
fold_drain(Fold *f, ProjAggState *a, List **dead)
{
	bool		progress = true;

	while (progress)
	{
		int64		v = fold_version(f, a);
		ListCell   *lc;

		progress = false;
		foreach(lc, a->parked)
		{
			Parked	   *pk = lfirst(lc);

			if (pk->drained || pk->rec->sequence_id != v + 1)
				continue;
			pk->drained = true;
			f->stats.unparked++;
			fold_apply(f, a, pk->rec, dead);
			progress = true;
			break;
		}
	}
}

/* Fold one record into its aggregate. */
static void
fold_record(Fold *f, ProjAggState *a, CqrsRecord *rec, List **dead)
{
	int64		v = fold_version(f, a);
	ListCell   *lc;
	Parked	   *pk;

	if (rec->sequence_id <= v)
	{
		f->stats.skipped++;
		return;
	}
	if (rec->sequence_id == v + 1)
	{
		fold_apply(f, a, rec, dead);
		fold_drain(f, a, dead);
		return;
	}
	foreach(lc, a->parked)
	{
		pk = lfirst(lc);
		if (pk->rec->sequence_id == rec->sequence_id)
		{
			f->stats.skipped++;
			return;
		}
	}
	pk = palloc0(sizeof(Parked));
	pk->rec = rec;
	a->parked = lappend(a->parked, pk);
	f->stats.parked++;
}

/* The ids of the aggregates of aggregate_type (any, when NULL), as text[]. */
static Datum
fold_keys(HTAB *aggs, const char *aggregate_type, bool lookup_only, int *nkeys)
{
	Datum	   *keys = palloc(sizeof(Datum) * Max(hash_get_num_entries(aggs), 1));
	HASH_SEQ_STATUS seq;
	ProjAggState   *a;
	int			n = 0;

	hash_seq_init(&seq, aggs);
	while ((a = hash_seq_search(&seq)) != NULL)
		if ((aggregate_type == NULL || strcmp(a->aggregate_type, aggregate_type) == 0) &&
			(!lookup_only || a->lookup))
			keys[n++] = CStringGetTextDatum(a->aggregate_id);
	*nkeys = n;
	return cqrs_array(keys, NULL, n, TEXTOID);
}

/*
 * A row of a projection as Redis keeps it: its JSON (row_to_json()), with
 * the version first, which the write-through compares.
 */
static char *
projection_json_of(Datum row, int64 version)
{
	char	   *body = text_to_cstring(DatumGetTextPP(DirectFunctionCall1(row_to_json, row)));

	return psprintf("{\"version\":" INT64_FORMAT "%s%s", version,
					body[1] == '}' ? "" : ",", body + 1);
}

/*
 * Load the rows, versions and parked commands of the aggregates.
 */
static void
fold_load(Fold *f, HTAB *aggs)
{
	static SPIPlanPtr versions_plan = NULL;
	static const char *versions_sql =
		"SELECT projection, aggregate_id, version FROM cqrs.projection_version"
		" WHERE projection OPERATOR(pg_catalog.=) ANY ($1)"
		" AND aggregate_id OPERATOR(pg_catalog.=) ANY ($2)";
	Oid			argtypes[2] = {TEXTARRAYOID, TEXTARRAYOID};
	Datum		values[2];
	Datum	   *names = palloc(sizeof(Datum) * Max(nprojections, 1));
	int			nnames = 0;
	int			nkeys;
	List	   *parked;
	ListCell   *lc;

	for (int i = 0; i < nprojections; i++)
	{
		Datum		keys;
		Oid			save_userid;
		int			save_sec;
		Oid			key_type[1] = {TEXTARRAYOID};

		if (f->only >= 0 ? f->only != i : !projections[i].ready)
			continue;
		keys = fold_keys(aggs, projections[i].aggregate_type, true, &nkeys);
		if (nkeys == 0)
			continue;
		names[nnames++] = CStringGetTextDatum(projections[i].name);

		fold_enter(i, &save_userid, &save_sec);
		(void) cqrs_exec(cqrs_keep_plan(&projections[i].load_plan,
										projections[i].load_sql, 1, key_type),
						 &keys, NULL, 0, SPI_OK_SELECT);
		fold_leave(save_userid, save_sec);
		for (uint64 r = 0; r < SPI_processed; r++)
		{
			HeapTuple	tup = SPI_tuptable->vals[r];
			char	   *id = cqrs_spi_text(tup, SPI_tuptable->tupdesc, 1);
			bool		isnull;
			ProjAggState   *a = hash_search(aggs, &id, HASH_FIND, NULL);

			if (a == NULL)
				continue;
			a->ps[i].stored = true;
			if (f->mode == FOLD_REBUILD)
			{
				/* the fold starts from nothing; the row is to compare */
				a->ps[i].old_row = datumCopy(SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &isnull),
											 false, -1);
				continue;
			}
			a->ps[i].row = datumCopy(SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &isnull),
									 false, -1);
			a->ps[i].exists = true;
		}
	}
	if (nnames > 0 && f->mode == FOLD_REBUILD)
	{
		/*
		 * A rebuild's chunk holds every aggregate of its range of ids (the
		 * log is read in their order, collation "C" as the versions' key):
		 * one range scan of the versions instead of a probe per aggregate.
		 */
		static SPIPlanPtr range_plan = NULL;
		Oid			range_types[3] = {TEXTOID, TEXTOID, TEXTOID};
		Datum		range[3];
		HASH_SEQ_STATUS seq;
		ProjAggState *a;
		const char *lo = NULL;
		const char *hi = NULL;

		hash_seq_init(&seq, aggs);
		while ((a = hash_seq_search(&seq)) != NULL)
		{
			if (lo == NULL || strcmp(a->aggregate_id, lo) < 0)
				lo = a->aggregate_id;
			if (hi == NULL || strcmp(a->aggregate_id, hi) > 0)
				hi = a->aggregate_id;
		}
		range[0] = names[0];
		range[1] = CStringGetTextDatum(lo);
		range[2] = CStringGetTextDatum(hi);
		(void) cqrs_exec(cqrs_keep_plan(&range_plan,
										"SELECT projection, aggregate_id, version"
										" FROM cqrs.projection_version"
										" WHERE projection OPERATOR(pg_catalog.=) $1"
										" AND aggregate_id OPERATOR(pg_catalog.>=) $2"
										" AND aggregate_id OPERATOR(pg_catalog.<=) $3",
										3, range_types),
						 range, NULL, 0, SPI_OK_SELECT);
	}
	else if (nnames > 0)
	{
		values[0] = cqrs_array(names, NULL, nnames, TEXTOID);
		values[1] = fold_keys(aggs, NULL, true, &nkeys);
		(void) cqrs_exec(cqrs_keep_plan(&versions_plan, versions_sql, 2, argtypes),
						 values, NULL, 0, SPI_OK_SELECT);
	}
	else
		SPI_processed = 0;
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		int			i = defs_find(cqrs_spi_text(tup, SPI_tuptable->tupdesc, 1));
		char	   *id = cqrs_spi_text(tup, SPI_tuptable->tupdesc, 2);
		bool		isnull;
		ProjAggState   *a = hash_search(aggs, &id, HASH_FIND, NULL);

		if (a == NULL || i < 0)
			continue;
		a->ps[i].stored_version =
			DatumGetInt64(SPI_getbinval(tup, SPI_tuptable->tupdesc, 3, &isnull));
		if (f->mode != FOLD_REBUILD)
			a->ps[i].version = a->ps[i].stored_version;
	}

	/* a new aggregate may have commands parked before its first */
	if (f->mode == FOLD_REBUILD || !cqrs_parked_maybe())
		return;
	parked = cqrs_parked_load(fold_keys(aggs, NULL, false, &nkeys));
	foreach(lc, parked)
	{
		CqrsRecord *rec = lfirst(lc);
		ProjAggState   *a = hash_search(aggs, &rec->aggregate_id, HASH_FIND, NULL);
		Parked	   *pk;

		if (a == NULL)
			continue;
		pk = palloc0(sizeof(Parked));
		pk->rec = rec;
		pk->stored = true;
		a->parked = lappend(a->parked, pk);
	}
}

/*
 * Verify: add a row to the output for each aggregate whose row in the
 * table differs from its fold.
 */
static void
fold_compare(Fold *f, HTAB *aggs, int i)
{
	Projection *p = &projections[i];
	HASH_SEQ_STATUS seq;
	ProjAggState   *a;
	Oid			key_type[1] = {TEXTARRAYOID};
	Datum		keys;
	int			nkeys;
	HTAB	   *actual;
	Oid			save_userid;
	int			save_sec;
	Oid			out_func;
	bool		varlena;
	typedef struct Actual
	{
		char	   *id;
		char	   *row;
	} Actual;

	keys = fold_keys(aggs, p->aggregate_type, false, &nkeys);
	if (nkeys == 0)
		return;
	actual = cqrs_id_hash_create("cqrs verify rows", nkeys, sizeof(Actual));
	getTypeOutputInfo(p->rowtype, &out_func, &varlena);

	fold_enter(i, &save_userid, &save_sec);
	(void) cqrs_exec(cqrs_keep_plan(&p->load_plan, p->load_sql, 1, key_type),
					 &keys, NULL, 0, SPI_OK_SELECT);
	fold_leave(save_userid, save_sec);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		char	   *id = cqrs_spi_text(tup, SPI_tuptable->tupdesc, 1);
		bool		isnull;
		Actual	   *act = hash_search(actual, &id, HASH_ENTER, NULL);

		act->row = OidOutputFunctionCall(out_func,
										 SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &isnull));
	}

	hash_seq_init(&seq, aggs);
	while ((a = hash_seq_search(&seq)) != NULL)
	{
		Actual	   *act;
		char	   *expected;
		Datum		values[3];
		bool		nulls[3] = {false, false, false};

		if (strcmp(a->aggregate_type, p->aggregate_type) != 0)
			continue;
		act = hash_search(actual, &a->aggregate_id, HASH_FIND, NULL);
		expected = a->ps[i].exists ?
			OidOutputFunctionCall(out_func, a->ps[i].row) : NULL;
		if ((expected == NULL && act == NULL) ||
			(expected != NULL && act != NULL && strcmp(expected, act->row) == 0))
			continue;
		values[0] = CStringGetTextDatum(a->aggregate_id);
		if (expected)
			values[1] = CStringGetTextDatum(expected);
		else
			nulls[1] = true;
		if (act)
			values[2] = CStringGetTextDatum(act->row);
		else
			nulls[2] = true;
		tuplestore_putvalues(f->out, f->out_desc, values, nulls);
	}
}

/* Rebuild: remember that the fold made (or kept) this aggregate. */
static void
fold_keep_key(Fold *f, const char *id)
{
	MemoryContext old = MemoryContextSwitchTo(f->keep_context);

	if (f->nkept == f->kept_size)
	{
		f->kept_size = Max(1024, f->kept_size * 2);
		f->kept = f->kept == NULL ?
			MemoryContextAllocHuge(f->keep_context, sizeof(Datum) * f->kept_size) :
			repalloc_huge(f->kept, sizeof(Datum) * f->kept_size);
	}
	f->kept[f->nkept++] = CStringGetTextDatum(id);
	MemoryContextSwitchTo(old);
}

/*
 * Write the fold back: each projection's rows and versions, parked and
 * unparked commands, dead letters.
 */
static void
fold_write(Fold *f, HTAB *aggs, List *dead)
{
	/*
	 * Versions and rows the fold found none of are inserted; should one be
	 * there after all (a trusted create, see Fold), the unique violation
	 * makes fold_range() fold again with lookups.
	 */
#define VERSIONS_SQL \
		"INSERT INTO cqrs.projection_version (projection, aggregate_id, version)" \
		" SELECT * FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[])," \
		" pg_catalog.unnest($2::pg_catalog.text[])," \
		" pg_catalog.unnest($3::pg_catalog.int8[]))"
	static SPIPlanPtr versions_plan = NULL;
	static SPIPlanPtr new_versions_plan = NULL;
	static const char *versions_sql = VERSIONS_SQL
		" ON CONFLICT (projection, aggregate_id)"
		" DO UPDATE SET version = excluded.version";
	static const char *new_versions_sql = VERSIONS_SQL;
#undef VERSIONS_SQL
	static const Oid version_types[3] = {TEXTOID, TEXTOID, INT8OID};
	int			naggs = hash_get_num_entries(aggs);
	CqrsBatch	versions;
	CqrsBatch	new_versions;
	CqrsBatch	park;
	CqrsBatch	unpark;
	HASH_SEQ_STATUS seq;
	ProjAggState   *a;

	memset(&park, 0, sizeof(park));
	memset(&unpark, 0, sizeof(unpark));
	cqrs_batch_init(&versions, naggs, 3, version_types);
	cqrs_batch_init(&new_versions, naggs, 3, version_types);

	for (int i = 0; i < nprojections; i++)
	{
		Projection *p = &projections[i];
		Datum	   *rows;
		Datum	   *fresh;
		Datum	   *gone;
		int			nrows = 0;
		int			nfresh = 0;
		int			ngone = 0;
		Oid			save_userid;
		int			save_sec;

		if (f->only >= 0 ? f->only != i : !projections[i].ready)
			continue;
		if (f->mode == FOLD_VERIFY)
		{
			fold_compare(f, aggs, i);
			continue;
		}
		rows = palloc(sizeof(Datum) * Max(naggs, 1));
		fresh = palloc(sizeof(Datum) * Max(naggs, 1));
		gone = palloc(sizeof(Datum) * Max(naggs, 1));
		hash_seq_init(&seq, aggs);
		while ((a = hash_seq_search(&seq)) != NULL)
		{
			ProjState  *ps = &a->ps[i];

			if (!fold_follows(f, i, a->aggregate_type))
				continue;
			if (f->mode == FOLD_REBUILD)
			{
				/* write only what differs from the table */
				ps->dirty = ps->exists != ps->stored ||
					(ps->exists &&
					 !DatumGetBool(FunctionCall2(&f->image_eq, ps->old_row, ps->row)));
				fold_keep_key(f, a->aggregate_id);
			}
			if (ps->dirty && ps->exists && ps->stored)
				rows[nrows++] = ps->row;
			else if (ps->dirty && ps->exists)
				fresh[nfresh++] = ps->row;
			else if (ps->dirty && ps->stored)
				gone[ngone++] = CStringGetTextDatum(a->aggregate_id);
			if (ps->version != ps->stored_version)
			{
				CqrsBatch  *b = ps->stored_version < 0 ? &new_versions : &versions;

				cqrs_batch_put_text(b, 0, p->name);
				cqrs_batch_put_text(b, 1, a->aggregate_id);
				cqrs_batch_put(b, 2, Int64GetDatum(ps->version));
				b->nrows++;
				cqrs_batch_grow(b);
			}
		}
		fold_enter(i, &save_userid, &save_sec);
		if (nrows > 0)
		{
			Oid			argtypes[1] = {get_array_type(p->rowtype)};
			Datum		arg = cqrs_array(rows, NULL, nrows, p->rowtype);

			(void) cqrs_exec(cqrs_keep_plan(&p->upsert_plan, p->upsert_sql, 1, argtypes),
							 &arg, NULL, 0, SPI_OK_INSERT);
		}
		if (nfresh > 0)
		{
			Oid			argtypes[1] = {get_array_type(p->rowtype)};
			Datum		arg = cqrs_array(fresh, NULL, nfresh, p->rowtype);

			(void) cqrs_exec(cqrs_keep_plan(&p->insert_plan, p->insert_sql, 1, argtypes),
							 &arg, NULL, 0, SPI_OK_INSERT);
		}
		if (ngone > 0)
		{
			Oid			argtypes[1] = {TEXTARRAYOID};
			Datum		arg = cqrs_array(gone, NULL, ngone, TEXTOID);

			(void) cqrs_exec(cqrs_keep_plan(&p->delete_plan, p->delete_sql, 1, argtypes),
							 &arg, NULL, 0, SPI_OK_DELETE);
		}
		fold_leave(save_userid, save_sec);

		/* Redis, after the batch commits (or its backlog, with it) */
		if (!cqrs_redis_wanted())
			continue;
		hash_seq_init(&seq, aggs);
		while ((a = hash_seq_search(&seq)) != NULL)
		{
			ProjState  *ps = &a->ps[i];

			if (!fold_follows(f, i, a->aggregate_type) || !ps->dirty ||
				(!ps->exists && !ps->stored))
				continue;
			cqrs_redis_declared_row(p->name, a->aggregate_id,
									ps->exists ? projection_json_of(ps->row, ps->version) : NULL,
									ps->version,
									!ps->stored && ps->stored_version <= 0);
		}
	}
	if (f->mode == FOLD_VERIFY)
		return;
	cqrs_batch_exec(&versions, &versions_plan, versions_sql, SPI_OK_INSERT);
	cqrs_batch_exec(&new_versions, &new_versions_plan, new_versions_sql, SPI_OK_INSERT);

	hash_seq_init(&seq, aggs);
	while ((a = hash_seq_search(&seq)) != NULL)
	{
		int64		v = fold_version(f, a);
		ListCell   *lc;

		foreach(lc, a->parked)
		{
			Parked	   *pk = lfirst(lc);

			/* behind every projection: nothing waits for it any more */
			if (pk->rec->sequence_id <= v)
				pk->drained = true;
			if (pk->drained && pk->stored)
				cqrs_unpark_put(&unpark, pk->rec);
			else if (!pk->drained && !pk->stored)
				cqrs_parked_put(&park, pk->rec, v + 1);
		}
	}
	cqrs_parked_store(&park);
	cqrs_parked_remove(&unpark);
	f->stats.dead += cqrs_write_dead(dead);
	cqrs_redis_flush_stale();
	if (f->mode == FOLD_STREAM)
		cqrs_parked_note(park.nrows, unpark.nrows);
}

/*
 * Fold and write records[lo, hi) in the current (sub)transaction.
 */
static void
fold_range_once(Fold *f, CqrsRecord *records, int lo, int hi)
{
	HTAB	   *aggs;
	List	   *dead = NIL;

	Size		entrysize = offsetof(ProjAggState, ps) +
		sizeof(ProjState) * Max(nprojections, 1);

	aggs = cqrs_id_hash_create("cqrs batch aggregates", hi - lo, entrysize);

	for (int i = lo; i < hi; i++)
	{
		CqrsRecord *rec = &records[i];
		const char *type = defs_aggregate_type(rec->command_type);
		bool		found;
		ProjAggState   *a;

		if (type == NULL || rec->aggregate_id == NULL)
			continue;
		a = hash_search(aggs, &rec->aggregate_id, HASH_ENTER, &found);
		if (!found)
		{
			memset(((char *) a) + sizeof(char *), 0, entrysize - sizeof(char *));
			a->aggregate_id = rec->aggregate_id;
			a->aggregate_type = type;
			a->min_sequence = rec->sequence_id;
			for (int p = 0; p < nprojections; p++)
				a->ps[p].stored_version = -1;
		}
		a->min_sequence = Min(a->min_sequence, rec->sequence_id);
		a->lookup = !(f->trust && a->min_sequence == 1);
	}
	if (hash_get_num_entries(aggs) == 0)
		return;
	if (f->mode != FOLD_VERIFY)
		fold_load(f, aggs);

	for (int i = lo; i < hi; i++)
	{
		CqrsRecord *rec = &records[i];
		ProjAggState   *a;

		if (rec->aggregate_id == NULL)
			continue;
		a = hash_search(aggs, &rec->aggregate_id, HASH_FIND, NULL);
		if (a == NULL)
			continue;
		current_record = rec;
		fold_record(f, a, rec, &dead);
	}
	current_record = NULL;
	f->nfolded += hash_get_num_entries(aggs);
	fold_write(f, aggs, dead);
}

/*
 * Can the failed command be to blame for this error raised while a
 * projection's own code ran (its apply function, its table's constraints
 * and triggers)?  Everything but what says the server is in trouble:
 * cancels and timeouts, resources, serialization, internal errors.
 */
static bool
fold_blames_command(int sqlerrcode)
{
	switch (ERRCODE_TO_CATEGORY(sqlerrcode))
	{
		case ERRCODE_TO_CATEGORY(ERRCODE_TRANSACTION_ROLLBACK):
		case ERRCODE_TO_CATEGORY(ERRCODE_INSUFFICIENT_RESOURCES):
		case ERRCODE_TO_CATEGORY(ERRCODE_PROGRAM_LIMIT_EXCEEDED):
		case ERRCODE_TO_CATEGORY(ERRCODE_OPERATOR_INTERVENTION):
		case ERRCODE_TO_CATEGORY(ERRCODE_SYSTEM_ERROR):
		case ERRCODE_TO_CATEGORY(ERRCODE_INTERNAL_ERROR):
		case ERRCODE_TO_CATEGORY(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE):
			return false;
		default:
			return true;
	}
}

/*
 * Rebuild, before a range that failed is split: its aggregates start from
 * nothing in the halves, folded as the projector does (which looks rows
 * and versions up), so their rows and versions go first.
 */
static void
fold_reset(Fold *f, CqrsRecord *records, int lo, int hi)
{
	static SPIPlanPtr versions_plan = NULL;
	Projection *p = &projections[f->only];
	Datum	   *ids = palloc(sizeof(Datum) * (hi - lo));
	int			n = 0;
	Oid			types[2] = {TEXTOID, TEXTARRAYOID};
	Datum		values[2];
	Oid			save_userid;
	int			save_sec;

	for (int r = lo; r < hi; r++)
	{
		const char *type = defs_aggregate_type(records[r].command_type);

		if (type == NULL || records[r].aggregate_id == NULL ||
			strcmp(type, p->aggregate_type) != 0)
			continue;
		ids[n++] = CStringGetTextDatum(records[r].aggregate_id);
		fold_keep_key(f, records[r].aggregate_id);
	}
	if (n == 0)
		return;
	values[0] = CStringGetTextDatum(p->name);
	values[1] = cqrs_array(ids, NULL, n, TEXTOID);
	fold_enter(f->only, &save_userid, &save_sec);
	(void) cqrs_exec(cqrs_keep_plan(&p->delete_plan, p->delete_sql, 1, &types[1]),
					 &values[1], NULL, 0, SPI_OK_DELETE);
	fold_leave(save_userid, save_sec);
	(void) cqrs_exec(cqrs_keep_plan(&versions_plan,
									"DELETE FROM cqrs.projection_version"
									" WHERE projection OPERATOR(pg_catalog.=) $1"
									" AND aggregate_id OPERATOR(pg_catalog.=) ANY ($2)",
									2, types),
					 values, NULL, 0, SPI_OK_DELETE);
}

typedef struct RangeArgs
{
	Fold	   *fold;
	CqrsRecord *records;
	int			lo;
	int			hi;
} RangeArgs;

static void
fold_range_args(void *arg)
{
	RangeArgs  *a = arg;

	fold_range_once(a->fold, a->records, a->lo, a->hi);
}

/*
 * Fold records[lo, hi) in a subtransaction.  When an apply function
 * fails on a command, fold the range again calling each apply function
 * in a subtransaction of its own, so that the failing calls are
 * dead-lettered and the others kept.  When writing fails (a constraint
 * of a table refusing a row), split the range until the failing command
 * is alone, and dead-letter it for that projection (or every projection
 * of it, when the error was not a projection's).
 */
static void
fold_range(Fold *f, CqrsRecord *records, int lo, int hi)
{
	RangeArgs	args = {f, records, lo, hi};
	CqrsApplyStats saved = f->stats;
	int64		saved_folded = f->nfolded;
	bool		was_careful = f->careful;
	bool		was_trusting = f->trust;
	int			redis_mark = cqrs_redis_mark();

	for (;;)
	{
		ErrorData  *edata;
		int			culprit;
		bool		in_apply;
		bool		blamed;

		current_projection = -1;
		current_in_apply = false;
		edata = cqrs_try_subtransaction(fold_range_args, &args);
		culprit = current_projection;
		in_apply = current_in_apply;
		current_projection = -1;
		current_in_apply = false;
		current_record = NULL;
		if (edata == NULL)
		{
			f->careful = was_careful;
			f->trust = was_trusting;
			return;
		}
		/* what the failed attempt counted and noted did not happen */
		f->stats = saved;
		f->nfolded = saved_folded;
		cqrs_project_forget();
		cqrs_redis_forget(redis_mark);
		blamed = culprit >= 0 ? fold_blames_command(edata->sqlerrcode) :
			cqrs_blames_command(edata->sqlerrcode);
		if (!blamed)
			ReThrowError(edata);
		/* a create trusted as new was not: look everything up */
		if (f->trust && edata->sqlerrcode == ERRCODE_UNIQUE_VIOLATION)
		{
			f->trust = false;
			FreeErrorData(edata);
			continue;
		}
		if (in_apply && !f->careful)
		{
			f->careful = true;
			FreeErrorData(edata);
			continue;
		}
		f->careful = was_careful;
		if (f->mode == FOLD_VERIFY)
			ReThrowError(edata);
		if (hi - lo > 1)
		{
			int			mid = lo + (hi - lo) / 2;
			FoldMode	mode = f->mode;

			FreeErrorData(edata);
			if (mode == FOLD_REBUILD)
				fold_reset(f, records, lo, hi);
			/* the second half starts from what the first half wrote */
			f->mode = FOLD_STREAM;
			fold_range(f, records, lo, mid);
			fold_range(f, records, mid, hi);
			f->mode = mode;
			return;
		}
		/* the same failure again: it is not this command's */
		if (fold_failure(f, &records[lo], culprit) != NULL)
			ReThrowError(edata);
		(void) fold_fail(f, &records[lo], culprit, edata, true);
		saved = f->stats;
	}
}

/*
 * Fold records (in commit order) with the declared projections.
 */
static void
fold_records(Fold *f, CqrsRecord *records, int n)
{
	ErrorContextCallback errcallback;

	errcallback.callback = fold_error_context;
	errcallback.arg = NULL;
	errcallback.previous = error_context_stack;
	error_context_stack = &errcallback;
	fold_range(f, records, 0, n);
	error_context_stack = errcallback.previous;
}

/*
 * Apply the commands of declared types among records, in the current
 * transaction, with SPI connected: the projector's batches, the catch-up
 * from the log, a retried dead letter.
 */
void
cqrs_project_declared(CqrsRecord *records, int n, CqrsApplyStats *stats)
{
	Fold		f;

	defs_load();
	if (nprojections == 0)
	{
		stats->skipped += n;
		return;
	}
	defs_check_ready();
	memset(&f, 0, sizeof(f));
	f.mode = FOLD_STREAM;
	f.only = -1;
	f.trust = true;
	fold_records(&f, records, n);
	cqrs_stats_add(stats, &f.stats);
}

/*
 * cqrs.retry_dead_letter() of a command a declared projection refused:
 * move the projection back before the command when the failure moved it
 * past, and fold the command into that projection alone.  Called with
 * the projection lock held and the dead letter locked.  Returns true when
 * it was applied, false when it was dead-lettered again.
 */
bool
cqrs_retry_declared(CqrsRecord *rec, const char *projection)
{
	static SPIPlanPtr version_plan = NULL;
	static SPIPlanPtr rewind_plan = NULL;
	static SPIPlanPtr forget_plan = NULL;
	Oid			types[3] = {TEXTOID, TEXTOID, INT8OID};
	Datum		values[3];
	int64		version = 0;
	int			i;
	Fold		f;

	i = projection_lookup(projection);
	values[0] = CStringGetTextDatum(projection);
	values[1] = CStringGetTextDatum(rec->aggregate_id);
	if (cqrs_exec(cqrs_keep_plan(&version_plan,
								 "SELECT version FROM cqrs.projection_version"
								 " WHERE projection OPERATOR(pg_catalog.=) $1"
								 " AND aggregate_id OPERATOR(pg_catalog.=) $2",
								 2, types),
				  values, NULL, 0, SPI_OK_SELECT) > 0)
	{
		bool		isnull;

		version = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
											  SPI_tuptable->tupdesc, 1, &isnull));
	}
	if (version > rec->sequence_id)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("projection \"%s\" has moved past sequence " INT64_FORMAT " of aggregate \"%s\"",
						projection, rec->sequence_id, rec->aggregate_id),
				 errdetail("It applied the aggregate's commands up to sequence " INT64_FORMAT "; applying this one now would break their order.",
						   version),
				 errhint("Use cqrs.rebuild('%s') to replay the whole log instead.", projection)));
	if (version < rec->sequence_id - 1)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("projection \"%s\" has not reached sequence " INT64_FORMAT " of aggregate \"%s\"",
						projection, rec->sequence_id - 1, rec->aggregate_id)));
	if (version == rec->sequence_id)
	{
		values[2] = Int64GetDatum(rec->sequence_id - 1);
		(void) cqrs_exec(cqrs_keep_plan(&rewind_plan,
										"UPDATE cqrs.projection_version SET version = $3"
										" WHERE projection OPERATOR(pg_catalog.=) $1"
										" AND aggregate_id OPERATOR(pg_catalog.=) $2",
										3, types),
						 values, NULL, 0, SPI_OK_UPDATE);
	}
	{
		Oid			uuid_type[1] = {UUIDOID};
		Datum		id[1] = {UUIDPGetDatum(&rec->command_id)};

		(void) cqrs_exec(cqrs_keep_plan(&forget_plan,
										"DELETE FROM cqrs.dead_letter"
										" WHERE command_id OPERATOR(pg_catalog.=) $1",
										1, uuid_type),
						 id, NULL, 0, SPI_OK_DELETE);
	}

	memset(&f, 0, sizeof(f));
	f.mode = FOLD_STREAM;
	f.only = i;
	fold_records(&f, rec, 1);
	return f.stats.dead == 0;
}

/*
 * For the Redis backlog: the JSON (projection_json_of()) and version of
 * each aggregate's row in a declared projection, json[k] NULL when it has
 * none or the projection is gone.  SPI connected.
 */
void
cqrs_projection_json(const char *projection, int n, char **ids, char **json,
					 int64 *versions)
{
	static SPIPlanPtr versions_plan = NULL;
	Oid			argtypes[2] = {TEXTOID, TEXTARRAYOID};
	Datum		values[2];
	Datum	   *keys;
	int			i;
	Oid			save_userid;
	int			save_sec;
	HTAB	   *rows;
	typedef struct KeyRow
	{
		char	   *id;
		Datum		row;
		int64		version;
	} KeyRow;

	static SPIPlanPtr exists_plan = NULL;
	Oid			name_type[1] = {TEXTOID};
	Datum		name = CStringGetTextDatum(projection);

	/*
	 * Not only the cache: a drop commits (and is seen) a moment before
	 * its invalidation arrives, and this runs without the projection lock
	 * that would order the two.
	 */
	if (n == 0 ||
		cqrs_exec(cqrs_keep_plan(&exists_plan,
								 "SELECT FROM cqrs.projection"
								 " WHERE name OPERATOR(pg_catalog.=) $1",
								 1, name_type),
				  &name, NULL, 1, SPI_OK_SELECT) == 0)
		return;
	defs_load();
	i = defs_find(projection);
	if (i < 0)
		return;
	keys = palloc(sizeof(Datum) * n);
	for (int k = 0; k < n; k++)
		keys[k] = CStringGetTextDatum(ids[k]);
	values[0] = CStringGetTextDatum(projection);
	values[1] = cqrs_array(keys, NULL, n, TEXTOID);

	rows = cqrs_id_hash_create("cqrs redis rows", n, sizeof(KeyRow));

	fold_enter(i, &save_userid, &save_sec);
	(void) cqrs_exec(cqrs_keep_plan(&projections[i].load_plan,
									projections[i].load_sql, 1, &argtypes[1]),
					 &values[1], NULL, 0, SPI_OK_SELECT);
	fold_leave(save_userid, save_sec);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		char	   *id = cqrs_spi_text(tup, SPI_tuptable->tupdesc, 1);
		bool		isnull;
		KeyRow	   *kr = hash_search(rows, &id, HASH_ENTER, NULL);

		kr->row = datumCopy(SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &isnull),
							false, -1);
		kr->version = 0;
	}
	(void) cqrs_exec(cqrs_keep_plan(&versions_plan,
									"SELECT aggregate_id, version FROM cqrs.projection_version"
									" WHERE projection OPERATOR(pg_catalog.=) $1"
									" AND aggregate_id OPERATOR(pg_catalog.=) ANY ($2)",
									2, argtypes),
					 values, NULL, 0, SPI_OK_SELECT);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		char	   *id = cqrs_spi_text(tup, SPI_tuptable->tupdesc, 1);
		bool		isnull;
		KeyRow	   *kr = hash_search(rows, &id, HASH_FIND, NULL);

		if (kr != NULL)
			kr->version = DatumGetInt64(SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &isnull));
	}
	for (int k = 0; k < n; k++)
	{
		KeyRow	   *kr = hash_search(rows, &ids[k], HASH_FIND, NULL);

		if (kr == NULL)
			continue;
		json[k] = projection_json_of(kr->row, kr->version);
		versions[k] = kr->version;
	}
}

/*
 * The Redis keys of an aggregate in every projection that follows its
 * command type must be written again (a batch delivered again after a
 * crash).
 */
void
cqrs_redis_stale_declared(const char *command_type, const char *aggregate_id)
{
	const char *type;

	if (!cqrs_redis_wanted())
		return;
	defs_load();
	type = defs_aggregate_type(command_type);
	if (type == NULL)
		return;
	for (int i = 0; i < nprojections; i++)
		if (projections[i].ready &&
			strcmp(projections[i].aggregate_type, type) == 0)
			cqrs_redis_stale_in(projections[i].name, aggregate_id);
}

/* A name argument of a projection function. */
static char *
projection_name_arg(FunctionCallInfo fcinfo, int argno)
{
	char	   *name;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("projection name must not be null")));
	name = text_to_cstring(PG_GETARG_TEXT_PP(argno));
	return name;
}

/* Which (declared) projection is name; ERROR when none or built in. */
static int
projection_lookup(const char *name)
{
	int			i;

	defs_load();
	i = defs_find(name);
	if (i < 0 && strcmp(name, "orders") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("projection \"%s\" is built in", name),
				 errhint("Use the functions without a projection argument for it.")));
	if (i < 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("projection \"%s\" does not exist", name)));
	return i;
}

/* cqrs_scan_log()'s fold of one projection. */
static void
projection_scan_chunk(CqrsRecord *records, int n, void *arg)
{
	fold_records((Fold *) arg, records, n);
}

/*
 * Fold the whole log into projection i with a Fold of the given mode;
 * returns the number of commands read.
 */
static int64
projection_scan(Fold *f, int i)
{
	static const char *sql =
		"SELECT l.log_id, l.command_id, l.command_type, l.aggregate_id,"
		" l.sequence_id, l.payload, l.traceparent, l.created_at"
		" FROM cqrs.command_log AS l"
		" WHERE l.command_type OPERATOR(pg_catalog.=) ANY"
		" (SELECT t.name FROM cqrs.command_type AS t"
		"  WHERE t.aggregate_type OPERATOR(pg_catalog.=) $1)"
		" ORDER BY l.aggregate_id, l.sequence_id";
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1];

	f->only = i;
	values[0] = CStringGetTextDatum(projections[i].aggregate_type);
	return cqrs_scan_log(sql, 1, argtypes, values, true,
						 projection_scan_chunk, f);
}

/*
 * Fold the whole log into projection i anew: every aggregate from nothing,
 * writing the rows and versions that differ from the stored ones, then
 * deleting the rows of aggregates the log does not have; its dead letters
 * are derived again.  In the caller's transaction, holding the projection
 * lock.  Returns the number of commands folded.
 */
static int64
projection_fill(int i, CqrsApplyStats *stats)
{
	static SPIPlanPtr forget_plan = NULL;
	static SPIPlanPtr ready_plan = NULL;
	static const char *forget_sql =
		"DELETE FROM cqrs.dead_letter WHERE projection OPERATOR(pg_catalog.=) $1";
	/* the marker of a projection whose versions are there */
	static const char *ready_sql =
		"INSERT INTO cqrs.projection_version (projection, aggregate_id, version)"
		" VALUES ($1, '', 0) ON CONFLICT DO NOTHING";
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1];
	Fold		f;
	Oid			save_userid;
	int			save_sec;
	char	   *prune_sql;
	int64		n;
	Relation	rel;
	const char *target;
	const char *key;
	Oid			key_type[1] = {TEXTARRAYOID};
	Datum		kept;

	values[0] = CStringGetTextDatum(projections[i].name);
	/* every key it has now is written again, or deleted, after the fill */
	cqrs_redis_stale_projection(projections[i].name);
	(void) cqrs_exec(cqrs_keep_plan(&forget_plan, forget_sql, 1, argtypes),
					 values, NULL, 0, SPI_OK_DELETE);
	(void) cqrs_exec(cqrs_keep_plan(&ready_plan, ready_sql, 1, argtypes),
					 values, NULL, 0, SPI_OK_INSERT);
	projections[i].ready = true;

	/* fold every aggregate from nothing; write what differs */
	memset(&f, 0, sizeof(f));
	f.mode = FOLD_REBUILD;
	f.keep_context = CurrentMemoryContext;
	fmgr_info(F_RECORD_IMAGE_EQ, &f.image_eq);
	n = projection_scan(&f, i);
	cqrs_stats_add(stats, &f.stats);

	/* the rows of aggregates the log does not have go */
	rel = relation_open(projections[i].target, AccessShareLock);
	target = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
										RelationGetRelationName(rel));
	key = quote_identifier(NameStr(TupleDescAttr(RelationGetDescr(rel),
												 projections[i].key_attno - 1)->attname));
	relation_close(rel, AccessShareLock);
	prune_sql = psprintf("DELETE FROM %s AS t WHERE t.%s IN"
						 " (SELECT CAST(s.%s AS pg_catalog.text) FROM %s AS s"
						 "  EXCEPT SELECT pg_catalog.unnest($1))",
						 target, key, key, target);
	kept = cqrs_array(f.kept, NULL, (int) f.nkept, TEXTOID);
	fold_enter(i, &save_userid, &save_sec);
	if (SPI_execute_with_args(prune_sql, 1, key_type, &kept, NULL, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "could not delete the rows of aggregates without commands from %s",
			 target);
	fold_leave(save_userid, save_sec);
	return n;
}

/*
 * cqrs.create_projection(name text, aggregate_type text, target regclass,
 *		key_column name, apply_function regprocedure) RETURNS bigint
 *
 * Declare the projection and fill its table from the whole log, in the
 * caller's transaction, holding the projection lock: the projector waits
 * meanwhile, and from its next batch folds new commands into the table
 * too.  Readers see the table as it was until the transaction commits.
 */
Datum
create_projection(PG_FUNCTION_ARGS)
{
	char	   *name = projection_name_arg(fcinfo, 0);
	char	   *aggregate;
	Oid			target;
	char	   *key;
	Oid			apply;
	Oid			rowtype;
	Oid			owner;
	AttrNumber	key_attno;
	HeapTuple	tup;
	Form_pg_proc proc;
	bool		fits;
	bool		strict;
	Oid			log_type;
	Oid			types[6] = {TEXTOID, TEXTOID, TEXTOID, NAMEOID, TEXTOID, OIDOID};
	Datum		values[6];
	CqrsOwnerScope scope;
	CqrsApplyStats stats;
	int64		n;
	int			i;
	static const AclMode modes[4] = {ACL_SELECT, ACL_INSERT, ACL_UPDATE, ACL_DELETE};

	for (int a = 1; a <= 4; a++)
		if (PG_ARGISNULL(a))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s must not be null",
							a == 1 ? "aggregate_type" : a == 2 ? "target" :
							a == 3 ? "key_column" : "apply_function")));
	owner = GetUserId();
	aggregate = text_to_cstring(PG_GETARG_TEXT_PP(1));
	target = PG_GETARG_OID(2);
	key = NameStr(*PG_GETARG_NAME(3));
	apply = PG_GETARG_OID(4);

	/* a name that is a metric label and a Redis key prefix as it is */
	for (const char *c = name; *c; c++)
		if (!((*c >= 'a' && *c <= 'z') || *c == '_' ||
			  (*c >= '0' && *c <= '9' && c > name)))
			name = "";
	if (strlen(name) == 0 || strlen(name) >= NAMEDATALEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("invalid projection name \"%s\"", text_to_cstring(PG_GETARG_TEXT_PP(0))),
				 errdetail("It must be 1 to 63 lower-case letters, digits and underscores, starting with a letter or an underscore.")));

	/* the target: a plain table the caller may read and write */
	if (get_rel_relkind(target) != RELKIND_RELATION &&
		get_rel_relkind(target) != RELKIND_PARTITIONED_TABLE)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("target \"%s\" of a projection must be a table",
						get_rel_name(target))));
	for (int m = 0; m < 4; m++)
		if (pg_class_aclcheck(target, GetUserId(), modes[m]) != ACLCHECK_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied for table %s", get_rel_name(target)),
					 errdetail("The projection's role needs SELECT, INSERT, UPDATE and DELETE on its target table.")));
	rowtype = get_rel_type_id(target);
	key_attno = get_attnum(target, key);
	if (key_attno == InvalidAttrNumber)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("column \"%s\" of relation \"%s\" does not exist",
						key, get_rel_name(target))));
	if (getBaseType(get_atttype(target, key_attno)) != TEXTOID)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("key column \"%s\" must be of type text", key),
				 errdetail("It holds the aggregate id.")));

	/* apply_function: (target, cqrs.command_log) RETURNS target */
	log_type = get_rel_type_id(cqrs_relid(CQRS_REL_COMMAND_LOG));
	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(apply));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for function %u", apply);
	proc = (Form_pg_proc) GETSTRUCT(tup);
	fits = (proc->pronargs == 2 && proc->proargtypes.values[0] == rowtype &&
			proc->proargtypes.values[1] == log_type &&
			proc->prorettype == rowtype && !proc->proretset &&
			proc->prokind == PROKIND_FUNCTION);
	strict = proc->proisstrict;
	ReleaseSysCache(tup);
	if (!fits)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_FUNCTION_DEFINITION),
				 errmsg("apply function %s must take (%s, cqrs.command_log) and return %s",
						format_procedure(apply), format_type_be(rowtype),
						format_type_be(rowtype))));
	if (strict)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_FUNCTION_DEFINITION),
				 errmsg("apply function %s must not be STRICT", format_procedure(apply)),
				 errdetail("It is called with a NULL state for an aggregate's first command.")));
	if (CQRS_PROC_ACLCHECK(apply, GetUserId(), ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for function %s", format_procedure(apply))));

	cqrs_repair_begin(&scope, "cqrs.create_projection()");
	{
		Oid			one[1] = {TEXTOID};
		Datum		v[1] = {CStringGetTextDatum(aggregate)};

		/* not read-only: what committed while this waited for the lock */
		if (SPI_execute_with_args("SELECT FROM cqrs.aggregate_type"
								  " WHERE name OPERATOR(pg_catalog.=) $1",
								  1, one, v, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not read cqrs.aggregate_type");
		if (SPI_processed == 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("aggregate type \"%s\" does not exist", aggregate)));
		if (strcmp(aggregate, "order") == 0)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("the orders commands have the built-in projection \"orders\" only")));
		v[0] = CStringGetTextDatum(name);
		if (SPI_execute_with_args("SELECT FROM cqrs.projection"
								  " WHERE name OPERATOR(pg_catalog.=) $1",
								  1, one, v, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not read cqrs.projection");
		if (SPI_processed > 0)
			ereport(ERROR,
					(errcode(ERRCODE_DUPLICATE_OBJECT),
					 errmsg("projection \"%s\" already exists", name)));
	}
	/* ON CONFLICT needs a unique index on the key column alone */
	{
		Oid			argt[2] = {OIDOID, INT2OID};
		Datum		argv[2] = {ObjectIdGetDatum(target), Int16GetDatum(key_attno)};

		if (SPI_execute_with_args("SELECT FROM pg_catalog.pg_index AS i"
								  " WHERE i.indrelid OPERATOR(pg_catalog.=) $1"
								  " AND i.indisunique AND i.indimmediate"
								  " AND i.indnkeyatts OPERATOR(pg_catalog.=) 1"
								  " AND i.indkey[0] OPERATOR(pg_catalog.=) $2"
								  " AND i.indpred IS NULL AND i.indexprs IS NULL",
								  2, argt, argv, NULL, true, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not read pg_index");
		if (SPI_processed == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_COLUMN_REFERENCE),
					 errmsg("key column \"%s\" of table %s has no unique index of its own",
							key, get_rel_name(target)),
					 errhint("Make it the table's primary key.")));
	}

	values[0] = CStringGetTextDatum(name);
	values[1] = CStringGetTextDatum(aggregate);
	values[2] = CStringGetTextDatum(quote_qualified_identifier(get_namespace_name(get_rel_namespace(target)),
															   get_rel_name(target)));
	values[3] = PG_GETARG_DATUM(3);
	values[4] = CStringGetTextDatum(format_procedure_qualified(apply));
	values[5] = ObjectIdGetDatum(owner);
	if (SPI_execute_with_args("INSERT INTO cqrs.projection"
							  " (name, aggregate_type, target, key_column, apply_function, owner)"
							  " VALUES ($1, $2, $3, $4, $5, CAST($6 AS pg_catalog.regrole))",
							  6, types, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not insert into cqrs.projection");
	CommandCounterIncrement();
	defs_valid = false;
	defs_load();
	i = defs_find(name);
	if (i < 0)
		elog(ERROR, "projection \"%s\" not found after its creation", name);

	memset(&stats, 0, sizeof(stats));
	n = projection_fill(i, &stats);
	cqrs_spi_finish(&scope);
	ereport(NOTICE,
			(errmsg("projection \"%s\" folded " INT64_FORMAT " commands: " INT64_FORMAT " applied, " INT64_FORMAT " parked, " INT64_FORMAT " dead-lettered",
					name, n, stats.applied, stats.parked, stats.dead)));
	PG_RETURN_INT64(n);
}

/*
 * cqrs.drop_projection(name text) RETURNS void
 */
Datum
drop_projection(PG_FUNCTION_ARGS)
{
	char	   *name = projection_name_arg(fcinfo, 0);
	CqrsOwnerScope scope;
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(name)};

	cqrs_repair_begin(&scope, "cqrs.drop_projection()");
	if (SPI_execute_with_args("SELECT FROM cqrs.projection"
							  " WHERE name OPERATOR(pg_catalog.=) $1 AND builtin",
							  1, types, values, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read cqrs.projection");
	if (SPI_processed > 0)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("projection \"%s\" is built in", name)));
	/* its Redis keys go: the projector finds no projection for them */
	cqrs_redis_stale_projection(name);
	if (SPI_execute_with_args("WITH v AS (DELETE FROM cqrs.projection_version"
							  "           WHERE projection OPERATOR(pg_catalog.=) $1),"
							  " d AS (DELETE FROM cqrs.dead_letter"
							  "       WHERE projection OPERATOR(pg_catalog.=) $1)"
							  " DELETE FROM cqrs.projection WHERE name OPERATOR(pg_catalog.=) $1",
							  1, types, values, NULL, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "could not delete from cqrs.projection");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("projection \"%s\" does not exist", name)));
	cqrs_spi_finish(&scope);
	PG_RETURN_VOID();
}

/*
 * cqrs.rebuild(projection text) RETURNS bigint
 *
 * Replay the log into one declared projection's table, in one
 * transaction, as cqrs.create_projection() filled it.
 */
Datum
rebuild_projection(PG_FUNCTION_ARGS)
{
	char	   *name = projection_name_arg(fcinfo, 0);
	CqrsOwnerScope scope;
	CqrsApplyStats stats;
	int64		n;

	cqrs_repair_begin(&scope, "cqrs.rebuild()");
	memset(&stats, 0, sizeof(stats));
	n = projection_fill(projection_lookup(name), &stats);
	cqrs_spi_finish(&scope);
	ereport(LOG,
			(errmsg("cqrs.rebuild('%s') replayed " INT64_FORMAT " commands: " INT64_FORMAT " applied, " INT64_FORMAT " parked, " INT64_FORMAT " dead-lettered",
					name, n, stats.applied, stats.parked, stats.dead)));
	PG_RETURN_INT64(n);
}

/*
 * cqrs.verify(projection text) RETURNS TABLE (aggregate_id text,
 *		expected text, actual text)
 *
 * Fold the whole log in memory, as a rebuild would, and compare each
 * aggregate's row with the table's; rows of aggregates the log does not
 * have are listed too.
 */
Datum
verify_projection(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *name = projection_name_arg(fcinfo, 0);
	CqrsOwnerScope scope;
	Fold		f;
	int			i;
	static SPIPlanPtr strays_plan = NULL;
	static const char *strays_sql =
		"SELECT pg_catalog.array_agg(k) FROM pg_catalog.unnest($1) AS k"
		" WHERE NOT EXISTS (SELECT FROM cqrs.command_log AS l"
		"                   WHERE l.aggregate_id OPERATOR(pg_catalog.=) k)";
	Oid			key_type[1] = {TEXTARRAYOID};
	char	   *keys_sql;
	Datum		keys;
	bool		isnull;
	Relation	rel;
	Oid			save_userid;
	int			save_sec;
	Oid			out_func;
	bool		varlena;

	InitMaterializedSRF(fcinfo, 0);
	cqrs_spi_connect_as_owner(&scope);
	i = projection_lookup(name);
	memset(&f, 0, sizeof(f));
	f.mode = FOLD_VERIFY;
	f.out = rsinfo->setResult;
	f.out_desc = rsinfo->setDesc;

	/*
	 * A command the projection's table refused stays refused: the fold
	 * writes nothing, so it would not see the table refuse it again.
	 */
	{
		Oid			argtypes[1] = {TEXTOID};
		Datum		values[1] = {CStringGetTextDatum(name)};

		if (SPI_execute_with_args("SELECT command_id FROM cqrs.dead_letter"
								  " WHERE projection OPERATOR(pg_catalog.=) $1",
								  1, argtypes, values, NULL, true, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not read cqrs.dead_letter");
		for (uint64 r = 0; r < SPI_processed; r++)
		{
			Failure    *fl = palloc0(sizeof(Failure));

			memcpy(&fl->command_id,
				   DatumGetUUIDP(SPI_getbinval(SPI_tuptable->vals[r],
											   SPI_tuptable->tupdesc, 1, &isnull)),
				   sizeof(pg_uuid_t));
			fl->projection = i;
			f.failures = lappend(f.failures, fl);
		}
	}
	(void) projection_scan(&f, i);

	/*
	 * Rows of aggregates without commands: the keys read as the
	 * projection's role, looked up in the log as the extension's owner,
	 * and the rows of those not found read as the projection's role.
	 */
	rel = relation_open(projections[i].target, AccessShareLock);
	keys_sql = psprintf("SELECT pg_catalog.array_agg(CAST(t.%s AS pg_catalog.text)) FROM %s AS t",
						quote_identifier(NameStr(TupleDescAttr(RelationGetDescr(rel),
															   projections[i].key_attno - 1)->attname)),
						quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
												   RelationGetRelationName(rel)));
	relation_close(rel, AccessShareLock);
	fold_enter(i, &save_userid, &save_sec);
	if (SPI_execute(keys_sql, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read the table of projection \"%s\"", name);
	fold_leave(save_userid, save_sec);
	keys = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (isnull)
	{
		cqrs_spi_finish(&scope);
		return (Datum) 0;
	}
	keys = datumCopy(keys, false, -1);
	(void) cqrs_exec(cqrs_keep_plan(&strays_plan, strays_sql, 1, key_type),
					 &keys, NULL, 0, SPI_OK_SELECT);
	keys = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (isnull)
	{
		cqrs_spi_finish(&scope);
		return (Datum) 0;
	}
	keys = datumCopy(keys, false, -1);
	getTypeOutputInfo(projections[i].rowtype, &out_func, &varlena);
	fold_enter(i, &save_userid, &save_sec);
	(void) cqrs_exec(cqrs_keep_plan(&projections[i].load_plan,
									projections[i].load_sql, 1, key_type),
					 &keys, NULL, 0, SPI_OK_SELECT);
	fold_leave(save_userid, save_sec);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		Datum		values[3];
		bool		nulls[3] = {false, true, false};

		values[0] = SPI_getbinval(tup, SPI_tuptable->tupdesc, 1, &isnull);
		values[2] = CStringGetTextDatum(OidOutputFunctionCall(out_func,
															  SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &isnull)));
		tuplestore_putvalues(f.out, f.out_desc, values, nulls);
	}
	cqrs_spi_finish(&scope);
	return (Datum) 0;
}
