/*-------------------------------------------------------------------------
 *
 * admin.c
 *		SQL-callable administration: the projector's shared state for the
 *		cqrs.status view, pause and resume, the read-your-writes fences
 *		cqrs.wait_for() and cqrs.wait_for_lsn(), and the metrics.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "commands/dbcommands.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "replication/slot.h"
#include "utils/builtins.h"
#include "utils/float.h"
#include "utils/jsonb.h"
#include "utils/pg_lsn.h"
#include "utils/tuplestore.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"
#include "utils/wait_event.h"

#include "cqrs.h"

PG_FUNCTION_INFO_V1(worker_status);
PG_FUNCTION_INFO_V1(lag_histogram);
PG_FUNCTION_INFO_V1(pause_projection);
PG_FUNCTION_INFO_V1(resume_projection);
PG_FUNCTION_INFO_V1(projector_state_changed);
PG_FUNCTION_INFO_V1(wait_for);
PG_FUNCTION_INFO_V1(wait_for_lsn);
PG_FUNCTION_INFO_V1(metrics);
PG_FUNCTION_INFO_V1(prometheus);

/* How often cqrs.wait_for() looks again on a standby, in ms. */
#define CQRS_STANDBY_POLL_MS	10

static const char *const state_names[] = {
	[CQRS_STATE_IDLE] = "idle",
	[CQRS_STATE_RUNNING] = "running",
	[CQRS_STATE_CATCHING_UP] = "catching_up",
	[CQRS_STATE_DISABLED] = "disabled",
	[CQRS_STATE_ERROR] = "error",
	[CQRS_STATE_PAUSED] = "paused",
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
	else if (snap.pause_requested && snap.state != CQRS_STATE_PAUSED)
		values[0] = CStringGetTextDatum("pausing");	/* until it stops */
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
	values[4] = Float8GetDatum(cqrs_lag_seconds(&snap, GetCurrentTimestamp()));
	values[5] = Int32GetDatum(snap.batch_size);
	values[6] = Int32GetDatum(snap.last_batch_size);
	values[7] = Float8GetDatum(snap.last_batch_ms);
	values[8] = Int64GetDatum((int64) snap.applied_total);
	values[9] = Int64GetDatum((int64) snap.batches_total);
	for (int i = 4; i <= 9; i++)
		nulls[i] = false;
	values[10] = CStringGetTextDatum(cqrs_redis_state_name());
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

/*
 * Whether this transaction changed cqrs.projector_state, so that its
 * commit must tell the projectors.
 */
static bool control_changed = false;
static int	control_paused = -1;	/* what pause()/resume() asked, or -1 */
static bool control_callback_registered = false;

static void
admin_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (control_changed)
				cqrs_control_changed(control_paused);
			control_changed = false;
			control_paused = -1;
			break;
		case XACT_EVENT_PRE_PREPARE:
			/* COMMIT PREPARED runs no callback: the projector would never know */
			if (control_changed)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("cannot PREPARE a transaction that called cqrs.pause() or cqrs.resume()")));
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			control_changed = false;
			control_paused = -1;
			break;
		default:
			break;
	}
}

/*
 * Tell the projectors, when this transaction commits, that
 * cqrs.projector_state changed.
 */
static void
admin_note_control_change(void)
{
	if (!control_callback_registered)
	{
		RegisterXactCallback(admin_xact_callback, NULL);
		control_callback_registered = true;
	}
	control_changed = true;
}

/*
 * Statement trigger on cqrs.projector_state: whoever changes it (a pause,
 * a resume, a restore of a dump), the projectors read it again once the
 * change commits.
 */
Datum
projector_state_changed(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("projector_state_changed() must be called as a trigger")));
	admin_note_control_change();
	return PointerGetDatum(NULL);
}

/*
 * Record in cqrs.projector_state whether projection is paused; the
 * projectors learn it when this transaction commits.  The table holds at
 * most one row, and none until the first pause: an installation's own row
 * would collide with the one a dump restores.
 */
