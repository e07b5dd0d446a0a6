/*-------------------------------------------------------------------------
 *
 * admin.c
 *		SQL-callable administration: the projector's shared state for the
 *		cqrs.status view.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xlog.h"
#include "commands/dbcommands.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "replication/slot.h"
#include "utils/builtins.h"
#include "utils/float.h"
#include "utils/pg_lsn.h"
#include "utils/tuplestore.h"
#include "utils/timestamp.h"

#include "cqrs.h"

PG_FUNCTION_INFO_V1(worker_status);
PG_FUNCTION_INFO_V1(lag_histogram);

static const char *const state_names[] = {
	[CQRS_STATE_IDLE] = "idle",
	[CQRS_STATE_RUNNING] = "running",
	[CQRS_STATE_CATCHING_UP] = "catching_up",
	[CQRS_STATE_DISABLED] = "disabled",
	[CQRS_STATE_ERROR] = "error",
};

/*
 * What keeps the projector from running in this server, or NULL.
 */
static const char *
admin_missing_requirement(void)
{
	if (cqrs_shared == NULL)
		return "cqrs is not in shared_preload_libraries; add it and restart the server";
	if (wal_level < WAL_LEVEL_LOGICAL)
		return "wal_level must be logical; set it and restart the server";
	if (max_replication_slots < 1)
		return "max_replication_slots must be at least 1";
	if (cqrs_workers < 1)
		return "cqrs.workers is 0: no projector runs";
	if (strcmp(cqrs_database, get_database_name(MyDatabaseId)) != 0)
		return psprintf("the projector serves database \"%s\" (cqrs.database), not this one",
						cqrs_database);
	return NULL;
}

/*
 * cqrs.worker_status() RETURNS record: the shared state behind cqrs.status.
 */
Datum
worker_status(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[13];
	bool		nulls[13];
	const char *missing = admin_missing_requirement();
	CqrsShared	snap;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);
	memset(nulls, true, sizeof(nulls));

	values[1] = CStringGetTextDatum(cqrs_slot_name);
	nulls[1] = false;

	if (missing != NULL)
	{
		values[0] = CStringGetTextDatum("not_configured");
		nulls[0] = false;
		values[11] = CStringGetTextDatum(missing);
		nulls[11] = false;
		PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
	}

	SpinLockAcquire(&cqrs_shared->mutex);
	memcpy(&snap, cqrs_shared, sizeof(CqrsShared));
	SpinLockRelease(&cqrs_shared->mutex);

	if (!cqrs_enabled)
		values[0] = CStringGetTextDatum("disabled");
	else if (snap.leader_pid == 0 && snap.workers_alive == 0)
	{
		values[0] = CStringGetTextDatum("not_configured");
		if (snap.last_error[0] == '\0')
		{
			strlcpy(snap.last_error,
					"no cqrs projector process is running; check max_worker_processes and the server log",
					CQRS_ERROR_LEN);
			snap.last_error_at = 0;
		}
	}
	else if (snap.leader_pid == 0)
		values[0] = CStringGetTextDatum(snap.state == CQRS_STATE_ERROR ?
										"error" : "starting");
	else
		values[0] = CStringGetTextDatum(state_names[snap.state]);
	nulls[0] = false;

	if (snap.leader_pid != 0)
	{
		values[2] = Int32GetDatum(snap.leader_pid);
		nulls[2] = false;
	}
	if (!XLogRecPtrIsInvalid(snap.applied_lsn))
	{
		values[3] = LSNGetDatum(snap.applied_lsn);
		nulls[3] = false;
	}
	values[4] = Float8GetDatum(snap.last_lag_ms / 1000.0);
	values[5] = Int32GetDatum(snap.batch_size);
	values[6] = Int32GetDatum(snap.last_batch_size);
	values[7] = Float8GetDatum(snap.last_batch_ms);
	values[8] = Int64GetDatum((int64) snap.applied_total);
	values[9] = Int64GetDatum((int64) snap.batches_total);
	for (int i = 4; i <= 9; i++)
		nulls[i] = false;
	values[10] = CStringGetTextDatum("disabled");
	nulls[10] = false;
	if (snap.last_error[0] != '\0')
	{
		values[11] = CStringGetTextDatum(snap.last_error);
		nulls[11] = false;
		if (snap.last_error_at != 0)
		{
			values[12] = TimestampTzGetDatum(snap.last_error_at);
			nulls[12] = false;
		}
	}

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * cqrs.lag_histogram() RETURNS TABLE(le_ms float8, commands bigint): how
 * many commands reached the read model within le_ms of their commit, per
 * bucket (not cumulative; the last bucket, le_ms infinity, is the rest).
 */
Datum
lag_histogram(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	uint64		counts[CQRS_LAG_BUCKETS + 1];

	InitMaterializedSRF(fcinfo, 0);
	if (cqrs_shared == NULL)
		return (Datum) 0;

	SpinLockAcquire(&cqrs_shared->mutex);
	memcpy(counts, cqrs_shared->lag_histogram, sizeof(counts));
	SpinLockRelease(&cqrs_shared->mutex);

	for (int b = 0; b <= CQRS_LAG_BUCKETS; b++)
	{
		Datum		values[2];
		bool		nulls[2] = {false, false};

		values[0] = Float8GetDatum(b < CQRS_LAG_BUCKETS ?
								   cqrs_lag_bucket_ms[b] : get_float8_infinity());
		values[1] = Int64GetDatum((int64) counts[b]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
