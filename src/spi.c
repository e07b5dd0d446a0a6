/*-------------------------------------------------------------------------
 *
 * spi.c
 *		Plans kept for the life of a process, shared by the command path,
 *		the administration functions and the projector; and the switch to
 *		the extension's owner that the SQL-callable functions run under.
 *
 * Every statement cqrs runs through SPI is fixed text with parameters,
 * fully schema-qualified, prepared once per process and kept.  The plan
 * cache re-plans a kept statement when the objects it uses change, with
 * the search_path it was prepared under; since nothing in the text depends
 * on search_path, that is harmless too.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/inval.h"
#include "utils/resowner.h"
#include "utils/syscache.h"

#include "cqrs.h"

/*
 * Prepare sql on first use, keep the plan in *cache, and return it.
 */
SPIPlanPtr
cqrs_keep_plan(SPIPlanPtr *cache, const char *sql, int nargs, Oid *argtypes)
{
	if (*cache == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed for \"%s\": %s",
				 sql, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "SPI_keepplan failed");
		*cache = plan;
	}
	return *cache;
}

/*
 * OIDs of the extension's relations this process has looked up, and the
 * owner of the log, forgotten when a relcache invalidation may concern
 * them (the extension dropped and created again, an owner changed).
 */
static const char *const relation_names[CQRS_RELATIONS] = {
	[CQRS_REL_COMMAND_LOG] = "command_log",
	[CQRS_REL_COMMAND_TYPE] = "command_type",
	[CQRS_REL_PROJECTION] = "projection",
	[CQRS_REL_PARKED] = "parked",
};
static Oid	relation_oids[CQRS_RELATIONS];
static Oid	log_owner = InvalidOid;

static void
spi_relation_invalidate(Datum arg, Oid relid)
{
	for (int i = 0; i < CQRS_RELATIONS; i++)
	{
		if (relid == InvalidOid || relid == relation_oids[i])
		{
			if (i == CQRS_REL_COMMAND_LOG)
				log_owner = InvalidOid;
			relation_oids[i] = InvalidOid;
		}
	}
}

/*
 * The OID of one of the extension's relations; ERROR when it is missing.
 */
Oid
cqrs_relid(CqrsRelation rel)
{
	static bool registered = false;

	if (!registered)
	{
		CacheRegisterRelcacheCallback(spi_relation_invalidate, (Datum) 0);
		registered = true;
	}
	if (!OidIsValid(relation_oids[rel]))
	{
		Oid			relid = get_relname_relid(relation_names[rel],
											  get_namespace_oid("cqrs", false));

		if (!OidIsValid(relid))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_TABLE),
					 errmsg("relation \"cqrs.%s\" does not exist",
							relation_names[rel])));
		relation_oids[rel] = relid;
	}
	return relation_oids[rel];
}

/*
 * Are the extension's objects those of version 0.2.0 or later?  A server
 * runs the library of the newest version, while the objects stay those of
 * the version installed until ALTER EXTENSION cqrs UPDATE: what differs
 * is chosen per call.  (The column that version added to cqrs.parked
 * tells, from the syscache.)
 */
bool
cqrs_schema_020(void)
{
	return get_attnum(cqrs_relid(CQRS_REL_PARKED), "created_at") != InvalidAttrNumber;
}

/*
 * Connect to SPI as the owner of cqrs.command_log, who owns every object
 * of the extension: the command functions append, and the administration
 * functions read and repair, as that owner (as RI triggers run as the
 * table owner), so their callers need EXECUTE only.  The caller's identity
 * is kept in *scope for cqrs_spi_finish(); transaction abort restores it
 * on error.
 */
void
cqrs_spi_connect_as_owner(CqrsOwnerScope *scope)
{
	if (!OidIsValid(log_owner))
	{
		Oid			relid = cqrs_relid(CQRS_REL_COMMAND_LOG);
		HeapTuple	tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));

		if (!HeapTupleIsValid(tuple))
			elog(ERROR, "cache lookup failed for relation %u", relid);
		log_owner = ((Form_pg_class) GETSTRUCT(tuple))->relowner;
		ReleaseSysCache(tuple);
	}

	GetUserIdAndSecContext(&scope->save_userid, &scope->save_sec_context);
	SetUserIdAndSecContext(log_owner,
						   scope->save_sec_context |
						   SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_NOFORCE_RLS);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
}

/*
 * Disconnect from SPI and become the caller again.
 */
void
cqrs_spi_finish(CqrsOwnerScope *scope)
{
	SPI_finish();
	SetUserIdAndSecContext(scope->save_userid, scope->save_sec_context);
}

/*
 * Run a kept plan (nulls as SPI_execute_plan() takes them, or NULL),
 * reading at most tcount rows (0: all); ERROR unless it returns the
 * expected code.  Returns the number of rows processed.
 */
uint64
cqrs_exec(SPIPlanPtr plan, Datum *values, const char *nulls, long tcount,
		  int expected)
{
	int			ret = SPI_execute_plan(plan, values, nulls, false, tcount);

	if (ret != expected)
		elog(ERROR, "SPI_execute_plan returned %s",
			 SPI_result_code_string(ret));
	return SPI_processed;
}

/*
 * Run fn(arg) in a subtransaction of the current transaction.  Returns NULL
 * when it succeeded (the subtransaction is committed into its parent), or
 * else its error, copied into the caller's memory context, once the
 * subtransaction has been rolled back.
 */
ErrorData *
cqrs_try_subtransaction(void (*fn) (void *arg), void *arg)
{
	MemoryContext context = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	ErrorData  *volatile edata = NULL;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(context);
	PG_TRY();
	{
		fn(arg);
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(context);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(context);
	CurrentResourceOwner = owner;
	return edata;
}

/*
 * Column col (1-based) of a row SPI returned, a text column, as a C
 * string in the current memory context; NULL when it is null.  Cheaper
 * than SPI_getvalue(), which looks the type's output function up for
 * every value.
 */
char *
cqrs_spi_text(HeapTuple tuple, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		value = SPI_getbinval(tuple, desc, col, &isnull);

	Assert(TupleDescAttr(desc, col - 1)->atttypid == TEXTOID);
	return isnull ? NULL : TextDatumGetCString(value);
}
