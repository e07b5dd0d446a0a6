/*-------------------------------------------------------------------------
 *
 * shmem.c
 *		Shared state of the cqrs projector: who leads, where it stands,
 *		what it measured, and the latch that commits set to wake it.
 *
 * The struct exists only when cqrs is preloaded; cqrs_shared is NULL in a
 * backend of a server that loaded the library on demand, and every reader
 * copes with that.  Fields are read and written under the spinlock.  A
 * stale leader_latch costs at worst one poll interval of latency, never
 * correctness: latches of exited processes stay valid memory.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xlog.h"
#include "access/xlog_internal.h"
#include "miscadmin.h"
#include "replication/slot.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"

#include "cqrs.h"

CqrsShared *cqrs_shared = NULL;

/* Upper bounds of the lag histogram buckets, in milliseconds. */
const double cqrs_lag_bucket_ms[CQRS_LAG_BUCKETS] = {
	0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500,
	1000, 2000, 5000, 10000, 30000, 60000, 300000
};

/* Upper bounds of the batch flush duration buckets, in seconds. */
const double cqrs_flush_bucket_s[CQRS_FLUSH_BUCKETS] = {
	0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5
};

const char *const cqrs_command_type_names[CQRS_COMMAND_TYPES] = {
	[CQRS_CREATE_ORDER] = "CREATE_ORDER",
	[CQRS_SHIP_ORDER] = "SHIP_ORDER",
	[CQRS_CANCEL_ORDER] = "CANCEL_ORDER",
	[CQRS_DECLARED_COMMAND] = "declared",
};

const char *const cqrs_error_kind_names[CQRS_ERROR_KINDS] = {
	[CQRS_ERR_INVALID_INPUT] = "invalid_input",
	[CQRS_ERR_CONFLICT] = "conflict",
	[CQRS_ERR_NO_ORDER] = "no_such_order",
	[CQRS_ERR_BACKPRESSURE] = "backpressure",
	[CQRS_ERR_CONCURRENCY] = "concurrency",
	[CQRS_ERR_PRIVILEGE] = "privilege",
	[CQRS_ERR_OTHER] = "other",
};

/*
 * Ask for the shared memory the state needs.
 */
void
cqrs_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(CqrsShared)));
	RequestAddinShmemSpace(MAXALIGN(cqrs_trace_shmem_size()));
}

/*
 * Create or attach to the shared state.
 */
void
cqrs_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	cqrs_shared = ShmemInitStruct("cqrs", sizeof(CqrsShared), &found);
	if (!found)
	{
		memset(cqrs_shared, 0, sizeof(CqrsShared));
		SpinLockInit(&cqrs_shared->mutex);
		ConditionVariableInit(&cqrs_shared->applied_cv);
		pg_atomic_init_u64(&cqrs_shared->repair_generation, 0);
		for (int i = 0; i < CQRS_COMMAND_TYPES; i++)
			pg_atomic_init_u64(&cqrs_shared->commands_total[i], 0);
		for (int i = 0; i < CQRS_ERROR_KINDS; i++)
			pg_atomic_init_u64(&cqrs_shared->command_errors[i], 0);
		cqrs_shared->state = CQRS_STATE_IDLE;
		cqrs_shared->applied_lsn = InvalidXLogRecPtr;
	}
	cqrs_trace_shmem_startup();
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Remember an error for cqrs.status (last_error, last_error_at).
 */
void
cqrs_set_error(const char *message)
{
	if (cqrs_shared == NULL)
		return;
	SpinLockAcquire(&cqrs_shared->mutex);
	strlcpy(cqrs_shared->last_error, message, CQRS_ERROR_LEN);
	cqrs_shared->last_error_at = GetCurrentTimestamp();
	SpinLockRelease(&cqrs_shared->mutex);
}

/*
 * Release cqrs_shared->mutex, held by the caller, and set the leading
 * projector's latch, if one leads.
 */
static void
shmem_release_and_wake(void)
{
	Latch	   *latch = cqrs_shared->leader_latch;

	SpinLockRelease(&cqrs_shared->mutex);
	if (latch != NULL)
		SetLatch(latch);
}

/*
 * Wake the leading projector, if there is one, for a command whose commit
 * record ends at commit_end.  The projector flushes WAL up to the latest
 * such position, so a command committed with synchronous_commit = off is
 * projected at once, not when the WAL writer gets to it.
 */
void
cqrs_wake_projector(XLogRecPtr commit_end, TimestampTz commit_time)
{
	if (cqrs_shared == NULL)
		return;
	SpinLockAcquire(&cqrs_shared->mutex);
	if (cqrs_shared->wake_lsn <= cqrs_shared->applied_lsn)
		cqrs_shared->pending_since = commit_time;
	if (commit_end > cqrs_shared->wake_lsn)
		cqrs_shared->wake_lsn = commit_end;
	shmem_release_and_wake();
}

/*
 * The end of the WAL reserved so far, as a position XLogFlush() accepts.
 * GetXLogInsertRecPtr() names where the next record will start, which at
 * a page boundary is past the page header not written yet.
 */
