/*-------------------------------------------------------------------------
 *
 * worker.c
 *		Lifecycle of the "cqrs projector" background workers: signals,
 *		leader election, the replication slot and origin, and the loop that
 *		decodes WAL and hands batches to projector.c.
 *
 * cqrs.workers static workers connect to cqrs.database.  Each waits on its
 * latch until the extension exists and cqrs.enabled is on, then waits for a
 * session-level advisory lock; the one that gets it leads, the others wait
 * in the lock queue, so a follower takes over as soon as the leader steps
 * down or exits.  A leader gives up its replication origin before the lock.
 *
 * The leader keeps one logical decoding context open for as long as it
 * leads: WAL is read once, sequentially, never again from the slot's
 * restart point as every call of pg_logical_slot_get_changes() would.
 * Decoding runs in short read-only transactions (so that catalog access
 * during decoding has a resource owner, as in logicalfuncs.c); the output
 * plugin in this library puts the commands into an in-memory queue.  Each
 * batch is applied in one transaction that also records the position in
 * cqrs.offset_tracking and, through the session's replication origin, in
 * the origin's progress.  The apply commits asynchronously (a flush per
 * batch would cost more than the batch), and the slot is confirmed up to a
 * batch only once the WAL writer, or our own flush of the next commands,
 * has made that batch's commit durable.  After
 * a crash, decoding resumes at the slot's confirmed position, which may be
 * behind the last applied batch; transactions at or before the recorded
 * offset are skipped, and the version rule of projector.c makes any
 * redelivery harmless anyway.
 *
 * The projector's own transactions carry its replication origin, which the
 * output plugin filters, so its writes are never decoded at all.
 *
 * When the slot is missing (first start, or lost), the leader creates it
 * and folds the whole command log into the read model before streaming
 * from the slot's start, so nothing committed before the slot is lost.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "access/xact.h"
#include "access/xlog.h"
#include "access/xlog_internal.h"
#include "access/xlogutils.h"
#include "commands/extension.h"
#include "common/pg_prng.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "replication/decode.h"
#include "replication/logical.h"
#include "replication/origin.h"
#include "replication/slot.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "cqrs.h"

/* A batch this large means load: the WAL writer is busy writing the WAL
 * too, and waiting for it for up to CQRS_BUSY_NAPTIME ms costs less than a
 * flush of our own (worker_page_read()). */
#define CQRS_BUSY_BATCH			16
#define CQRS_BUSY_NAPTIME		5

/* Batch durations (ms) under which the batch size grows, over which it
 * shrinks.  Shorter bounds give lower lag under full load but smaller
 * batches, whose fixed cost then takes CPU from the writers. */
#define CQRS_BATCH_FAST_MS		200
#define CQRS_BATCH_SLOW_MS		1000

/* Poison commands isolated in one batch before the failure counts as the
 * pipeline's, not the commands'. */
#define CQRS_MAX_POISON_PER_BATCH	8

static MemoryContext worker_context = NULL;
static bool worker_is_leader = false;
static LogicalDecodingContext *lead_ctx = NULL;	/* while streaming */
static CqrsQueue *lead_queue = NULL;	/* created once, reset per batch */

/*
 * on_shmem_exit callback: step down and leave the census.
 */
static void
worker_exit(int code, Datum arg)
{
	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->workers_alive--;
	if (worker_is_leader && cqrs_shared->leader_pid == MyProcPid)
	{
		cqrs_shared->leader_latch = NULL;
		cqrs_shared->leader_pid = 0;
		cqrs_shared->state = CQRS_STATE_IDLE;
	}
	SpinLockRelease(&cqrs_shared->mutex);
}

/*
 * Publish the state for cqrs.status.
 */
static void
worker_set_state(CqrsState state)
{
	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->state = state;
	SpinLockRelease(&cqrs_shared->mutex);
}

/* Take a configuration reload, if one is pending. */
static void
worker_reload(void)
{
	if (ConfigReloadPending)
	{
		ConfigReloadPending = false;
		ProcessConfigFile(PGC_SIGHUP);
	}
}

/*
 * Sleep on the latch for up to timeout ms, then handle interrupts and
 * configuration reloads.
 */
static void
worker_wait(long timeout)
{
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					 timeout, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
	worker_reload();
}

/*
 * Sleep the whole of ms, however often the latch is set meanwhile (every
 * committed command sets it), handling interrupts and reloads: a backoff
 * that a busy server could cut short would be no backoff at all.
 */
static void
worker_sleep(long ms)
{
	TimestampTz end = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ms);
	long		remaining;

	while ((remaining = TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
														end)) > 0)
		worker_wait(remaining);
}

/*
 * Start a transaction for SPI work: SPI connected, a snapshot pushed.
 */
static void
worker_begin(void)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
}

/*
 * Commit what worker_begin() started.
 */
static void
worker_commit(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
}

/*
 * The OID of the extension in our database, InvalidOid when it is not
 * installed.  A new OID means a new extension: the slot of the old one
 * must not feed the new read model.
 */
static Oid
worker_extension_oid(void)
{
	Oid			oid;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	oid = get_extension_oid("cqrs", true);
	CommitTransactionCommand();
	return oid;
}

/*
 * Is the extension installed in our database?
 */
static bool
worker_extension_exists(void)
{
	return OidIsValid(worker_extension_oid());
}

/*
 * Drop our slot if it exists and nobody uses it: the extension it served
 * is gone (a slot must not hold WAL for nothing), or it can no longer be
 * read.  "whose" completes the log line.
 */
static void
worker_drop_slot(const char *whose)
{
	ReplicationSlot *slot;
	bool		idle;

	LWLockAcquire(ReplicationSlotControlLock, LW_SHARED);
	slot = SearchNamedReplicationSlot(cqrs_slot_name, false);
	idle = (slot != NULL && slot->data.database == MyDatabaseId &&
			slot->active_pid == 0);
	LWLockRelease(ReplicationSlotControlLock);
	if (!idle)
		return;
	ReplicationSlotDrop(cqrs_slot_name, true);
	ereport(LOG,
			(errmsg("cqrs projector dropped replication slot \"%s\" %s",
					cqrs_slot_name, whose)));
}

