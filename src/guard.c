/*-------------------------------------------------------------------------
 *
 * guard.c
 *		The trigger that keeps cqrs.command_log append-only.
 *
 * The projection, idempotency and rebuild all assume that a committed
 * command never changes or disappears, so UPDATE, DELETE and TRUNCATE are
 * refused for every role, superusers included.  The trigger is statement-
 * level (it fires even when no row matches) and ENABLE ALWAYS (it fires
 * under session_replication_role = replica too).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "commands/trigger.h"
#include "fmgr.h"

#include "cqrs.h"

PG_FUNCTION_INFO_V1(command_log_append_only);

/*
 * Trigger function: refuse the statement that fired it.
 */
Datum
command_log_append_only(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	const char *operation;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("command_log_append_only() must be called as a trigger")));

	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
		operation = "UPDATE";
	else if (TRIGGER_FIRED_BY_DELETE(trigdata->tg_event))
		operation = "DELETE";
	else if (TRIGGER_FIRED_BY_TRUNCATE(trigdata->tg_event))
		operation = "TRUNCATE";
	else
		operation = "this statement";

	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("cqrs.command_log is append-only"),
			 errdetail("%s is not allowed on the command log, for any role.",
					   operation),
			 errhint("Record a compensating command, for example with cqrs.cancel_order().")));

	PG_RETURN_NULL();			/* keep compiler quiet */
}