static void
admin_set_paused(bool paused)
{
	static SPIPlanPtr plan = NULL;
	static const char *sql =
		"INSERT INTO cqrs.projector_state AS s (paused, changed_at, changed_by)"
		" VALUES ($1, pg_catalog.now(), $2)"
		" ON CONFLICT (singleton) DO UPDATE SET paused = excluded.paused,"
		" changed_at = excluded.changed_at, changed_by = excluded.changed_by";
	Oid			argtypes[2] = {BOOLOID, NAMEOID};
	Datum		values[2];
	CqrsOwnerScope scope;

	values[0] = BoolGetDatum(paused);
	values[1] = DirectFunctionCall1(namein,
									CStringGetDatum(GetUserNameFromId(GetUserId(), false)));

	cqrs_spi_connect_as_owner(&scope);
	if (cqrs_exec(cqrs_keep_plan(&plan, sql, 2, argtypes), values, NULL, 0,
				  SPI_OK_INSERT) != 1)
		elog(ERROR, "could not record the pause in cqrs.projector_state");
	cqrs_spi_finish(&scope);
	/* the trigger does too, but an installation not yet updated to 0.2.0 has none */
	admin_note_control_change();
	control_paused = paused ? 1 : 0;
}

/*
 * cqrs.pause() RETURNS void: stop projecting after the current batch, until
 * cqrs.resume(), across restarts.
 */
Datum
pause_projection(PG_FUNCTION_ARGS)
{
	admin_set_paused(true);
	PG_RETURN_VOID();
}

/*
 * cqrs.resume() RETURNS void: project again, from where the pause left.
 */
Datum
resume_projection(PG_FUNCTION_ARGS)
{
	admin_set_paused(false);
	PG_RETURN_VOID();
}

/*
 * A timeout interval argument in milliseconds; negative is an error.
 */
static long
admin_timeout_ms(Interval *timeout)
{
	double		ms;

	/* in double: a timeout of centuries must not overflow */
	ms = (timeout->time +
		  ((double) timeout->month * DAYS_PER_MONTH + timeout->day) * USECS_PER_DAY) / 1000.0;
	if (ms < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("timeout must not be negative")));
	return (long) Min(ms, (double) PG_INT32_MAX);
}

/*
 * Sleep until done(arg) is true or timeout_ms has passed; true when done.
 * The projector broadcasts applied_cv whenever it has applied more, so
 * this sleeps on that condition variable; "poll_ms" bounds each sleep for
 * progress nobody broadcasts (a standby replaying the primary's batches).
 */
static bool
admin_wait(bool (*done) (void *), void *arg, long timeout_ms, long poll_ms)
{
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													   timeout_ms);
	bool		result;

	if (cqrs_shared == NULL)
		return done(arg);

	ConditionVariablePrepareToSleep(&cqrs_shared->applied_cv);
	for (;;)
	{
		long		remaining;

		if ((result = done(arg)))
			break;
		remaining = TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
													deadline);
		if (remaining <= 0)
			break;
		(void) ConditionVariableTimedSleep(&cqrs_shared->applied_cv,
										   Min(remaining, poll_ms),
										   PG_WAIT_EXTENSION);
	}
	ConditionVariableCancelSleep();
	return result;
}

/* cqrs.wait_for(): is the command processed? */
static bool
admin_command_done(void *arg)
{
	/*
	 * An order's command is processed once the read model's row reached
	 * its sequence; a declared one once every declared projection of its
	 * aggregate type did (at once when none follows it); either once it
	 * is dead-lettered.
	 */
	static const char *const sql[2] = {
		/* 0.1.0 not updated yet: orders only */
		"SELECT EXISTS (SELECT FROM cqrs.command_log AS l"
		" WHERE l.command_id OPERATOR(pg_catalog.=) $1"
		" AND (EXISTS (SELECT FROM cqrs.read_model AS r"
		"              WHERE r.order_id OPERATOR(pg_catalog.=) l.aggregate_id"
		"              AND r.version OPERATOR(pg_catalog.>=) l.sequence_id)"
		"      OR EXISTS (SELECT FROM cqrs.dead_letter AS d"
		"                 WHERE d.command_id OPERATOR(pg_catalog.=) $1)))",
		"SELECT EXISTS (SELECT FROM cqrs.command_log AS l"
		" WHERE l.command_id OPERATOR(pg_catalog.=) $1"
		" AND (EXISTS (SELECT FROM cqrs.dead_letter AS d"
		"              WHERE d.command_id OPERATOR(pg_catalog.=) $1)"
		"      OR CASE WHEN l.command_type OPERATOR(pg_catalog.=) ANY"
		"                   ('{CREATE_ORDER,SHIP_ORDER,CANCEL_ORDER}'::pg_catalog.text[])"
		"         THEN EXISTS (SELECT FROM cqrs.read_model AS r"
		"              WHERE r.order_id OPERATOR(pg_catalog.=) l.aggregate_id"
		"              AND r.version OPERATOR(pg_catalog.>=) l.sequence_id)"
		"         ELSE NOT EXISTS (SELECT FROM cqrs.projection AS p"
		"              JOIN cqrs.command_type AS t"
		"                ON t.aggregate_type OPERATOR(pg_catalog.=) p.aggregate_type"
		"              WHERE t.name OPERATOR(pg_catalog.=) l.command_type"
		"              AND NOT p.builtin"
		"              AND NOT EXISTS (SELECT FROM cqrs.projection_version AS v"
		"                  WHERE v.projection OPERATOR(pg_catalog.=) p.name"
		"                  AND v.aggregate_id OPERATOR(pg_catalog.=) l.aggregate_id"
		"                  AND v.version OPERATOR(pg_catalog.>=) l.sequence_id))"
		"         END))"};
	static SPIPlanPtr plans[2];
	int			v = cqrs_schema_020() ? 1 : 0;
	Oid			argtypes[1] = {UUIDOID};
	Datum		values[1] = {PointerGetDatum(arg)};
	bool		isnull;
	bool		done;

	/* read-write mode: every call sees what committed since the last */
	(void) cqrs_exec(cqrs_keep_plan(&plans[v], sql[v], 1, argtypes), values, NULL, 1,
					 SPI_OK_SELECT);
	done = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
									  SPI_tuptable->tupdesc, 1, &isnull));
	/* called over and over in one SPI connection: free as we go */
	SPI_freetuptable(SPI_tuptable);
	return done;
}

