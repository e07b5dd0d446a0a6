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

#include "miscadmin.h"
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

/*
 * Ask for the shared memory the state needs.
 */
void
cqrs_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(CqrsShared)));
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
		cqrs_shared->state = CQRS_STATE_IDLE;
		cqrs_shared->applied_lsn = InvalidXLogRecPtr;
	}
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
 * Wake the leading projector, if there is one, for a command whose commit
 * record ends at commit_end.  The projector flushes WAL up to the latest
 * such position, so a command committed with synchronous_commit = off is
 * projected at once, not when the WAL writer gets to it.
 */
void
cqrs_wake_projector(XLogRecPtr commit_end)
{
	Latch	   *latch;

	if (cqrs_shared == NULL)
		return;
	SpinLockAcquire(&cqrs_shared->mutex);
	if (commit_end > cqrs_shared->wake_lsn)
		cqrs_shared->wake_lsn = commit_end;
	latch = cqrs_shared->leader_latch;
	SpinLockRelease(&cqrs_shared->mutex);
	if (latch != NULL)
		SetLatch(latch);
}

/*
 * cqrs.pause() or cqrs.resume() committed: tell the projectors to read
 * cqrs.projector_state again, and wake the leader.
 */
void
cqrs_control_changed(void)
{
	Latch	   *latch;

	if (cqrs_shared == NULL)
		return;
	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->control_generation++;
	latch = cqrs_shared->leader_latch;
	SpinLockRelease(&cqrs_shared->mutex);
	if (latch != NULL)
		SetLatch(latch);
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