XLogRecPtr
cqrs_insert_end(void)
{
	XLogRecPtr	insert = GetXLogInsertRecPtr();

	if (XLogSegmentOffset(insert, wal_segment_size) == SizeOfXLogLongPHD)
		insert -= SizeOfXLogLongPHD;
	else if (insert % XLOG_BLCKSZ == SizeOfXLogShortPHD)
		insert -= SizeOfXLogShortPHD;
	return insert;
}

/*
 * A waiter (cqrs.wait_for_lsn()) needs the projector to have read up to
 * lsn.  Commits wake it and have it read as far as they end, but WAL after
 * the last commit that nobody flushes (a running-transactions record at
 * the end of an idle server's WAL) would keep it short of lsn for good:
 * ask it to write and read that far too.  Unlike a commit, this is no
 * command waiting, so the lag is left alone.
 */
void
cqrs_request_read(XLogRecPtr lsn)
{
	if (cqrs_shared == NULL)
		return;
	lsn = Min(lsn, cqrs_insert_end());
	SpinLockAcquire(&cqrs_shared->mutex);
	if (lsn > cqrs_shared->read_lsn)
		cqrs_shared->read_lsn = lsn;
	shmem_release_and_wake();
}

/*
 * cqrs.pause() or cqrs.resume() committed: tell the projectors to read
 * cqrs.projector_state again, and wake the leader.
 */
void
cqrs_control_changed(int paused)
{
	if (cqrs_shared == NULL)
		return;
	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->control_generation++;
	if (paused >= 0)
		cqrs_shared->pause_requested = (paused != 0);
	shmem_release_and_wake();
}

/*
 * Everything committed before lsn is in the read model (with only_forward,
 * unless applied_lsn is further already): publish it and wake the sessions
 * waiting in cqrs.wait_for() and cqrs.wait_for_lsn().
 */
void
cqrs_set_applied(XLogRecPtr lsn, bool only_forward)
{
	SpinLockAcquire(&cqrs_shared->mutex);
	if (!only_forward || lsn > cqrs_shared->applied_lsn)
		cqrs_shared->applied_lsn = lsn;
	SpinLockRelease(&cqrs_shared->mutex);
	ConditionVariableBroadcast(&cqrs_shared->applied_cv);
}

/*
 * Count a command a command function refused, by the kind of its error.
 * The transaction rolls back; the count stays.
 */
void
cqrs_count_command_error(int sqlerrcode)
{
	CqrsErrorKind kind;

	if (cqrs_shared == NULL)
		return;
	if (sqlerrcode == ERRCODE_UNIQUE_VIOLATION)
		kind = CQRS_ERR_CONFLICT;
	else if (sqlerrcode == ERRCODE_FOREIGN_KEY_VIOLATION)
		kind = CQRS_ERR_NO_ORDER;
	else if (sqlerrcode == ERRCODE_CONFIGURATION_LIMIT_EXCEEDED)
		kind = CQRS_ERR_BACKPRESSURE;
	else if (sqlerrcode == ERRCODE_INSUFFICIENT_PRIVILEGE)
		kind = CQRS_ERR_PRIVILEGE;
	else if (ERRCODE_TO_CATEGORY(sqlerrcode) == ERRCODE_DATA_EXCEPTION)
		kind = CQRS_ERR_INVALID_INPUT;
	else if (ERRCODE_TO_CATEGORY(sqlerrcode) == ERRCODE_TRANSACTION_ROLLBACK)
		kind = CQRS_ERR_CONCURRENCY;
	else
		kind = CQRS_ERR_OTHER;
	pg_atomic_fetch_add_u64(&cqrs_shared->command_errors[kind], 1);
}

/*
 * The position up to which our slot is confirmed, or InvalidXLogRecPtr
 * when there is no such slot in this database.
 */
XLogRecPtr
cqrs_slot_confirmed_lsn(void)
{
	ReplicationSlot *slot;
	XLogRecPtr	lsn = InvalidXLogRecPtr;

	LWLockAcquire(ReplicationSlotControlLock, LW_SHARED);
	slot = SearchNamedReplicationSlot(cqrs_slot_name, false);
	if (slot != NULL)
	{
		SpinLockAcquire(&slot->mutex);
		if (slot->data.database == MyDatabaseId)
			lsn = slot->data.confirmed_flush;
		SpinLockRelease(&slot->mutex);
	}
	LWLockRelease(ReplicationSlotControlLock);
	return lsn;
}

/*
 * Commit-to-read-model lag now, from a copy of the shared state: how long
 * the oldest command not applied yet has waited (an upper bound: the
 * commit time of the last command applied before it), 0 when every
 * command that woke the projector is applied.
 */
double
cqrs_lag_seconds(CqrsShared *snap, TimestampTz now)
{
	if (snap->wake_lsn <= snap->applied_lsn || snap->pending_since == 0 ||
		now <= snap->pending_since)
		return 0;
	return (double) (now - snap->pending_since) / USECS_PER_SEC;
}