/* cqrs.wait_for(): is the command in the log at all? */
static bool
admin_command_known(pg_uuid_t *command_id)
{
	static SPIPlanPtr plan = NULL;
	static const char *sql =
		"SELECT FROM cqrs.command_log WHERE command_id OPERATOR(pg_catalog.=) $1";
	Oid			argtypes[1] = {UUIDOID};
	Datum		values[1] = {UUIDPGetDatum(command_id)};

	return cqrs_exec(cqrs_keep_plan(&plan, sql, 1, argtypes), values, NULL, 1,
					 SPI_OK_SELECT) > 0;
}

/*
 * cqrs.wait_for(command_id uuid, timeout interval) RETURNS boolean: true
 * once the command is processed (applied, or dead-lettered), false at the
 * timeout.  It reads the read model, the log and dead_letter, all of which
 * a streaming standby replays, so it works there too.  On the primary, a
 * command that is not in the log is an error at once rather than a wait
 * for the timeout; a standby waits for it, as it may not have arrived yet.
 */
Datum
wait_for(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *command_id = PG_GETARG_UUID_P(0);
	long		timeout_ms = admin_timeout_ms(PG_GETARG_INTERVAL_P(1));
	CqrsOwnerScope scope;
	bool		result;

	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cqrs.wait_for() cannot see the projection advance in a %s transaction",
						IsolationIsSerializable() ? "SERIALIZABLE" : "REPEATABLE READ"),
				 errhint("Call it in a READ COMMITTED transaction.")));

	cqrs_spi_connect_as_owner(&scope);
	if (!RecoveryInProgress() && !admin_command_known(command_id))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("command %s is not in the command log",
						DatumGetCString(DirectFunctionCall1(uuid_out,
															UUIDPGetDatum(command_id)))),
				 errhint("Wait for a command after the transaction that submitted it has committed.")));
	result = admin_wait(admin_command_done, command_id, timeout_ms,
						RecoveryInProgress() ? CQRS_STANDBY_POLL_MS : 1000);
	cqrs_spi_finish(&scope);

	PG_RETURN_BOOL(result);
}

/* cqrs.wait_for_lsn(): is everything committed before the LSN applied? */
static bool
admin_lsn_done(void *arg)
{
	XLogRecPtr	lsn = *(XLogRecPtr *) arg;
	XLogRecPtr	applied;

	SpinLockAcquire(&cqrs_shared->mutex);
	applied = cqrs_shared->applied_lsn;
	SpinLockRelease(&cqrs_shared->mutex);
	return !XLogRecPtrIsInvalid(applied) && applied >= lsn;
}

/*
 * cqrs.wait_for_lsn(lsn pg_lsn, timeout interval) RETURNS boolean: true
 * once every command committed up to lsn (for example
 * pg_current_wal_insert_lsn() after a commit) is in the read model, false
 * at the timeout.  The position is the projector's, so on a standby, use
 * cqrs.wait_for().
 */