/*
 * The tag of the leader lock.
 */
static void
worker_leader_tag(LOCKTAG *tag)
{
	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, 0, 0, CQRS_LEADER_LOCK_SPACE);
}

/*
 * Become the leader: wait for the leader lock, which the leader holds for
 * as long as it leads, so that a follower takes over the moment the leader
 * steps down or exits.  The wait is a lock wait like any other (it shows
 * in pg_locks, and SIGTERM ends it).  Returns false when, once the lock
 * is ours, projection is off or the extension gone: the lock is then let
 * go again.
 */
static bool
worker_try_lead(void)
{
	LOCKTAG		tag;

	worker_leader_tag(&tag);
	pgstat_report_activity(STATE_IDLE, "waiting to lead");
	StartTransactionCommand();
	(void) LockAcquire(&tag, ExclusiveLock, true, false);
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);

	/* what we waited through may have changed both */
	worker_reload();
	if (!cqrs_enabled || !worker_extension_exists())
	{
		LockRelease(&tag, ExclusiveLock, true);
		return false;
	}

	worker_is_leader = true;
	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->leader_latch = MyLatch;
	cqrs_shared->leader_pid = MyProcPid;
	/* running only once it streams with nothing left to read */
	cqrs_shared->state = CQRS_STATE_CATCHING_UP;
	if (cqrs_shared->batch_size == 0)
		cqrs_shared->batch_size = cqrs_batch_size_min;
	SpinLockRelease(&cqrs_shared->mutex);
	ereport(LOG,
			(errmsg("cqrs projector %d is now the leader", MyProcPid)));
	return true;
}

/*
 * Give up leadership: first what the leader holds (its replication origin;
 * the slot is already released), then the leader lock, so that a follower
 * that gets the lock finds the origin free.
 */
static void
worker_step_down(CqrsState state)
{
	LOCKTAG		tag;

	if (replorigin_session_origin != InvalidRepOriginId)
	{
		replorigin_session_reset();
		replorigin_session_origin = InvalidRepOriginId;
	}
	worker_leader_tag(&tag);
	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->leader_latch = NULL;
	cqrs_shared->leader_pid = 0;
	cqrs_shared->state = state;
	SpinLockRelease(&cqrs_shared->mutex);
	worker_is_leader = false;
	LockRelease(&tag, ExclusiveLock, true);
}

/*
 * Set up the replication origin that marks the projector's transactions.
 */
static void
worker_setup_origin(void)
{
	RepOriginId origin;

	if (replorigin_session_origin != InvalidRepOriginId)
		return;
	StartTransactionCommand();
	origin = replorigin_by_name(cqrs_slot_name, true);
	if (origin == InvalidRepOriginId)
		origin = replorigin_create(cqrs_slot_name);
	CQRS_ORIGIN_SESSION_SETUP(origin);
	replorigin_session_origin = origin;
	CommitTransactionCommand();
}

/*
 * Create the slot, then fold the whole log into the read model so that
 * commands committed before the slot's start are not lost.
 */
static void
worker_create_slot(void)
{
	LogicalDecodingContext *ctx;
	XLogRecPtr	start;
	CqrsApplyStats stats;
	int64		nread;

	ereport(LOG,
			(errmsg("cqrs projector is creating replication slot \"%s\"",
					cqrs_slot_name)));
	pgstat_report_activity(STATE_RUNNING, "creating replication slot");

	CheckLogicalDecodingRequirements();
	CQRS_SLOT_CREATE(cqrs_slot_name, cqrs_slot_failover);
	ctx = CreateInitDecodingContext("cqrs", NIL, false, InvalidXLogRecPtr,
									XL_ROUTINE(.page_read = read_local_xlog_page,
											   .segment_open = wal_segment_open,
											   .segment_close = wal_segment_close),
									NULL, NULL, NULL);
	DecodingContextFindStartpoint(ctx);
	start = MyReplicationSlot->data.confirmed_flush;
	FreeDecodingContext(ctx);
	ReplicationSlotPersist();
	ReplicationSlotRelease();

	/* catch up from the log, in one transaction with the new offset */
	pgstat_report_activity(STATE_RUNNING, "catching up from the command log");
	worker_set_state(CQRS_STATE_CATCHING_UP);
	memset(&stats, 0, sizeof(stats));
	worker_begin();
	(void) cqrs_lock_projection(true);
	nread = cqrs_project_log(&stats);
	cqrs_save_offset(cqrs_slot_name, start);
	worker_commit();
	XLogFlush(XactLastCommitEnd);
	pgstat_report_activity(STATE_IDLE, NULL);

	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->applied_total += stats.applied;
	cqrs_shared->dead_letter_total += stats.dead;
	SpinLockRelease(&cqrs_shared->mutex);
	cqrs_set_applied(start, false);

	ereport(LOG,
			(errmsg("cqrs projector created slot \"%s\" at %X/%X and caught up from the command log",
					cqrs_slot_name, LSN_FORMAT_ARGS(start)),
			 errdetail("Read " INT64_FORMAT " commands: " INT64_FORMAT " applied, " INT64_FORMAT " already applied, " INT64_FORMAT " parked, " INT64_FORMAT " dead-lettered.",
					   nread, stats.applied, stats.skipped, stats.parked,
					   stats.dead)));
}

/*
 * The position recorded in cqrs.offset_tracking for our slot.
 */
static XLogRecPtr
worker_offset(void)
{
	XLogRecPtr	lsn;

	worker_begin();
	lsn = cqrs_load_offset(cqrs_slot_name);
	worker_commit();
	return lsn;
}

/*
 * Make sure our slot exists and is ours; create it when missing.
 */
