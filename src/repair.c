/*-------------------------------------------------------------------------
 *
 * repair.c
 *		Repairing and rebuilding the read model from psql:
 *		cqrs.retry_dead_letter(), cqrs.skip_parked() and cqrs.rebuild().
 *
 * Each runs as the extension's owner (callers need EXECUTE only) and takes
 * the projection lock first, so it never interleaves with a batch of the
 * projector: it waits for the batch being applied, and the projector waits
 * (retrying with backoff) until it commits.  All three use the
 * projector's own fold (projector.c), so a repaired or rebuilt order is
 * exactly what the projector would have made of it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "cqrs.h"

PG_FUNCTION_INFO_V1(retry_dead_letter);
PG_FUNCTION_INFO_V1(skip_parked);
PG_FUNCTION_INFO_V1(rebuild);

/*
 * A function that folds outside the projector (a repair, a rebuild, a
 * projection's creation or drop): as the extension's owner, connected to
 * SPI, holding the projection lock (which also takes in definitions
 * committed while it waited).
 */
void
cqrs_repair_begin(CqrsOwnerScope *scope, const char *name)
{
	/* the read model moves under us: each statement needs a new snapshot */
	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("%s cannot run in a %s transaction", name,
						IsolationIsSerializable() ? "SERIALIZABLE" : "REPEATABLE READ"),
				 errhint("Call it in a READ COMMITTED transaction.")));
	cqrs_spi_connect_as_owner(scope);
	(void) cqrs_lock_projection(true);
	/* this session folds now: the projector must not trust its cache */
	cqrs_project_forget();
	if (cqrs_shared != NULL)
		pg_atomic_fetch_add_u64(&cqrs_shared->repair_generation, 1);
}

/* Column attno of the first result row, which must not be NULL. */
static Datum
repair_result(int attno)
{
	bool		isnull;
	Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
								  attno, &isnull);

	if (isnull)
		elog(ERROR, "unexpected null in column %d", attno);
	return d;
}

/*
 * cqrs.retry_dead_letter(command_id uuid) RETURNS boolean
 *
 * Project a dead-lettered command again, after whatever made it fail was
 * fixed: true when it is applied now, false when it is dead-lettered
 * again (its new reason replaces the old one) or was not dead-lettered.
 * Only the latest command of its order can be retried: when later
 * commands were applied since, applying it now would break the order's
 * sequence, and that is an error.
 */