Datum
wait_for_lsn(PG_FUNCTION_ARGS)
{
	XLogRecPtr	lsn = PG_GETARG_LSN(0);
	long		timeout_ms = admin_timeout_ms(PG_GETARG_INTERVAL_P(1));

	if (RecoveryInProgress())
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cqrs.wait_for_lsn() cannot be used during recovery"),
				 errdetail("A standby runs no projector; its read model follows the primary's."),
				 errhint("Use cqrs.wait_for(command_id) on a standby.")));
	if (cqrs_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cqrs is not in shared_preload_libraries")));
	if (!admin_lsn_done(&lsn))
		cqrs_request_read(lsn);
	PG_RETURN_BOOL(admin_wait(admin_lsn_done, &lsn, timeout_ms, 1000));
}

/*
 * Metrics.  One collector feeds both cqrs.metrics() (rows) and
 * cqrs.prometheus() (the text exposition format): first a family with its
 * type and help, then its samples, each with at most one label.
 */
typedef struct MetricSink
{
	void		(*family) (struct MetricSink *sink, const char *name,
						   const char *type, const char *help);
	void		(*sample) (struct MetricSink *sink, const char *name,
						   const char *label, const char *label_value,
						   double value);
	ReturnSetInfo *rsinfo;		/* cqrs.metrics() */
	StringInfo	buf;			/* cqrs.prometheus() */
} MetricSink;

/* The count query returns, run as the extension's owner. */
static int64
admin_count(const char *query)
{
	CqrsOwnerScope scope;
	bool		isnull;
	int64		n;

	cqrs_spi_connect_as_owner(&scope);
	if (SPI_execute(query, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not run \"%s\"", query);
	n = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
									SPI_tuptable->tupdesc, 1, &isnull));
	cqrs_spi_finish(&scope);
	return n;
}

/* A metric family of one sample without labels. */
static void
metric_single(MetricSink *sink, const char *name, const char *type,
			  const char *help, double value)
{
	sink->family(sink, name, type, help);
	sink->sample(sink, name, NULL, NULL, value);
}

/*
 * Per projection, from cqrs.projections: the aggregates it folded and its
 * dead letters.
 */
static void
admin_collect_projections(MetricSink *sink)
{
	CqrsOwnerScope scope;
	uint64		n;
	char	  **names;
	double	   *aggregates;
	double	   *dead;

	cqrs_spi_connect_as_owner(&scope);
	if (SPI_execute("SELECT name, aggregates, dead_letters FROM cqrs.projections"
					" ORDER BY name", true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read cqrs.projections");
	n = SPI_processed;
	names = palloc(sizeof(char *) * Max(n, 1));
	aggregates = palloc(sizeof(double) * Max(n, 1));
	dead = palloc(sizeof(double) * Max(n, 1));
	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		bool		isnull;

		names[i] = SPI_getvalue(tup, SPI_tuptable->tupdesc, 1);
		aggregates[i] = (double) DatumGetInt64(SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &isnull));
		dead[i] = (double) DatumGetInt64(SPI_getbinval(tup, SPI_tuptable->tupdesc, 3, &isnull));
	}
	cqrs_spi_finish(&scope);

	sink->family(sink, "cqrs_projection_aggregates", "gauge",
				 "Aggregates each projection has folded (rows of cqrs.read_model for the built-in one).");
	for (uint64 i = 0; i < n; i++)
		sink->sample(sink, "cqrs_projection_aggregates", "projection", names[i],
					 aggregates[i]);
	sink->family(sink, "cqrs_projection_dead_letters", "gauge",
				 "Commands in cqrs.dead_letter, by the projection that refused them.");
	for (uint64 i = 0; i < n; i++)
		sink->sample(sink, "cqrs_projection_dead_letters", "projection", names[i],
					 dead[i]);
}