static void
worker_ensure_slot(void)
{
	ReplicationSlot *slot;
	bool		ours = false;
	bool		lost = false;
	bool		found;
	XLogRecPtr	offset = InvalidXLogRecPtr;
#ifdef CQRS_FAILOVER_SLOTS
	XLogRecPtr	confirmed = InvalidXLogRecPtr;
	bool		synced = false;
	bool		failover = false;
#endif

	LWLockAcquire(ReplicationSlotControlLock, LW_SHARED);
	slot = SearchNamedReplicationSlot(cqrs_slot_name, false);
	found = (slot != NULL);
	if (found)
	{
		ours = (slot->data.database == MyDatabaseId &&
				strcmp(NameStr(slot->data.plugin), "cqrs") == 0);
		SpinLockAcquire(&slot->mutex);
		lost = CQRS_SLOT_INVALIDATED(slot);
#ifdef CQRS_FAILOVER_SLOTS
		confirmed = slot->data.confirmed_flush;
		synced = slot->data.synced;
		failover = slot->data.failover;
#endif
		SpinLockRelease(&slot->mutex);
	}
	LWLockRelease(ReplicationSlotControlLock);

	if (found && !ours)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("replication slot \"%s\" exists but is not a cqrs slot of this database",
						cqrs_slot_name),
				 errhint("Drop it, or set cqrs.slot_name to another name.")));

	/*
	 * A slot this extension has no position for served an earlier
	 * installation (dropped while no projector ran): its WAL is not ours.
	 */
	if (found)
		offset = worker_offset();
	if (found && XLogRecPtrIsInvalid(offset))
	{
		worker_drop_slot("of an earlier installation");
		found = false;
	}

	/*
	 * A slot invalidated by max_slot_wal_keep_size (or by a conflict on a
	 * standby) can no longer be read: the WAL it kept is gone, and with it
	 * the commands committed since the read model's position.  Make a new
	 * slot and fold the whole log, as on a first start: the version rule
	 * skips every command already applied, so each is applied once.
	 */
	if (found && lost)
	{
		ereport(WARNING,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cqrs projector's replication slot \"%s\" was invalidated",
						cqrs_slot_name),
				 errdetail("The WAL the slot kept for the projector was removed; the slot is made again and the whole command log folded into the read model, skipping the commands already applied."),
				 errhint("Raise max_slot_wal_keep_size, or keep projection from pausing or falling behind that long.")));
		cqrs_set_error(psprintf("replication slot \"%s\" was invalidated; made again and the command log folded",
								cqrs_slot_name));
		SpinLockAcquire(&cqrs_shared->mutex);
		cqrs_shared->slots_lost++;
		SpinLockRelease(&cqrs_shared->mutex);
		worker_drop_slot("that was invalidated");
		found = false;
	}

#ifdef CQRS_FAILOVER_SLOTS

	/*
	 * A slot a standby synchronized from its primary, on this server since
	 * its promotion.  The primary confirms a failover slot only up to WAL
	 * the standbys of synchronized_standby_slots have (worker_confirm()),
	 * and only past commands it has applied, so the read model this server
	 * replayed holds every command before the slot's position: streaming
	 * goes on from it, skipping the commands applied after it.
	 */
	if (found && !lost && synced)
		ereport(LOG,
				(errmsg("cqrs projector continues from replication slot \"%s\" synchronized from the former primary, at %X/%X",
						cqrs_slot_name, LSN_FORMAT_ARGS(confirmed)),
				 errdetail("The read model is at %X/%X; no command log fold is needed.",
						   LSN_FORMAT_ARGS(offset))));

	/* cqrs.slot_failover changed since the slot was made */
	if (found && failover != cqrs_slot_failover)
		ReplicationSlotAlter(cqrs_slot_name, cqrs_slot_failover);
#endif

	if (!found)
		worker_create_slot();
}

/*
 * Milliseconds to wait before retry number attempt: exponential from
 * cqrs.backoff_base, capped at cqrs.backoff_max, with up to 25% jitter.
 */
static long
worker_backoff(int attempt)
{
	double		delay = cqrs_backoff_base;

	for (int i = 0; i < attempt && delay < cqrs_backoff_max; i++)
		delay *= 2;
	delay = Min(delay, cqrs_backoff_max);
	delay -= delay * 0.25 * pg_prng_double(&pg_global_prng_state);
	return (long) Max(delay, 1);
}

/*
 * The bucket of the flush duration histogram for a batch of ms.
 */
static int
worker_flush_bucket(double ms)
{
	int			b = 0;

	while (b < CQRS_FLUSH_BUCKETS && ms / 1000.0 > cqrs_flush_bucket_s[b])
		b++;
	return b;
}

/*
 * Record the lag of each applied command in the histogram.
 */
static void
worker_record_lag(CqrsRecord *records, int n, TimestampTz now)
{
	uint64		counts[CQRS_LAG_BUCKETS + 1] = {0};

	for (int i = 0; i < n; i++)
	{
		double		ms = (double) (now - records[i].commit_time) / 1000.0;
		int			b = 0;

		while (b < CQRS_LAG_BUCKETS && ms > cqrs_lag_bucket_ms[b])
			b++;
		counts[b]++;
	}
	SpinLockAcquire(&cqrs_shared->mutex);
	for (int b = 0; b <= CQRS_LAG_BUCKETS; b++)
		cqrs_shared->lag_histogram[b] += counts[b];
	SpinLockRelease(&cqrs_shared->mutex);
}

/*
 * Lower this process's PROC_IN_LOGICAL_DECODING flag.
 *
 * Creating a decoding context raises it, and snapshots then leave the
 * process's transactions out of their list of running ones, as a process
 * that decodes never writes.  The projector does write: flagged during a
 * batch, its transaction would look finished to a concurrent snapshot
 * while it is still running, and a reader scanning the read model would
 * take the rows it inserts for rows of an aborted transaction and mark
 * them so (HEAP_XMIN_INVALID), losing them for good once the batch
 * commits.  The flag also keeps the process's xmin out of the horizons,
 * which the projector does not need: its decoding transactions are short
 * and the slot's catalog_xmin protects what decoding reads.  So the
 * leader lowers it once, right after creating its decoding context.
 */
