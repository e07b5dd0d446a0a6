/*-------------------------------------------------------------------------
 *
 * uuidv7.c
 *		RFC 9562 version 7 UUIDs, monotonic within a backend.
 *
 * Layout (RFC 9562, section 5.7, with method 3 of section 6.2): 48 bits of
 * Unix time in milliseconds, the version nibble 7, 12 bits of sub-
 * millisecond fraction in rand_a, the variant bits 10, and 62 random bits.
 * The fraction doubles as a counter: when the clock has not moved past the
 * last UUID this backend made (or went backwards), the last value plus one
 * is used, so a backend's UUIDs always sort in the order they were made.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <time.h>

#include "fmgr.h"
#include "port.h"

#include "cqrs.h"

PG_FUNCTION_INFO_V1(uuidv7);

/* Timestamp of the last UUID made here: milliseconds and 1/4096 fraction. */
static uint64 last_unix_ms = 0;
static uint32 last_fraction = 0;

/*
 * Fill *uuid with a new version 7 UUID.
 */
void
cqrs_generate_uuidv7(pg_uuid_t *uuid)
{
	struct timespec ts;
	uint64		unix_ms;
	uint32		fraction;
	unsigned char *b = uuid->data;

	clock_gettime(CLOCK_REALTIME, &ts);
	unix_ms = (uint64) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
	fraction = (uint32) (((uint64) (ts.tv_nsec % 1000000) * 4096) / 1000000);

	if (unix_ms < last_unix_ms ||
		(unix_ms == last_unix_ms && fraction <= last_fraction))
	{
		unix_ms = last_unix_ms;
		fraction = last_fraction + 1;
		if (fraction > 0xFFF)
		{
			unix_ms++;
			fraction = 0;
		}
	}
	last_unix_ms = unix_ms;
	last_fraction = fraction;

	if (!pg_strong_random(b + 8, UUID_LEN - 8))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate random values")));

	b[0] = (unsigned char) (unix_ms >> 40);
	b[1] = (unsigned char) (unix_ms >> 32);
	b[2] = (unsigned char) (unix_ms >> 24);
	b[3] = (unsigned char) (unix_ms >> 16);
	b[4] = (unsigned char) (unix_ms >> 8);
	b[5] = (unsigned char) unix_ms;
	b[6] = (unsigned char) (0x70 | (fraction >> 8));
	b[7] = (unsigned char) (fraction & 0xFF);
	b[8] = (unsigned char) (0x80 | (b[8] & 0x3F));
}

/*
 * cqrs.uuidv7() RETURNS uuid
 */
Datum
uuidv7(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *uuid = palloc(sizeof(pg_uuid_t));

	cqrs_generate_uuidv7(uuid);
	PG_RETURN_UUID_P(uuid);
}