static void
admin_collect(MetricSink *sink)
{
	CqrsShared	snap;
	TimestampTz now = GetCurrentTimestamp();
	XLogRecPtr	confirmed;
	double		slot_lag = 0;
	uint64		cumulative = 0;
	char		le[32];
	uint64		spans_buffered,
				spans_dropped,
				spans_exported,
				spans_failed;

	if (cqrs_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cqrs is not in shared_preload_libraries")));
	SpinLockAcquire(&cqrs_shared->mutex);
	memcpy(&snap, cqrs_shared, sizeof(CqrsShared));
	SpinLockRelease(&cqrs_shared->mutex);

	sink->family(sink, "cqrs_commands_total", "counter",
				 "Commands appended to the command log since the server started, by type.");
	for (int i = 0; i < CQRS_COMMAND_TYPES; i++)
		sink->sample(sink, "cqrs_commands_total", "type",
					 cqrs_command_type_names[i],
					 (double) pg_atomic_read_u64(&cqrs_shared->commands_total[i]));

	sink->family(sink, "cqrs_command_errors_total", "counter",
				 "Commands the command functions refused since the server started, by kind.");
	for (int i = 0; i < CQRS_ERROR_KINDS; i++)
		sink->sample(sink, "cqrs_command_errors_total", "kind",
					 cqrs_error_kind_names[i],
					 (double) pg_atomic_read_u64(&cqrs_shared->command_errors[i]));

	metric_single(sink, "cqrs_projected_total", "counter",
				  "Commands the projector applied or dead-lettered since the server started.",
				  (double) snap.applied_total);

	metric_single(sink, "cqrs_dead_letter_total", "counter",
				  "Commands the projector wrote to cqrs.dead_letter since the server started.",
				  (double) snap.dead_letter_total);

	metric_single(sink, "cqrs_slot_lost_total", "counter",
				  "Times the projector found its replication slot invalidated (the WAL it needed removed) and made a new one, folding the command log again, since the server started.",
				  (double) snap.slots_lost);

	metric_single(sink, "cqrs_spilled_total", "counter",
				  "Commands the projector wrote to a temporary file, their transaction being larger than cqrs.projector_work_mem, since the server started.",
				  (double) snap.spilled_total);

	metric_single(sink, "cqrs_parked", "gauge",
				  "Commands waiting in cqrs.parked for a missing predecessor.",
				  (double) admin_count("SELECT pg_catalog.count(*) FROM cqrs.parked"));

	if (cqrs_schema_020())
		admin_collect_projections(sink);

	metric_single(sink, "cqrs_projection_lag_seconds", "gauge",
				  "How long the oldest command not yet in the read model has waited since its commit (0 when none waits).",
				  cqrs_lag_seconds(&snap, now));

	if (!RecoveryInProgress())
	{
		confirmed = cqrs_slot_confirmed_lsn();
		if (!XLogRecPtrIsInvalid(confirmed) && GetXLogInsertRecPtr() > confirmed)
			slot_lag = (double) (GetXLogInsertRecPtr() - confirmed);
	}
	metric_single(sink, "cqrs_slot_lag_bytes", "gauge",
				  "WAL written since the position the projector's slot confirmed (what cqrs.max_lag limits).",
				  slot_lag);

	sink->family(sink, "cqrs_batch_flush_duration_seconds", "histogram",
				 "Time to apply and commit one projection batch.");
	for (int b = 0; b <= CQRS_FLUSH_BUCKETS; b++)
	{
		cumulative += snap.flush_histogram[b];
		if (b < CQRS_FLUSH_BUCKETS)
			snprintf(le, sizeof(le), "%g", cqrs_flush_bucket_s[b]);
		else
			strlcpy(le, "+Inf", sizeof(le));
		sink->sample(sink, "cqrs_batch_flush_duration_seconds_bucket", "le", le,
					 (double) cumulative);
	}
	sink->sample(sink, "cqrs_batch_flush_duration_seconds_sum", NULL, NULL,
				 snap.flush_seconds_sum);
	sink->sample(sink, "cqrs_batch_flush_duration_seconds_count", NULL, NULL,
				 (double) cumulative);

	metric_single(sink, "cqrs_cache_hit_ratio", "gauge",
				  "Share of the reads Redis served that found their key, from Redis's keyspace_hits and keyspace_misses (NaN until known).",
				  snap.redis_hits + snap.redis_misses > 0 ?
				  (double) snap.redis_hits / (double) (snap.redis_hits + snap.redis_misses) :
				  get_float8_nan());

	metric_single(sink, "cqrs_redis_connected", "gauge",
				  "1 while the projector writes through to Redis (cqrs.redis_url).",
				  strcmp(cqrs_redis_state_name(), "connected") == 0 ? 1 : 0);

	metric_single(sink, "cqrs_redis_writes_total", "counter",
				  "Redis keys the projector wrote since the server started.",
				  (double) snap.redis_writes_total);

	metric_single(sink, "cqrs_redis_errors_total", "counter",
				  "Failed Redis connections, commands and pipelines since the server started.",
				  (double) snap.redis_errors_total);

	metric_single(sink, "cqrs_redis_redirects_total", "counter",
				  "MOVED and ASK replies of a Redis Cluster the projector followed since the server started.",
				  (double) snap.redis_redirects_total);

	metric_single(sink, "cqrs_redis_backlog", "gauge",
				  "Orders whose Redis key the projector still has to write (rows in cqrs.redis_backlog).",
				  (double) admin_count("SELECT pg_catalog.count(*) FROM cqrs.redis_backlog"));

	if (cqrs_trace_counts(&spans_buffered, &spans_dropped, &spans_exported,
						  &spans_failed))
	{
		metric_single(sink, "cqrs_spans_buffered", "gauge",
					  "Finished spans waiting in shared memory to be exported or read (cqrs.spans()).",
					  (double) spans_buffered);
		metric_single(sink, "cqrs_spans_dropped_total", "counter",
					  "Spans dropped since the server started because cqrs.trace_max_spans were waiting.",
					  (double) spans_dropped);
		metric_single(sink, "cqrs_spans_exported_total", "counter",
					  "Spans the OpenTelemetry collector accepted since the server started.",
					  (double) spans_exported);
		metric_single(sink, "cqrs_spans_failed_total", "counter",
					  "Spans lost in export requests that failed since the server started.",
					  (double) spans_failed);
	}

	metric_single(sink, "cqrs_paused", "gauge",
				  "1 while projection is paused with cqrs.pause().",
				  snap.leader_pid != 0 && snap.state == CQRS_STATE_PAUSED ? 1 : 0);

	metric_single(sink, "cqrs_projector_running", "gauge",
				  "1 while a projector leads and applies (running or catching up).",
				  cqrs_enabled && snap.leader_pid != 0 &&
				  (snap.state == CQRS_STATE_RUNNING ||
				  snap.state == CQRS_STATE_CATCHING_UP) ? 1 : 0);
}

static void
rows_family(MetricSink *sink, const char *name, const char *type,
			const char *help)
{
}

static void
rows_sample(MetricSink *sink, const char *name, const char *label,
			const char *label_value, double value)
{
	Datum		values[3];
	bool		nulls[3] = {false, false, false};

	values[0] = CStringGetTextDatum(name);
	if (label != NULL)
	{
		JsonbParseState *state = NULL;
		JsonbValue	k,
					v;

		k.type = jbvString;
		k.val.string.val = unconstify(char *, label);
		k.val.string.len = strlen(label);
		v.type = jbvString;
		v.val.string.val = unconstify(char *, label_value);
		v.val.string.len = strlen(label_value);
		(void) pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
		(void) pushJsonbValue(&state, WJB_KEY, &k);
		(void) pushJsonbValue(&state, WJB_VALUE, &v);
		values[1] = JsonbPGetDatum(JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL)));
	}
	else
		values[1] = DirectFunctionCall1(jsonb_in, CStringGetDatum("{}"));
	values[2] = Float8GetDatum(value);
	tuplestore_putvalues(sink->rsinfo->setResult, sink->rsinfo->setDesc,
						 values, nulls);
}