static void
worker_lower_decoding_flag(void)
{
	LWLockAcquire(ProcArrayLock, LW_EXCLUSIVE);
	MyProc->statusFlags &= ~PROC_IN_LOGICAL_DECODING;
	ProcGlobal->statusFlags[MyProc->pgxactoff] = MyProc->statusFlags;
	LWLockRelease(ProcArrayLock);
}

/*
 * Give memory back to the operating system after a batch larger than any
 * regular one (one transaction of many commands is one batch): the freed
 * blocks would otherwise stay with the process, a leader that runs for
 * months holding the peak of its largest transaction.
 */
static void
worker_release_memory(void)
{
#ifdef __GLIBC__
	malloc_trim(0);
#endif
}

/*
 * Apply one part of a batch in one transaction, retrying with backoff
 * until it commits.  The last part of a batch ("last") also records the
 * batch's position, in the table and the replication origin; an earlier
 * part commits without it, so that after a crash the whole batch is
 * delivered again, and the version rule skips what was applied.  The
 * commands in "redelivered" were applied by an earlier run: their keys go
 * to the Redis backlog.  Returns false when projection was switched off or the
 * extension dropped meanwhile; the part is then not applied.
 */
static bool
worker_apply_part(CqrsQueue *queue, CqrsRecord *records, int n, bool last,
				  List *redelivered, CqrsApplyStats *stats)
{
	volatile int attempt = 0;
	volatile long delay = 0;
	ListCell   *lc;
	bool		redis_pending;
	bool		redis_ok;

	cqrs_trace_batch_begin(records, n);
	for (;;)
	{
		volatile bool done = false;

		memset(stats, 0, sizeof(CqrsApplyStats));
		PG_TRY();
		{
			worker_begin();
			pgstat_report_activity(STATE_RUNNING, "applying a batch");
			if (!cqrs_lock_projection(false))
				ereport(ERROR,
						(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
						 errmsg("cqrs.rebuild() or a repair function is running"),
						 errdetail("The projector waits for it to finish.")));

			cqrs_redis_batch_begin();
			foreach(lc, redelivered)
			{
				CqrsRecord *rec = lfirst(lc);

				if (rec->command_type == NULL ||
					cqrs_is_order_command(rec->command_type))
					cqrs_redis_stale(rec->aggregate_id);
				else
					cqrs_redis_stale_declared(rec->command_type, rec->aggregate_id);
			}
			cqrs_redis_flush_stale();
			cqrs_project(records, n, stats);
			if (stats->poisoned > CQRS_MAX_POISON_PER_BATCH)
				ereport(ERROR,
						(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						 errmsg("%lld commands of one batch failed on their own",
								(long long) stats->poisoned),
						 errdetail("So many failures point at the read model or its triggers, not at the commands; nothing was dead-lettered.")));
			cqrs_trace_batch_outcomes(records);
			if (last)
			{
				cqrs_save_offset(cqrs_slot_name, queue->last_commit_lsn);
				replorigin_session_origin_lsn = queue->last_commit_lsn;
				replorigin_session_origin_timestamp = queue->last_commit_time;
			}
			worker_commit();
			pgstat_report_activity(STATE_IDLE, NULL);
			done = true;
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(worker_context);
			edata = CopyErrorData();
			FlushErrorState();
			AbortCurrentTransaction();
			cqrs_project_forget();
			cqrs_redis_batch_abort();
			replorigin_session_origin_lsn = InvalidXLogRecPtr;

			delay = worker_backoff(attempt);
			ereport(WARNING,
					(errcode(edata->sqlerrcode),
					 errmsg("cqrs projector could not apply a batch of %d commands: %s",
							n, edata->message),
					 edata->context ? errcontext("%s", edata->context) : 0,
					 errhint("It is retried in %ld ms.", (long) delay)));
			cqrs_set_error(edata->message);
			worker_set_state(CQRS_STATE_ERROR);
			FreeErrorData(edata);
		}
		PG_END_TRY();

		if (done)
			break;

		worker_sleep(delay);
		attempt++;
		if (!cqrs_enabled || !worker_extension_exists())
			return false;	/* the caller sees why */
	}

	if (attempt > 0)
		worker_set_state(CQRS_STATE_RUNNING);
	replorigin_session_origin_lsn = InvalidXLogRecPtr;
	worker_record_lag(records, n, GetCurrentTimestamp());

	/*
	 * Write the part through to Redis, or put its orders in the Redis
	 * backlog, before anything confirms the slot past the batch.  Redis
	 * must never hold a row the read model can still lose: the part, and
	 * the commands it read before they were flushed, go to disk first.
	 */
	redis_pending = cqrs_redis_batch_pending();
	if (redis_pending && GetFlushRecPtr(NULL) < XactLastCommitEnd)
		XLogFlush(XactLastCommitEnd);
	if (redis_pending)
		cqrs_trace_redis_begin(cqrs_redis_mark());
	redis_ok = cqrs_redis_batch_done();
	if (redis_pending)
		cqrs_trace_redis_end(redis_ok);
	if (!redis_ok)
	{
		worker_begin();
		cqrs_redis_backlog_failed();
		worker_commit();
	}
	cqrs_trace_batch_end(records, n, attempt + 1);
	return true;
}

/*
 * Keep the records an earlier run has not applied (committed after
 * skip_upto), in place; list (copies of) the others in *redelivered.
 * Returns how many are kept.
 */
static int
worker_unapplied(CqrsRecord *records, int n, XLogRecPtr skip_upto,
				 List **redelivered)
{
	int			kept = 0;

	for (int i = 0; i < n; i++)
	{
		if (records[i].commit_lsn > skip_upto)
			records[kept++] = records[i];
		else if (records[i].aggregate_id != NULL)
		{
			CqrsRecord *copy = palloc(sizeof(CqrsRecord));

			*copy = records[i];
			*redelivered = lappend(*redelivered, copy);
		}
	}
	return kept;
}

/*
 * Apply the queued commands: in one transaction, or, when they are more
 * than cqrs.batch_size_max (one large transaction decoded, possibly
 * spilled to a file), in parts of at most that many, so that neither the
 * queue nor the apply holds more than a bounded amount of memory.  Only
 * the last part commits the position.  Returns false when projection was
 * switched off or the extension dropped meanwhile.
 */
