/*-------------------------------------------------------------------------
 *
 * spi.c
 *		Plans kept for the life of a process, shared by the command path
 *		and the projector.
 *
 * Every statement cqrs runs through SPI is fixed text with parameters,
 * fully schema-qualified, prepared once per process and kept.  The plan
 * cache re-plans a kept statement when the objects it uses change, with
 * the search_path it was prepared under; since nothing in the text depends
 * on search_path, that is harmless too.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "executor/spi.h"

#include "cqrs.h"

/*
 * Prepare sql on first use, keep the plan in *cache, and return it.
 */
SPIPlanPtr
cqrs_keep_plan(SPIPlanPtr *cache, const char *sql, int nargs, Oid *argtypes)
{
	if (*cache == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed for \"%s\": %s",
				 sql, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "SPI_keepplan failed");
		*cache = plan;
	}
	return *cache;
}