/*
 * cqrs.metrics() RETURNS TABLE(name text, labels jsonb, value float8)
 */
Datum
metrics(PG_FUNCTION_ARGS)
{
	MetricSink	sink = {.family = rows_family, .sample = rows_sample};

	InitMaterializedSRF(fcinfo, 0);
	sink.rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	admin_collect(&sink);
	return (Datum) 0;
}

static void
text_family(MetricSink *sink, const char *name, const char *type,
			const char *help)
{
	appendStringInfo(sink->buf, "# HELP %s %s\n# TYPE %s %s\n",
					 name, help, name, type);
}

static void
text_sample(MetricSink *sink, const char *name, const char *label,
			const char *label_value, double value)
{
	appendStringInfoString(sink->buf, name);
	/* label values are our own constants: nothing to escape */
	if (label != NULL)
		appendStringInfo(sink->buf, "{%s=\"%s\"}", label, label_value);
	if (isnan(value))
		appendStringInfoString(sink->buf, " NaN\n");
	else
		appendStringInfo(sink->buf, " %.17g\n", value);
}

/*
 * cqrs.prometheus() RETURNS text: the metrics in the Prometheus text
 * exposition format (version 0.0.4).
 */
Datum
prometheus(PG_FUNCTION_ARGS)
{
	MetricSink	sink = {.family = text_family, .sample = text_sample};
	StringInfoData buf;

	initStringInfo(&buf);
	sink.buf = &buf;
	admin_collect(&sink);
	PG_RETURN_TEXT_P(cstring_to_text_with_len(buf.data, buf.len));
}