static bool
worker_apply(CqrsQueue *queue, XLogRecPtr skip_upto, CqrsApplyStats *stats)
{
	static MemoryContext part_context = NULL;
	int			part_max = cqrs_batch_size_max;
	List	   *redelivered = NIL;
	int			n;
	int			lo = 0;

	memset(stats, 0, sizeof(CqrsApplyStats));
	n = worker_unapplied(queue->records, queue->nrecords, skip_upto,
						 &redelivered);
	if (part_context == NULL)
		part_context = AllocSetContextCreate(worker_context,
											 "cqrs unspilled part",
											 ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		CqrsApplyStats part;
		CqrsRecord *records = NULL;
		int			count = 0;
		bool		last;

		if (lo < n)
		{
			records = &queue->records[lo];
			count = Min(part_max, n - lo);
			lo += count;
		}
		else if (queue->nunspilled < queue->nspilled)
		{
			MemoryContext old = MemoryContextSwitchTo(part_context);

			records = palloc(sizeof(CqrsRecord) * part_max);
			count = cqrs_queue_unspill(queue, records, part_max);
			count = worker_unapplied(records, count, skip_upto, &redelivered);
			MemoryContextSwitchTo(old);
		}
		/* else nothing is left, but the position is still to record */
		last = (lo >= n && queue->nunspilled >= queue->nspilled);

		if (!worker_apply_part(queue, records, count, last, redelivered,
							   &part))
		{
			list_free(redelivered);
			MemoryContextReset(part_context);
			return false;
		}
		cqrs_stats_add(stats, &part);
		list_free(redelivered);
		redelivered = NIL;
		MemoryContextReset(part_context);
		if (last)
			break;
		CHECK_FOR_INTERRUPTS();
	}
	return true;
}

/*
 * Is the projector under load (its last batch was busy)?  Then the WAL
 * writer writes each page of WAL as it fills, and waiting a moment for it
 * costs less than a flush of our own.
 */
static bool worker_busy = false;

/*
 * page_read callback of the decoding context: read_local_xlog_page(), but
 * up to the end of the WAL written, not only flushed, and writing what a
 * record needs beyond it rather than waiting for it.
 *
 * Written WAL is safe to project before it is flushed: the batch that
 * applies it commits after it in the same WAL, so a crash that loses the
 * commands loses the batch with them, and the slot is confirmed only once
 * the batch's commit is flushed (worker_confirm()).  Reading it saves the
 * flush that waiting for commands committed with synchronous_commit = off
 * would otherwise cost every batch.
 *
 * The written end can fall inside a record, and nobody else might write
 * the rest soon (a running-transactions record at the end of an idle
 * server's WAL): under load we wait a few milliseconds for the WAL writer,
 * otherwise, or then, we flush it ourselves.
 */
static int
worker_page_read(XLogReaderState *state, XLogRecPtr targetPagePtr,
				 int reqLen, XLogRecPtr targetRecPtr, char *cur_page)
{
	XLogRecPtr	need = targetPagePtr + reqLen;
	XLogRecPtr	upto = GetXLogWriteRecPtr();
	TimeLineID	tli = GetWALInsertionTimeLine();
	WALReadError errinfo;
	int			count;

	for (int ms = 0; worker_busy && upto < need && ms < CQRS_BUSY_NAPTIME; ms++)
	{
		(void) WaitLatch(MyLatch, WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 1,
						 PG_WAIT_EXTENSION);
		upto = GetXLogWriteRecPtr();
	}
	if (upto < need)
	{
		XLogFlush(Min(need, cqrs_insert_end()));
		upto = GetXLogWriteRecPtr();
	}

	/* a page of an older timeline (after a promotion) ends at its switch */
	XLogReadDetermineTimeline(state, targetPagePtr, reqLen, tli);
	if (state->currTLI != tli)
	{
		upto = state->currTLIValidUntil;
		tli = state->currTLI;
	}

	if (targetPagePtr + XLOG_BLCKSZ <= upto)
		count = XLOG_BLCKSZ;
	else if (need > upto)
		return -1;
	else
		count = upto - targetPagePtr;
	if (!WALRead(state, cur_page, targetPagePtr, XLOG_BLCKSZ, tli, &errinfo))
		WALReadRaiseError(&errinfo);
	return count;
}

/*
 * Is projection paused (cqrs.pause())?  cqrs.projector_state is read again
 * only when a pause or resume has committed since we last looked, or when
 * control_seen was reset.
 */
static uint64 control_seen = PG_UINT64_MAX;
static bool control_paused = false;

static bool
worker_paused(void)
{
	uint64		generation;

	SpinLockAcquire(&cqrs_shared->mutex);
	generation = cqrs_shared->control_generation;
	SpinLockRelease(&cqrs_shared->mutex);
	if (generation != control_seen)
	{
		bool		isnull;

		worker_begin();
		control_paused = false;
		if (OidIsValid(get_extension_oid("cqrs", true)))
		{
			if (SPI_execute("SELECT paused FROM cqrs.projector_state", true, 1) != SPI_OK_SELECT)
				elog(ERROR, "could not read cqrs.projector_state");
			control_paused = SPI_processed == 1 &&
				DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
										   SPI_tuptable->tupdesc, 1, &isnull));
		}
		worker_commit();
		control_seen = generation;

		/* what status shows, unless a pause or resume committed meanwhile */
		SpinLockAcquire(&cqrs_shared->mutex);
		if (cqrs_shared->control_generation == generation)
			cqrs_shared->pause_requested = control_paused;
		SpinLockRelease(&cqrs_shared->mutex);
	}
	return control_paused;
}

/*
 * While projection is paused, hold on to leadership and the slot and wait
 * for cqrs.resume().  Returns false when projection was switched off or
 * the extension dropped meanwhile.
 */
