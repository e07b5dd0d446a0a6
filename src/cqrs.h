/*-------------------------------------------------------------------------
 *
 * cqrs.h
 *		Declarations shared by the modules of the cqrs extension.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_H
#define CQRS_H

#include "compat.h"
#include "utils/uuid.h"

/* Limits the command functions enforce on their input. */
#define CQRS_MAX_ID_BYTES		256
#define CQRS_MAX_REASON_BYTES	1024

/* uuidv7.c */
extern void cqrs_generate_uuidv7(pg_uuid_t *uuid);

#endif							/* CQRS_H */
