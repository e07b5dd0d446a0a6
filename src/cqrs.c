/*-------------------------------------------------------------------------
 *
 * cqrs.c
 *		Module entry point of the cqrs extension.
 *
 * The library is loaded three ways: preloaded by the postmaster through
 * shared_preload_libraries, by a backend calling one of its SQL functions,
 * and by a walsender or decoding backend as a logical decoding output
 * plugin.  Only the first may register background workers or request
 * shared memory, so _PG_init does everything else before it returns for
 * the other two.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/guc.h"

#include "cqrs.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

/*
 * Module load callback.
 */
void
_PG_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		return;

	MarkGUCPrefixReserved("cqrs");
}