static bool
worker_hold_while_paused(Oid extension)
{
	bool		held = false;

	while (worker_paused())
	{
		if (!held)
		{
			ereport(LOG, (errmsg("cqrs projector paused")));
			worker_set_state(CQRS_STATE_PAUSED);
			pgstat_report_activity(STATE_IDLE, "paused");
			held = true;
		}
		worker_wait(cqrs_poll_interval);
		if (!cqrs_enabled || worker_extension_oid() != extension)
			return false;
	}
	if (held)
		ereport(LOG, (errmsg("cqrs projector resumed")));
	return true;
}

/*
 * Redis's turn: reconnect when due, and write one chunk of the backlog.
 * Returns whether more of the backlog is waiting.
 */
static bool
worker_redis(Oid extension)
{
	bool		more = false;

	if (!cqrs_redis_tick())
		return false;
	pgstat_report_activity(STATE_RUNNING, "writing the Redis backlog");
	worker_begin();
	/* the extension, and its backlog table, may have been dropped */
	if (get_extension_oid("cqrs", true) == extension)
		more = cqrs_redis_drain(cqrs_batch_size_max);
	worker_commit();
	pgstat_report_activity(STATE_IDLE, NULL);
	return more;
}

#ifdef CQRS_FAILOVER_SLOTS
/* Since when confirmation waits for the standbys, and when we last said so */
static TimestampTz standby_wait_since = 0;
static TimestampTz standby_warned_at = 0;

/*
 * Whether the standbys of synchronized_standby_slots have the WAL up to
 * lsn.  A standby slot that is missing, invalidated or inactive is reported
 * by StandbySlotsHaveCaughtup() at DEBUG1, and once a minute as a warning
 * while the projector's slot has been held back for a minute.  The clock
 * is read only while held back.
 */
static bool
worker_standbys_have(XLogRecPtr lsn)
{
	TimestampTz now;

	if (StandbySlotsHaveCaughtup(lsn, DEBUG1))
	{
		standby_wait_since = 0;
		return true;
	}
	now = GetCurrentTimestamp();
	if (standby_wait_since == 0)
		standby_wait_since = now;
	else if (TimestampDifferenceExceeds(standby_wait_since, now, 60000) &&
			 TimestampDifferenceExceeds(standby_warned_at, now, 60000))
	{
		standby_warned_at = now;
		(void) StandbySlotsHaveCaughtup(lsn, WARNING);
	}
	return false;
}
#endif

/*
 * Confirm the slot up to "upto", the end of the last applied batch, once
 * that batch's commit record ("commit_end") is on disk; with "flush", make
 * it so first.  Until then the slot keeps the batch's commands, so a crash
 * that loses the asynchronous commit loses nothing.  Returns whether the
 * confirmation is done.
 */
static bool
worker_confirm(XLogRecPtr upto, XLogRecPtr commit_end, bool flush)
{
	if (XLogRecPtrIsInvalid(upto))
		return true;
	if (GetFlushRecPtr(NULL) < commit_end)
	{
		if (!flush)
			return false;
		XLogFlush(commit_end);
	}
#ifdef CQRS_FAILOVER_SLOTS

	/*
	 * A failover slot is confirmed past a position only once the standbys
	 * of synchronized_standby_slots have the WAL up to it, and so the batch
	 * that recorded it (before it, or at commit_end): a standby promoted
	 * with the slot synchronized from here then has the projections of
	 * every command before the slot's position.  Never waited for: the
	 * confirmation is tried again at the next round, and projection goes
	 * on meanwhile.
	 */
	if (MyReplicationSlot->data.failover &&
		!worker_standbys_have(Max(upto, commit_end)))
		return false;
#endif
	if (upto > MyReplicationSlot->data.confirmed_flush)
		LogicalConfirmReceivedLocation(upto);
	return true;
}

/*
 * Lead: stream from the slot and apply until projection is switched off
 * or the extension dropped.
 */
