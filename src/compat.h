/*-------------------------------------------------------------------------
 *
 * compat.h
 *		Every PostgreSQL version difference cqrs depends on, in one place.
 *
 * cqrs is built and tested on PostgreSQL 15 and kept compiling on 15-17.
 * Code outside this file never tests PG_VERSION_NUM.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_COMPAT_H
#define CQRS_COMPAT_H

#if PG_VERSION_NUM < 150000
#error "cqrs requires PostgreSQL 15 or later"
#endif

/* PostgreSQL 16 moved the varlena macros out of postgres.h. */
#if PG_VERSION_NUM >= 160000
#include "varatt.h"
#endif

/*
 * The new tuple of a decoded INSERT: a ReorderBufferTupleBuf up to 16, a
 * plain HeapTuple from 17 on.
 */
#if PG_VERSION_NUM >= 170000
#define CQRS_CHANGE_NEWTUPLE(change)	((change)->data.tp.newtuple)
#else
#define CQRS_CHANGE_NEWTUPLE(change) \
	((change)->data.tp.newtuple ? &(change)->data.tp.newtuple->tuple : NULL)
#endif

/*
 * Failover slots came in 17: slot creation grew failover/synced arguments,
 * and a slot records whether it is one and whether a standby synchronized
 * it from its primary.
 */
#if PG_VERSION_NUM >= 170000
#define CQRS_FAILOVER_SLOTS
#define CQRS_SLOT_CREATE(name, failover) \
	ReplicationSlotCreate((name), true, RS_EPHEMERAL, false, (failover), false)
#else
#define CQRS_SLOT_CREATE(name, failover) \
	ReplicationSlotCreate((name), true, RS_EPHEMERAL, false)
#endif

/*
 * An invalidated ("lost") slot: 15 records where it was invalidated, 16 on
 * why.  Read under the slot's spinlock.
 */
#if PG_VERSION_NUM >= 160000
#define CQRS_SLOT_INVALIDATED(slot)	((slot)->data.invalidated != RS_INVAL_NONE)
#else
#define CQRS_SLOT_INVALIDATED(slot) \
	(!XLogRecPtrIsInvalid((slot)->data.invalidated_at))
#endif

/* Slot acquisition learned an error_if_invalid argument in 18; 15-17 agree. */
#define CQRS_SLOT_ACQUIRE(name)		ReplicationSlotAcquire((name), false)

/* Session origins name their acquiring process from 16 on. */
#if PG_VERSION_NUM >= 160000
#define CQRS_ORIGIN_SESSION_SETUP(origin)	replorigin_session_setup((origin), 0)
#else
#define CQRS_ORIGIN_SESSION_SETUP(origin)	replorigin_session_setup(origin)
#endif

/*
 * Reading a temporary file back: 16 replaced BufFileRead(), which returns
 * a short count at the end, by BufFileReadExact(), which raises the error.
 */
#if PG_VERSION_NUM >= 160000
#define CQRS_BUFFILE_READ(file, ptr, size)	BufFileReadExact((file), (ptr), (size))
#else
#define CQRS_BUFFILE_READ(file, ptr, size) \
	do { \
		if (BufFileRead((file), (ptr), (size)) != (size_t) (size)) \
			ereport(ERROR, \
					(errcode_for_file_access(), \
					 errmsg("could not read from cqrs spill file: read only part of a record"))); \
	} while (0)
#endif

/* Privilege checks on one object: object_aclcheck() from 16 on. */
#if PG_VERSION_NUM >= 160000
#define CQRS_TYPE_ACLCHECK(oid, role, mode) \
	object_aclcheck(TypeRelationId, (oid), (role), (mode))
#define CQRS_PROC_ACLCHECK(oid, role, mode) \
	object_aclcheck(ProcedureRelationId, (oid), (role), (mode))
#else
#define CQRS_TYPE_ACLCHECK(oid, role, mode) pg_type_aclcheck((oid), (role), (mode))
#define CQRS_PROC_ACLCHECK(oid, role, mode) pg_proc_aclcheck((oid), (role), (mode))
#endif

#endif							/* CQRS_COMPAT_H */
