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
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/lsyscache.h"
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
 * Switch to the owner of cqrs.command_log, who owns every object of the
 * extension: the command functions append, and the administration
 * functions read and repair, as that owner (as RI triggers run as the
 * table owner), so their callers need EXECUTE only.  The caller restores
 * its identity, or transaction abort does on error.
 */
void
cqrs_become_owner(void)
{
	Oid			nspid = get_namespace_oid("cqrs", false);
	Oid			relid = get_relname_relid("command_log", nspid);
	HeapTuple	tuple;
	Oid			owner;
	Oid			save_userid;
	int			save_sec_context;

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation \"cqrs.command_log\" does not exist")));

	tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	if (!HeapTupleIsValid(tuple))
		elog(ERROR, "cache lookup failed for relation %u", relid);
	owner = ((Form_pg_class) GETSTRUCT(tuple))->relowner;
	ReleaseSysCache(tuple);

	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(owner,
						   save_sec_context |
						   SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_NOFORCE_RLS);
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