static void
worker_stream(void)
{
	LogicalDecodingContext *ctx;
	CqrsQueue  *queue;
	XLogRecPtr	skip_upto;
	MemoryContext old;
	int			target = cqrs_batch_size_min;
	Oid			extension;
	bool		extension_gone = false;
	XLogRecPtr	unconfirmed = InvalidXLogRecPtr;
	XLogRecPtr	unconfirmed_commit = InvalidXLogRecPtr;

	extension = worker_extension_oid();
	cqrs_redis_installation(extension);

	/* a pause survives restarts: read it before anything else */
	control_seen = PG_UINT64_MAX;
	if (!worker_hold_while_paused(extension))
	{
		if (worker_extension_oid() != extension)
			worker_drop_slot("of a dropped extension");
		return;
	}
	worker_ensure_slot();

	/* where the read model stands */
	skip_upto = worker_offset();

	old = MemoryContextSwitchTo(worker_context);
	if (lead_queue == NULL)
	{
		lead_queue = palloc0(sizeof(CqrsQueue));
		lead_queue->context = AllocSetContextCreate(worker_context,
													"cqrs queue",
													ALLOCSET_DEFAULT_SIZES);
	}
	queue = lead_queue;
	cqrs_queue_reset(queue);
	cqrs_decoding_queue = queue;

	CQRS_SLOT_ACQUIRE(cqrs_slot_name);
	ctx = CreateDecodingContext(InvalidXLogRecPtr, NIL, false,
								XL_ROUTINE(.page_read = worker_page_read,
										   .segment_open = wal_segment_open,
										   .segment_close = wal_segment_close),
								NULL, NULL, NULL);
	lead_ctx = ctx;
	MemoryContextSwitchTo(old);
	worker_lower_decoding_flag();
	XLogBeginRead(ctx->reader, MyReplicationSlot->data.restart_lsn);

	cqrs_set_applied(Max(skip_upto, MyReplicationSlot->data.confirmed_flush),
					 false);

	ereport(LOG,
			(errmsg("cqrs projector streaming from slot \"%s\" at %X/%X",
					cqrs_slot_name,
					LSN_FORMAT_ARGS(MyReplicationSlot->data.confirmed_flush))));

	for (;;)
	{
		XLogRecPtr	end_of_wal;
		XLogRecPtr	wake_lsn;
		bool		caught_up;
		bool		redis_busy;
		TimestampTz started;

		CHECK_FOR_INTERRUPTS();
		/* under load it may not sleep for long: take a reload here too */
		worker_reload();
		if (!cqrs_enabled)
			break;
		if (worker_paused())
		{
			/* after the batch just applied; it must not wait for resume */
			if (worker_confirm(unconfirmed, unconfirmed_commit, true))
				unconfirmed = InvalidXLogRecPtr;
			if (!worker_hold_while_paused(extension))
			{
				extension_gone = (worker_extension_oid() != extension);
				break;
			}
			continue;
		}

		redis_busy = worker_redis(extension);

		/*
		 * Read as far as WAL is written (see worker_page_read()).  Once all
		 * of it is read, commands committed with synchronous_commit = off
		 * may still wait in WAL buffers: under load, give the WAL writer a
		 * moment to write them; otherwise, or if it did not, write them
		 * out ourselves.
		 */
		SpinLockAcquire(&cqrs_shared->mutex);
		wake_lsn = Max(cqrs_shared->wake_lsn, cqrs_shared->read_lsn);
		SpinLockRelease(&cqrs_shared->mutex);
		end_of_wal = GetXLogWriteRecPtr();
		if (end_of_wal < wake_lsn && !worker_busy)
		{
			XLogFlush(wake_lsn);
			end_of_wal = GetXLogWriteRecPtr();
		}
		else if (end_of_wal < wake_lsn && ctx->reader->EndRecPtr >= end_of_wal)
		{
			worker_busy = false;
			(void) WaitLatch(MyLatch, WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 CQRS_BUSY_NAPTIME, PG_WAIT_EXTENSION);
			continue;
		}
		if (worker_confirm(unconfirmed, unconfirmed_commit, false))
			unconfirmed = InvalidXLogRecPtr;

		started = GetCurrentTimestamp();
		if (ctx->reader->EndRecPtr < end_of_wal)
		{
			pgstat_report_activity(STATE_RUNNING, "decoding");
			StartTransactionCommand();
			if (get_extension_oid("cqrs", true) != extension)
			{
				CommitTransactionCommand();
				extension_gone = true;
				break;
			}

			old = CurrentMemoryContext;
			while (ctx->reader->EndRecPtr < end_of_wal &&
				   queue->nrecords < target && queue->spill == NULL)
			{
				XLogRecord *record;
				char	   *errm = NULL;

				/*
				 * The WAL reader allocates in the current context, and keeps
				 * what it allocates beyond this transaction: its decode
				 * buffer, the buffer it reassembles records spanning pages
				 * in (grown for a larger record), and a record too large for
				 * the decode buffer until the next read.  So it reads in the
				 * decoding context.  Decoding itself runs in this
				 * transaction's context, which is what is current after a
				 * decoded commit anyway (its internal subtransaction ends
				 * there), so what it leaves behind goes with our commit.
				 */
				MemoryContextSwitchTo(ctx->context);
				record = XLogReadRecord(ctx->reader, &errm);
				MemoryContextSwitchTo(old);
				if (errm)
					elog(ERROR, "could not read WAL for cqrs projection: %s",
						 errm);
				if (record != NULL)
					LogicalDecodingProcessRecord(ctx, ctx->reader);
				CHECK_FOR_INTERRUPTS();
			}
			MemoryContextSwitchTo(old);
			CommitTransactionCommand();
		}
		caught_up = (ctx->reader->EndRecPtr >= end_of_wal);

		/* decoding saw catalog changes: drop what we cached before */
		if (queue->catalog_changed)
		{
			InvalidateSystemCaches();
			queue->catalog_changed = false;
		}

		if (queue->nrecords > 0)
		{
			CqrsApplyStats stats;
			XLogRecPtr	position = queue->last_commit_lsn;
			int64		nrecords = queue->nrecords + queue->nspilled;
			double		ms;

			if (!worker_apply(queue, skip_upto, &stats))
			{
				extension_gone = (worker_extension_oid() != extension);
				break;
			}
			unconfirmed = position;
			unconfirmed_commit = XactLastCommitEnd;
			skip_upto = Max(skip_upto, position);
			ms = (double) (GetCurrentTimestamp() - started) / 1000.0;

			/*
			 * Adapt: grow while behind and batches are quick, shrink when
			 * a batch takes long (lock waits, I/O, a starved CPU), since
			 * every command of a batch waits for the whole of it.
			 */
			if (!caught_up && ms < CQRS_BATCH_FAST_MS)
				target = Min(target * 2, cqrs_batch_size_max);
			else if (ms > CQRS_BATCH_SLOW_MS)
				target = Max(target / 2, cqrs_batch_size_min);
			target = Max(Min(target, cqrs_batch_size_max), cqrs_batch_size_min);

			SpinLockAcquire(&cqrs_shared->mutex);
			cqrs_shared->applied_total += stats.applied;
			cqrs_shared->dead_letter_total += stats.dead;
			cqrs_shared->spilled_total += queue->nspilled;
			cqrs_shared->flush_histogram[worker_flush_bucket(ms)]++;
			cqrs_shared->flush_seconds_sum += ms / 1000.0;
			if (cqrs_shared->wake_lsn > position)
				cqrs_shared->pending_since = queue->last_commit_time;
			cqrs_shared->batches_total++;
			cqrs_shared->last_batch_size = (int) Min(nrecords, PG_INT32_MAX);
			cqrs_shared->last_batch_ms = ms;
			cqrs_shared->batch_size = target;
			cqrs_shared->state = caught_up ? CQRS_STATE_RUNNING :
				CQRS_STATE_CATCHING_UP;
			SpinLockRelease(&cqrs_shared->mutex);
			cqrs_set_applied(position, false);

			cqrs_queue_reset(queue);
			if (nrecords > cqrs_batch_size_max)
				worker_release_memory();

			/*
			 * Commands keep coming (more than one committed while the last
			 * batch was read and applied): let them gather for
			 * cqrs.batch_delay before the next batch, so that under load
			 * batches grow and what each costs whatever its size (two
			 * transactions, WAL flushes, a Redis round trip, a wake-up) is
			 * shared.  A lone command is not held up.
			 */
			worker_busy = (nrecords >= CQRS_BUSY_BATCH);
			if (caught_up && nrecords > 1 && cqrs_batch_delay > 0)
				(void) WaitLatch(MyLatch, WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								 cqrs_batch_delay, PG_WAIT_EXTENSION);
			continue;
		}

		/* not caught up, or commands committed beyond what was written */
		if (!caught_up || end_of_wal < wake_lsn)
			continue;

		/*
		 * Nothing pending: everything before EndRecPtr is projected, once
		 * the last batch is on disk.
		 */
		if (!XLogRecPtrIsInvalid(unconfirmed))
		{
			/* make the last batch durable, then read past its commit */
			if (worker_confirm(unconfirmed, unconfirmed_commit, true))
			{
				unconfirmed = InvalidXLogRecPtr;
				continue;
			}
			/* the standbys do not have it yet: look again after a nap */
		}
		else
			(void) worker_confirm(ctx->reader->EndRecPtr, InvalidXLogRecPtr, false);
		worker_set_state(CQRS_STATE_RUNNING);
		cqrs_set_applied(ctx->reader->EndRecPtr, true);

		if (redis_busy)
			continue;
		pgstat_report_activity(STATE_IDLE, NULL);
		worker_wait(cqrs_poll_interval);
		if (worker_extension_oid() != extension)
		{
			extension_gone = true;
			break;
		}
	}

	worker_confirm(unconfirmed, unconfirmed_commit, true);
	lead_ctx = NULL;
	FreeDecodingContext(ctx);
	ReplicationSlotRelease();
	cqrs_decoding_queue = NULL;
	cqrs_queue_reset(queue);

	/* DROP EXTENSION: the slot must not keep holding WAL */
	if (extension_gone)
	{
		cqrs_set_applied(InvalidXLogRecPtr, false);
		worker_drop_slot("of a dropped extension");
	}
}