Datum
retry_dead_letter(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr find_plan = NULL;
	static SPIPlanPtr rewind_plan = NULL;
	static SPIPlanPtr forget_plan = NULL;
	static const char *find_sql =
		"SELECT l.log_id, l.command_type, l.aggregate_id, l.sequence_id,"
		" l.payload, r.version, l.traceparent, l.created_at,"
		/* a column of 0.2.0, read so that 0.1.0 has it NULL */
		" pg_catalog.to_jsonb(d) OPERATOR(pg_catalog.->>) 'projection'"
		" FROM cqrs.dead_letter AS d"
		" JOIN cqrs.command_log AS l ON l.command_id OPERATOR(pg_catalog.=) d.command_id"
		" LEFT JOIN cqrs.read_model AS r ON r.order_id OPERATOR(pg_catalog.=) l.aggregate_id"
		" WHERE d.command_id OPERATOR(pg_catalog.=) $1"
		" FOR UPDATE OF d";
	static const char *rewind_sql =
		"UPDATE cqrs.read_model SET version = $2"
		" WHERE order_id OPERATOR(pg_catalog.=) $1";
	static const char *forget_sql =
		"DELETE FROM cqrs.dead_letter WHERE command_id OPERATOR(pg_catalog.=) $1";
	pg_uuid_t  *command_id = PG_GETARG_UUID_P(0);
	Oid			find_types[1] = {UUIDOID};
	Oid			rewind_types[2] = {TEXTOID, INT8OID};
	Datum		values[2];
	CqrsOwnerScope scope;
	CqrsRecord	rec;
	CqrsApplyStats stats;
	bool		isnull;
	Datum		version;
	char	   *projection;

	cqrs_repair_begin(&scope, "cqrs.retry_dead_letter()");

	values[0] = UUIDPGetDatum(command_id);
	(void) cqrs_exec(cqrs_keep_plan(&find_plan, find_sql, 1, find_types),
						 values, NULL, 0, SPI_OK_SELECT);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("command %s is not dead-lettered",
						DatumGetCString(DirectFunctionCall1(uuid_out,
															UUIDPGetDatum(command_id)))),
				 errhint("cqrs.dead_letter lists the commands that are.")));

	memset(&rec, 0, sizeof(rec));
	rec.command_id = *command_id;
	rec.log_id = DatumGetInt64(repair_result(1));
	rec.command_type = TextDatumGetCString(repair_result(2));
	rec.aggregate_id = TextDatumGetCString(repair_result(3));
	rec.sequence_id = DatumGetInt64(repair_result(4));
	rec.payload = DatumGetJsonbPCopy(repair_result(5));
	rec.commit_time = GetCurrentTimestamp();
	rec.traceparent = cqrs_spi_text(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 7);
	rec.created_at = DatumGetTimestampTz(repair_result(8));
	projection = cqrs_spi_text(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 9);
	if (projection != NULL)
	{
		bool		applied = cqrs_retry_declared(&rec, projection);

		cqrs_spi_finish(&scope);
		PG_RETURN_BOOL(applied);
	}
	version = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 6,
							&isnull);

	if (isnull && rec.sequence_id != 1)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("order \"%s\" has no read-model row", rec.aggregate_id),
				 errdetail("Its CREATE_ORDER was not applied."),
				 errhint("Retry the order's first command before its later ones.")));
	if (!isnull && DatumGetInt64(version) > rec.sequence_id)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("order \"%s\" has moved past sequence " INT64_FORMAT,
						rec.aggregate_id, rec.sequence_id),
				 errdetail("Its read-model row is at version " INT64_FORMAT "; applying this command now would break the order's sequence.",
						   DatumGetInt64(version)),
				 errhint("Use cqrs.rebuild() to replay the whole log instead.")));
	if (!isnull && DatumGetInt64(version) < rec.sequence_id - 1)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("order \"%s\" has not reached sequence " INT64_FORMAT,
						rec.aggregate_id, rec.sequence_id - 1),
				 errdetail("Its read-model row is at version " INT64_FORMAT ".",
						   DatumGetInt64(version))));

	/* the failure moved the order past the command: move it back */
	if (!isnull && DatumGetInt64(version) == rec.sequence_id)
	{
		values[0] = CStringGetTextDatum(rec.aggregate_id);
		values[1] = Int64GetDatum(rec.sequence_id - 1);
		(void) cqrs_exec(cqrs_keep_plan(&rewind_plan, rewind_sql, 2, rewind_types),
						 values, NULL, 0, SPI_OK_UPDATE);
	}
	values[0] = UUIDPGetDatum(command_id);
	(void) cqrs_exec(cqrs_keep_plan(&forget_plan, forget_sql, 1, find_types),
						 values, NULL, 0, SPI_OK_DELETE);

	memset(&stats, 0, sizeof(stats));
	cqrs_project(&rec, 1, &stats);

	cqrs_spi_finish(&scope);
	PG_RETURN_BOOL(stats.dead == 0);
}

/*
 * cqrs.skip_parked(command_id uuid) RETURNS boolean
 *
 * Give up waiting for the missing predecessor of a parked command: it
 * moves to cqrs.dead_letter with a reason naming who skipped it and what
 * it waited for.  False when the command is not parked.
 */
Datum
skip_parked(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr plan = NULL;
	static const char *sql =
		"WITH p AS (DELETE FROM cqrs.parked"
		"           WHERE command_id OPERATOR(pg_catalog.=) $1"
		"           RETURNING command_id, command_type, aggregate_id,"
		"                     sequence_id, waiting_for, traceparent)"
		" INSERT INTO cqrs.dead_letter (command_id, command_type, aggregate_id,"
		"                               sequence_id, reason, traceparent)"
		" SELECT command_id, command_type, aggregate_id, sequence_id,"
		"        pg_catalog.format('skipped with cqrs.skip_parked() by %s while waiting for sequence %s',"
		"                          $2, waiting_for), traceparent"
		" FROM p"
		" ON CONFLICT (command_id) DO UPDATE SET reason = excluded.reason,"
		" failed_at = excluded.failed_at";
	Oid			types[2] = {UUIDOID, TEXTOID};
	Datum		values[2];
	CqrsOwnerScope scope;
	uint64		n;

	values[0] = UUIDPGetDatum(PG_GETARG_UUID_P(0));
	values[1] = CStringGetTextDatum(GetUserNameFromId(GetUserId(), false));

	cqrs_repair_begin(&scope, "cqrs.skip_parked()");
	(void) cqrs_exec(cqrs_keep_plan(&plan, sql, 2, types),
						 values, NULL, 0, SPI_OK_INSERT);
	n = SPI_processed;
	if (n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("command %s is not parked",
						DatumGetCString(DirectFunctionCall1(uuid_out, values[0]))),
				 errhint("cqrs.parked lists the commands that are.")));
	cqrs_spi_finish(&scope);

	if (n > 0 && cqrs_shared != NULL)
	{
		SpinLockAcquire(&cqrs_shared->mutex);
		cqrs_shared->dead_letter_total += n;
		SpinLockRelease(&cqrs_shared->mutex);
	}
	PG_RETURN_BOOL(n > 0);
}

