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

#endif							/* CQRS_COMPAT_H */