/*
 * Servers that restrict which libraries may serve as output plugins
 * (output_plugin_libraries) restrict what replication users may name; the
 * projector uses its own library, so it trusts it in this process only.
 */
static void
worker_trust_own_plugin(void)
{
	const char *libs = GetConfigOption("output_plugin_libraries", true, false);

	if (libs == NULL || strstr(libs, "cqrs") != NULL)
		return;
	SetConfigOption("output_plugin_libraries",
					libs[0] ? psprintf("%s, cqrs", libs) : "cqrs",
					PGC_SUSET, PGC_S_OVERRIDE);
}

/*
 * Lead until projection is switched off or the extension dropped; on an
 * error, report it, let go of the slot and leadership, and back off, so
 * that a broken setup never turns into a restart loop.
 */
static void
worker_lead(int *failures)
{
	volatile bool failed = false;

	PG_TRY();
	{
		worker_setup_origin();
		worker_stream();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(worker_context);
		edata = CopyErrorData();
		EmitErrorReport();
		FlushErrorState();
		AbortOutOfAnyTransaction();
		cqrs_project_forget();
		if (lead_ctx != NULL)
		{
			FreeDecodingContext(lead_ctx);
			lead_ctx = NULL;
		}
		if (MyReplicationSlot != NULL)
			ReplicationSlotRelease();
		cqrs_decoding_queue = NULL;
		if (lead_queue != NULL)
			cqrs_queue_reset(lead_queue);
		cqrs_set_error(edata->message);
		FreeErrorData(edata);
		RESUME_INTERRUPTS();
		failed = true;
	}
	PG_END_TRY();

	if (!failed)
	{
		*failures = 0;
		worker_step_down(cqrs_enabled ? CQRS_STATE_IDLE : CQRS_STATE_DISABLED);
		return;
	}
	worker_step_down(CQRS_STATE_ERROR);
	worker_sleep(worker_backoff((*failures)++));
}

/*
 * Entry point of a cqrs projector process.
 */
void
cqrs_worker_main(Datum main_arg)
{
	int			failures = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(cqrs_database, NULL, 0);
	pgstat_report_appname("cqrs projector");

	worker_context = AllocSetContextCreate(TopMemoryContext,
										   "cqrs projector",
										   ALLOCSET_DEFAULT_SIZES);

	/*
	 * Batches commit asynchronously; worker_confirm() confirms the slot only
	 * up to batches whose commit is on disk.
	 */
	SetConfigOption("synchronous_commit", "off", PGC_SUSET, PGC_S_OVERRIDE);

	/*
	 * Every statement of the projector looks rows up by key.  The read
	 * model grows from empty, and a plan made while it was small (a
	 * sequential scan for "order_id = ANY($1)") would make every later
	 * batch scan the whole table; without sequential scans the one generic
	 * plan per statement stays right at any size and is never re-planned.
	 */
	SetConfigOption("enable_seqscan", "off", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("plan_cache_mode", "force_generic_plan", PGC_SUSET,
					PGC_S_OVERRIDE);
	worker_trust_own_plugin();

	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->workers_alive++;
	SpinLockRelease(&cqrs_shared->mutex);
	on_shmem_exit(worker_exit, (Datum) 0);

	for (;;)
	{
		CHECK_FOR_INTERRUPTS();

		if (!cqrs_enabled)
		{
			if (!worker_is_leader)
			{
				SpinLockAcquire(&cqrs_shared->mutex);
				if (cqrs_shared->leader_pid == 0)
					cqrs_shared->state = CQRS_STATE_DISABLED;
				SpinLockRelease(&cqrs_shared->mutex);
			}
			worker_wait(cqrs_poll_interval);
			continue;
		}

		if (!worker_extension_exists())
		{
			/* CREATE EXTENSION wakes nobody: look again soon */
			worker_wait(Min(cqrs_poll_interval, 1000));
			continue;
		}

		if (!worker_try_lead())
			continue;

		worker_lead(&failures);
	}
}