/* What the fast rebuild reads and counts. */
typedef struct RebuildArgs
{
	CqrsApplyStats *stats;
	int64		nread;
} RebuildArgs;

/*
 * The fast rebuild, run in rebuild mode: fold every order's whole history
 * from nothing and write only the rows and dead letters that differ from
 * the tables, then delete the dead letters the replay did not derive and
 * the rows of orders the log does not have.
 */
static void
rebuild_differences(void *arg)
{
	RebuildArgs *a = arg;

	a->nread = cqrs_project_log(a->stats);
	cqrs_project_rebuild_prune();
}

/*
 * cqrs.rebuild() RETURNS bigint
 *
 * Replay the whole command log into the read model, in one transaction:
 * every order is folded anew from its commands with the projector's fold,
 * and the rows that differ are written, so readers keep seeing the current
 * rows (MVCC, no lock they would wait for) until the new ones commit, all
 * at once.  Should the fold fail on a command (a constraint of the read
 * model refusing it, say), the rebuild starts over the way that isolates
 * such commands: every row deleted and the log folded into the empty
 * table, the failing commands dead-lettered.  Commands keep being
 * accepted; the projector holds still meanwhile and afterwards catches
 * up, skipping by the version rule what the replay already applied.
 * Parked commands and dead letters are derived anew from the log too, so
 * that each says what the replay made of its command (a dead letter the
 * replay derives again with the same reason is kept as it is).  Returns
 * the number of commands replayed.
 */
Datum
rebuild(PG_FUNCTION_ARGS)
{
	CqrsOwnerScope scope;
	CqrsApplyStats stats;
	RebuildArgs args = {&stats, 0};
	ErrorData  *edata;

	cqrs_repair_begin(&scope, "cqrs.rebuild()");

	if (SPI_execute("DELETE FROM cqrs.parked", false, 0) != SPI_OK_DELETE)
		elog(ERROR, "could not empty cqrs.parked");
	cqrs_project_forget();

	memset(&stats, 0, sizeof(stats));
	cqrs_project_rebuild_mode(true);
	edata = cqrs_try_subtransaction(rebuild_differences, &args);
	cqrs_project_rebuild_mode(false);
	if (edata != NULL)
	{
		/* only what a command can be to blame for; a cancel is a cancel */
		if (!cqrs_blames_command(edata->sqlerrcode))
			ReThrowError(edata);
		cqrs_project_forget();
		ereport(LOG,
				(errmsg("cqrs.rebuild() rewrites the whole read model: %s",
						edata->message)));
		FreeErrorData(edata);

		memset(&stats, 0, sizeof(stats));
		cqrs_redis_stale_all();
		if (SPI_execute("DELETE FROM cqrs.read_model", false, 0) != SPI_OK_DELETE ||
			SPI_execute("DELETE FROM cqrs.dead_letter", false, 0) != SPI_OK_DELETE)
			elog(ERROR, "could not empty the read model and cqrs.dead_letter");
		args.nread = cqrs_project_log(&stats);
	}

	cqrs_spi_finish(&scope);

	ereport(LOG,
			(errmsg("cqrs.rebuild() replayed " INT64_FORMAT " commands: " INT64_FORMAT " applied, " INT64_FORMAT " parked, " INT64_FORMAT " dead-lettered",
					args.nread, stats.applied, stats.parked, stats.dead)));
	PG_RETURN_INT64(args.nread);
}
