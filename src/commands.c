/*-------------------------------------------------------------------------
 *
 * commands.c
 *		The command path: cqrs.submit_order(), cqrs.ship_order() and
 *		cqrs.cancel_order().
 *
 * Each function validates its arguments, builds the command's payload and
 * appends one row to cqrs.command_log, then returns a cqrs.receipt.  No
 * read-model work happens here: the projector does that after commit.
 *
 * Invariants this file keeps:
 *
 * - Bad input raises an error before anything is written.
 * - command_id is the idempotency key.  Every command takes a
 *   transaction-scoped lock on its command_id and on its order, so no
 *   other transaction can be appending the same id or to the same order;
 *   the append is then one INSERT that skips itself when its command_id
 *   or its order's sequence is already in the log (cheaper than ON
 *   CONFLICT's speculative insertion).  A command_id the server has just
 *   generated (a fresh UUIDv7: the caller passed none) is in no other
 *   transaction and not in the log, so it is neither locked nor looked
 *   up; the unique index still stands behind it.  Only when it inserted nothing is
 *   the log read, to tell a retry of the same command (the original
 *   receipt, duplicate = true) from a reuse of the id for another command,
 *   or a taken sequence (both 23505).  Under REPEATABLE READ or
 *   SERIALIZABLE the snapshot may not see a row committed by the
 *   transaction we waited for, so there the INSERT uses ON CONFLICT DO
 *   NOTHING, which sees it and fails with a serialization error.
 * - A transaction that appends more than CQRS_KEY_LOCKED_MAX commands (a
 *   bulk load) locks the log itself instead of each key from then on, so
 *   that its locks stay few; other appenders then wait for it to end
 *   (cmd_lock()).
 * - sequence_id values of one order are unique (the unique index) and,
 *   when the server assigns them, dense: every command takes a
 *   transaction-scoped lock on its order before reading the order's last
 *   sequence, so concurrent commands on one order queue in arrival order,
 *   a ship never races the create it follows, and an aborted transaction
 *   releases its number unused.  Commands on different orders never wait
 *   for each other.
 * - The append runs as the owner of cqrs.command_log (as RI triggers run
 *   as the table owner), so callers need EXECUTE on the function and no
 *   privilege on the log.  Every statement is fully schema-qualified and
 *   prepared once per backend, and values are always parameters.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "common/hashfn.h"
#include "common/int.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"
#include "utils/syscache.h"
#include "utils/uuid.h"

#include "cqrs.h"

PG_FUNCTION_INFO_V1(submit_order);
PG_FUNCTION_INFO_V1(ship_order);
PG_FUNCTION_INFO_V1(cancel_order);
PG_FUNCTION_INFO_V1(submit);

/* Upper bound of an order amount, inclusive. */
#define CQRS_MAX_AMOUNT			INT64CONST(1000000000000000)

/* A validated command, ready to append. */
typedef struct CqrsCommand
{
	CqrsCommandType type;
	const char *type_name;
	const char *noun;			/* what the aggregate is: "order", ... */
	bool		creates;		/* must be the aggregate's sequence 1 */
	text	   *order_id;		/* the aggregate's id */
	pg_uuid_t	command_id;
	bool		id_generated;	/* command_id is a fresh UUIDv7 of ours */
	bool		sequence_given; /* caller chose sequence_id */
	int64		sequence_id;
	Jsonb	   *payload;
} CqrsCommand;

/* What the command functions return, as cqrs.receipt. */
typedef struct CqrsReceipt
{
	pg_uuid_t	command_id;
	int64		log_id;
	int64		sequence_id;
	bool		duplicate;
} CqrsReceipt;

/* This transaction appended a command: wake the projector at commit. */
static bool wake_at_commit = false;

/* Commands this transaction appended, by type, counted at commit. */
static uint32 appended[CQRS_COMMAND_TYPES];
static bool xact_callback_registered = false;

/*
 * Commands this transaction appended under key locks; past
 * CQRS_KEY_LOCKED_MAX it locks the log instead (cmd_lock()).
 */
#define CQRS_KEY_LOCKED_MAX		256
static int	key_locked = 0;

/* Plans kept for the life of the backend, prepared on first use. */
static SPIPlanPtr insert_plan = NULL;
static SPIPlanPtr fresh_insert_plan = NULL;
static SPIPlanPtr snapshot_insert_plan = NULL;
static SPIPlanPtr lookup_plan = NULL;
static SPIPlanPtr last_sequence_plan = NULL;
static SPIPlanPtr holder_plan = NULL;

/*
 * Fetch a required identifier argument and check it: not NULL (22004), not
 * empty, at most CQRS_MAX_ID_BYTES, no control characters (22023).
 */
static text *
cmd_get_id(FunctionCallInfo fcinfo, int argno, const char *name)
{
	text	   *t;
	const unsigned char *p;
	int			len;
	bool		utf8 = (GetDatabaseEncoding() == PG_UTF8);

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));

	t = PG_GETARG_TEXT_PP(argno);
	p = (const unsigned char *) VARDATA_ANY(t);
	len = VARSIZE_ANY_EXHDR(t);

	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", name)));
	if (len > CQRS_MAX_ID_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is too long", name),
				 errdetail("It is %d bytes long; the limit is %d bytes.",
						   len, CQRS_MAX_ID_BYTES)));

	for (int i = 0; i < len; i++)
	{
		/* C0 controls and DEL; in UTF-8 also C1 controls (U+0080-U+009F) */
		if (p[i] < 0x20 || p[i] == 0x7F ||
			(utf8 && p[i] == 0xC2 && i + 1 < len &&
			 p[i + 1] >= 0x80 && p[i + 1] <= 0x9F))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("%s must not contain control characters", name),
					 errdetail("Byte %d is a control character.", i + 1)));
	}

	return t;
}

/*
 * Fetch and check the amount: present, finite, > 0 and <= 1e15 (22023).
 */
static Numeric
cmd_get_amount(FunctionCallInfo fcinfo, int argno)
{
	Numeric		amount;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("amount must not be null")));

	amount = PG_GETARG_NUMERIC(argno);

	if (numeric_is_nan(amount) || numeric_is_inf(amount))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("amount must be a finite number")));

	if (DatumGetInt32(DirectFunctionCall2(numeric_cmp,
										  NumericGetDatum(amount),
										  NumericGetDatum(int64_to_numeric(0)))) <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("amount must be greater than zero")));

	if (DatumGetInt32(DirectFunctionCall2(numeric_cmp,
										  NumericGetDatum(amount),
										  NumericGetDatum(int64_to_numeric(CQRS_MAX_AMOUNT)))) > 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("amount must not exceed 1e15")));

	return amount;
}

/*
 * Start a command: check order_id, take command_id (a fresh UUIDv7 when
 * NULL) and sequence_id (at least 1 when given) from their argument slots.
 */
static void
cmd_init_common(CqrsCommand *cmd, FunctionCallInfo fcinfo,
				int command_id_arg, int sequence_arg);

static void
cmd_init(CqrsCommand *cmd, CqrsCommandType type, FunctionCallInfo fcinfo,
		 int command_id_arg, int sequence_arg)
{
	memset(cmd, 0, sizeof(CqrsCommand));
	cmd->type = type;
	cmd->type_name = cqrs_command_type_names[type];
	cmd->noun = "order";
	cmd->creates = (type == CQRS_CREATE_ORDER);
	cmd->order_id = cmd_get_id(fcinfo, 0, "order_id");
	cmd_init_common(cmd, fcinfo, command_id_arg, sequence_arg);
}

/*
 * The part of cmd_init() every command type shares: command_id (a fresh
 * UUIDv7 when NULL) and sequence_id (at least 1 when given; 1 exactly for
 * a command that creates its aggregate, never 1 for another).
 */
static void
cmd_init_common(CqrsCommand *cmd, FunctionCallInfo fcinfo,
				int command_id_arg, int sequence_arg)
{
	if (PG_ARGISNULL(command_id_arg))
	{
		cqrs_generate_uuidv7(&cmd->command_id);
		cmd->id_generated = true;
	}
	else
		memcpy(&cmd->command_id, PG_GETARG_UUID_P(command_id_arg),
			   sizeof(pg_uuid_t));

	if (!PG_ARGISNULL(sequence_arg))
	{
		cmd->sequence_given = true;
		cmd->sequence_id = PG_GETARG_INT64(sequence_arg);
		if (cmd->sequence_id < 1)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("sequence_id must be at least 1"),
					 errdetail("The value given was " INT64_FORMAT ".",
							   cmd->sequence_id)));
		if (cmd->creates && cmd->sequence_id != 1)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("sequence_id of a %s command must be 1", cmd->type_name),
					 errdetail("The value given was " INT64_FORMAT ".",
							   cmd->sequence_id)));
		if (!cmd->creates && cmd->sequence_id == 1)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 cmd->type == CQRS_DECLARED_COMMAND ?
					 errmsg("sequence_id 1 is reserved for the command that creates the %s", cmd->noun) :
					 errmsg("sequence_id 1 is reserved for the CREATE_ORDER command of an order"),
					 errhint("Pass sequence_id NULL to have the server assign the next one.")));
	}
	else if (cmd->creates)
	{
		cmd->sequence_given = true;
		cmd->sequence_id = 1;
	}
}

/*
 * Payload building: push "key": value into the object under construction.
 */
static void
cmd_json_put(JsonbParseState **state, const char *key, JsonbValue *value)
{
	JsonbValue	k;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	(void) pushJsonbValue(state, WJB_KEY, &k);
	(void) pushJsonbValue(state, WJB_VALUE, value);
}

/* Push "key": a JSON string holding t, or null when t is NULL. */
static void
cmd_json_put_text(JsonbParseState **state, const char *key, text *t)
{
	JsonbValue	v;

	if (t == NULL)
		v.type = jbvNull;
	else
	{
		v.type = jbvString;
		v.val.string.val = VARDATA_ANY(t);
		v.val.string.len = VARSIZE_ANY_EXHDR(t);
	}
	cmd_json_put(state, key, &v);
}

/*
 * Run a kept plan that returns at most one row; true when it returned one.
 */
static bool
cmd_exec(SPIPlanPtr plan, Datum *values, const char *nulls, int expected)
{
	return cqrs_exec(plan, values, nulls, 1, expected) == 1;
}

/* Column attno of the single result row, which must not be NULL. */
static Datum
cmd_result(int attno)
{
	bool		isnull;
	Datum		d = SPI_getbinval(SPI_tuptable->vals[0],
								  SPI_tuptable->tupdesc, attno, &isnull);

	if (isnull)
		elog(ERROR, "unexpected null in column %d of a command log query",
			 attno);
	return d;
}

/*
 * Take a transaction-scoped exclusive lock on the 64-bit hash of "key" in
 * lock space "space".  Two keys sharing a hash only wait for each other.
 */
static void
cmd_lock_key(const void *key, int len, uint16 space)
{
	LOCKTAG		tag;
	uint64		h;

	h = DatumGetUInt64(hash_any_extended((const unsigned char *) key, len, 0));
	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, (uint32) (h >> 32), (uint32) h,
						 space);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);
}

/*
 * The highest sequence_id the aggregate has in the log; ERROR when it has
 * none and must_exist (0 otherwise), or when its first command is of
 * another aggregate type (aggregate ids are one namespace: an aggregate is
 * of the type of its first command).  Called with the aggregate's lock held, so no other
 * transaction can append to it before we commit.
 */
static int64
cmd_last_sequence(CqrsCommand *cmd, bool must_exist)
{
	static const char *sql =
		"SELECT l.sequence_id, f.command_type"
		" FROM (SELECT sequence_id FROM cqrs.command_log"
		"       WHERE aggregate_id OPERATOR(pg_catalog.=) $1"
		"       ORDER BY sequence_id DESC LIMIT 1) AS l"
		" LEFT JOIN cqrs.command_log AS f"
		" ON f.aggregate_id OPERATOR(pg_catalog.=) $1"
		" AND f.sequence_id OPERATOR(pg_catalog.=) 1";
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1] = {PointerGetDatum(cmd->order_id)};
	bool		isnull;
	Datum		first;

	if (!cmd_exec(cqrs_keep_plan(&last_sequence_plan, sql, 1, argtypes),
				  values, NULL, SPI_OK_SELECT))
	{
		if (!must_exist)
			return 0;
		ereport(ERROR,
				(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
				 errmsg("%s \"%s\" does not exist", cmd->noun,
						text_to_cstring(cmd->order_id)),
				 errdetail("The command log has no command for this %s.", cmd->noun),
				 cmd->type == CQRS_DECLARED_COMMAND ?
				 errhint("Submit the command that creates it first, or pass an explicit sequence_id.") :
				 errhint("Submit the order with cqrs.submit_order() first, or pass an explicit sequence_id.")));
	}

	first = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	if (!isnull)
	{
		char	   *first_type = TextDatumGetCString(first);
		const char *first_aggregate = "order";

		if (cmd->type == CQRS_DECLARED_COMMAND ||
			(strcmp(first_type, "CREATE_ORDER") != 0 &&
			 strcmp(first_type, "SHIP_ORDER") != 0 &&
			 strcmp(first_type, "CANCEL_ORDER") != 0))
		{
			const CqrsCommandDef *def = cqrs_command_def(first_type);

			first_aggregate = def ? def->aggregate_type : "(undeclared)";
		}
		if (strcmp(first_aggregate, cmd->noun) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
					 errmsg("%s \"%s\" does not exist", cmd->noun,
							text_to_cstring(cmd->order_id)),
					 errdetail("\"%s\" is a%s %s: its first command is %s.",
							   text_to_cstring(cmd->order_id),
							   strchr("aeiou", first_aggregate[0]) ? "n" : "",
							   first_aggregate, first_type)));
	}
	return DatumGetInt64(cmd_result(1));
}

/*
 * Append the command; true when a row was inserted, filling the receipt.
 */
static bool
cmd_insert(CqrsCommand *cmd, CqrsReceipt *receipt)
{
	/* with the command's locks held, under a statement snapshot */
#define LOG_INSERT_SQL(command_id_check) \
		"INSERT INTO cqrs.command_log" \
		" (command_id, command_type, aggregate_id, sequence_id, payload," \
		" traceparent)" \
		" SELECT $1, $2, $3, $4, $5, $6" \
		" WHERE" command_id_check " NOT EXISTS (SELECT FROM cqrs.command_log" \
		"                  WHERE aggregate_id OPERATOR(pg_catalog.=) $3" \
		"                  AND sequence_id OPERATOR(pg_catalog.=) $4)" \
		" RETURNING log_id"
	static const char *sql =
		LOG_INSERT_SQL(" NOT EXISTS (SELECT FROM cqrs.command_log"
					   " WHERE command_id OPERATOR(pg_catalog.=) $1) AND");
	/* the same, for a command_id generated here (in no other row) */
	static const char *fresh_sql = LOG_INSERT_SQL("");
	/* under a transaction snapshot */
	static const char *snapshot_sql =
		"INSERT INTO cqrs.command_log"
		" (command_id, command_type, aggregate_id, sequence_id, payload,"
		" traceparent)"
		" VALUES ($1, $2, $3, $4, $5, $6)"
		" ON CONFLICT DO NOTHING RETURNING log_id";
	Oid			argtypes[6] = {UUIDOID, TEXTOID, TEXTOID, INT8OID, JSONBOID, TEXTOID};
	Datum		values[6];
	char		nulls[6] = {' ', ' ', ' ', ' ', ' ', ' '};
	SPIPlanPtr	plan;

	values[0] = UUIDPGetDatum(&cmd->command_id);
	values[1] = CStringGetTextDatum(cmd->type_name);
	values[2] = PointerGetDatum(cmd->order_id);
	values[3] = Int64GetDatum(cmd->sequence_id);
	values[4] = JsonbPGetDatum(cmd->payload);
	if (cqrs_traceparent != NULL && cqrs_traceparent[0] != '\0')
		values[5] = CStringGetTextDatum(cqrs_traceparent);
	else
		nulls[5] = 'n';

	if (IsolationUsesXactSnapshot())
		plan = cqrs_keep_plan(&snapshot_insert_plan, snapshot_sql, 6, argtypes);
	else if (cmd->id_generated)
		plan = cqrs_keep_plan(&fresh_insert_plan, fresh_sql, 6, argtypes);
	else
		plan = cqrs_keep_plan(&insert_plan, sql, 6, argtypes);
	if (!cmd_exec(plan, values, nulls, SPI_OK_INSERT_RETURNING))
		return false;

	receipt->command_id = cmd->command_id;
	receipt->log_id = DatumGetInt64(cmd_result(1));
	receipt->sequence_id = cmd->sequence_id;
	receipt->duplicate = false;
	return true;
}

/*
 * The insert hit a unique key.  Either the command_id is in the log (a
 * retry of the same command gets the original receipt; anything else is an
 * error), or the order's sequence is held by another command.
 */
static void
cmd_resolve_conflict(CqrsCommand *cmd, CqrsReceipt *receipt)
{
	static const char *lookup_sql =
		"SELECT log_id, sequence_id,"
		" command_type OPERATOR(pg_catalog.=) $2"
		" AND aggregate_id OPERATOR(pg_catalog.=) $3"
		" AND payload OPERATOR(pg_catalog.=) $4"
		" AND ($5::pg_catalog.int8 IS NULL"
		"      OR sequence_id OPERATOR(pg_catalog.=) $5)"
		" FROM cqrs.command_log WHERE command_id OPERATOR(pg_catalog.=) $1";
	static const char *holder_sql =
		"SELECT command_id FROM cqrs.command_log"
		" WHERE aggregate_id OPERATOR(pg_catalog.=) $1"
		" AND sequence_id OPERATOR(pg_catalog.=) $2";
	Oid			lookup_types[5] = {UUIDOID, TEXTOID, TEXTOID, JSONBOID, INT8OID};
	Oid			holder_types[2] = {TEXTOID, INT8OID};
	Datum		values[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};
	char	   *holder = NULL;

	values[0] = UUIDPGetDatum(&cmd->command_id);
	values[1] = CStringGetTextDatum(cmd->type_name);
	values[2] = PointerGetDatum(cmd->order_id);
	values[3] = JsonbPGetDatum(cmd->payload);
	values[4] = Int64GetDatum(cmd->sequence_id);
	if (!cmd->sequence_given)
		nulls[4] = 'n';

	if (cmd_exec(cqrs_keep_plan(&lookup_plan, lookup_sql, 5, lookup_types),
				 values, nulls, SPI_OK_SELECT))
	{
		int64		log_id = DatumGetInt64(cmd_result(1));

		if (!DatumGetBool(cmd_result(3)))
			ereport(ERROR,
					(errcode(ERRCODE_UNIQUE_VIOLATION),
					 errmsg("command_id %s was already used for a different command",
							DatumGetCString(DirectFunctionCall1(uuid_out,
																UUIDPGetDatum(&cmd->command_id)))),
					 errdetail("Command log entry " INT64_FORMAT " holds another command under this id.",
							   log_id),
					 errhint("Repeat a command_id only to retry the same command.")));

		receipt->command_id = cmd->command_id;
		receipt->log_id = log_id;
		receipt->sequence_id = DatumGetInt64(cmd_result(2));
		receipt->duplicate = true;
		return;
	}

	values[0] = PointerGetDatum(cmd->order_id);
	values[1] = Int64GetDatum(cmd->sequence_id);
	if (cmd_exec(cqrs_keep_plan(&holder_plan, holder_sql, 2, holder_types),
				 values, NULL, SPI_OK_SELECT))
		holder = DatumGetCString(DirectFunctionCall1(uuid_out, cmd_result(1)));

	if (cmd->creates)
		ereport(ERROR,
				(errcode(ERRCODE_UNIQUE_VIOLATION),
				 errmsg("%s \"%s\" already exists", cmd->noun,
						text_to_cstring(cmd->order_id)),
				 holder ? errdetail("It was created by command %s.", holder) : 0));

	if (!cmd->sequence_given)
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("could not serialize access due to a concurrent command on %s \"%s\"",
						cmd->noun, text_to_cstring(cmd->order_id)),
				 errhint("The transaction might succeed if retried.")));

	ereport(ERROR,
			(errcode(ERRCODE_UNIQUE_VIOLATION),
			 errmsg("sequence_id " INT64_FORMAT " of %s \"%s\" is already taken",
					cmd->sequence_id, cmd->noun, text_to_cstring(cmd->order_id)),
			 holder ? errdetail("It is held by command %s.", holder) : 0));
}

/*
 * Transaction callback: a committed command wakes the projector at once,
 * so it reaches the read model without waiting for a poll interval.
 */
static void
cmd_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (wake_at_commit)
			{
				cqrs_wake_projector(XactLastCommitEnd,
									GetCurrentTransactionStopTimestamp());
				for (int i = 0; i < CQRS_COMMAND_TYPES; i++)
				{
					if (appended[i] > 0 && cqrs_shared != NULL)
						pg_atomic_fetch_add_u64(&cqrs_shared->commands_total[i],
												appended[i]);
				}
			}
			wake_at_commit = false;
			memset(appended, 0, sizeof(appended));
			key_locked = 0;
			break;
		case XACT_EVENT_PREPARE:
			/* COMMIT PREPARED runs no callback: the poll interval finds them */
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			wake_at_commit = false;
			memset(appended, 0, sizeof(appended));
			key_locked = 0;
			break;
		default:
			break;
	}
}

/*
 * Backpressure: refuse the command when the projector is more than
 * cqrs.max_lag of WAL behind, naming what holds it back.
 */
static void
cmd_check_lag(void)
{
	XLogRecPtr	confirmed;
	uint64		lag;
	CqrsState	state = CQRS_STATE_IDLE;
	char	   *hint;

	if (cqrs_max_lag <= 0)
		return;
	confirmed = cqrs_slot_confirmed_lsn();
	if (XLogRecPtrIsInvalid(confirmed))
		return;
	lag = GetXLogInsertRecPtr() - Min(confirmed, GetXLogInsertRecPtr());
	if (lag <= (uint64) cqrs_max_lag * 1024)
		return;

	if (cqrs_shared != NULL)
	{
		SpinLockAcquire(&cqrs_shared->mutex);
		state = cqrs_shared->leader_pid != 0 ? cqrs_shared->state : CQRS_STATE_IDLE;
		SpinLockRelease(&cqrs_shared->mutex);
	}
	if (!cqrs_enabled)
		hint = "Projection is switched off (cqrs.enabled = off); switch it on to catch up.";
	else if (state == CQRS_STATE_PAUSED)
		hint = "Projection is paused; call cqrs.resume() to catch up.";
	else if (state == CQRS_STATE_ERROR || state == CQRS_STATE_IDLE)
		hint = "No projector is applying commands; see last_error in cqrs.status and the server log.";
	else
		hint = "The projector is running but has not caught up yet; retry later, or raise cqrs.max_lag.";

	ereport(ERROR,
			(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
			 errmsg("cqrs refuses new commands: the projection is %s of WAL behind",
					TextDatumGetCString(DirectFunctionCall1(pg_size_pretty,
															Int64GetDatum((int64) lag)))),
			 errdetail("Replication slot \"%s\" has not confirmed that WAL; cqrs.max_lag is %d kB.",
					   cqrs_slot_name, cqrs_max_lag),
			 errhint("%s", hint)));
}

/*
 * Take the locks a command is appended under (see the head of this file).
 *
 * Every command locks the log in RowExclusiveLock first, as its INSERT
 * will, and then its command_id and its order.  A transaction keeps those
 * key locks until it ends, and a bulk transaction of many thousands of
 * commands would fill the shared lock table ("out of shared memory") long
 * before it is done.  So once a transaction has appended
 * CQRS_KEY_LOCKED_MAX commands under key locks, it locks the log itself in
 * ShareRowExclusiveLock instead, as a lock escalation: that waits for
 * every other transaction appending commands to end and holds back new
 * ones (their first lock is the log's), so no other transaction can touch
 * any command_id or order until this one ends, and its later commands
 * need no key lock.  Holding back new ones before their first read of the
 * log is what keeps their server-assigned sequences right once they go
 * on.
 */
static void
cmd_lock(CqrsCommand *cmd)
{
	Oid			log = cqrs_relid(CQRS_REL_COMMAND_LOG);

	LockRelationOid(log, RowExclusiveLock);
	if (key_locked >= CQRS_KEY_LOCKED_MAX)
	{
		/*
		 * Held already after the first time (a lookup in the local lock
		 * table), and taken again should a subtransaction that took it
		 * have rolled back.
		 */
		LockRelationOid(log, ShareRowExclusiveLock);
		return;
	}
	if (!cmd->id_generated)
		cmd_lock_key(&cmd->command_id, sizeof(pg_uuid_t), CQRS_COMMAND_LOCK_SPACE);
	cmd_lock_key(VARDATA_ANY(cmd->order_id), VARSIZE_ANY_EXHDR(cmd->order_id),
				 CQRS_ORDER_LOCK_SPACE);
	key_locked++;
}

/*
 * Append a validated command to the log and fill in its receipt.
 */
static void
cmd_append(CqrsCommand *cmd, CqrsReceipt *receipt)
{
	CqrsOwnerScope scope;

	cmd_check_lag();
	if (!xact_callback_registered)
	{
		RegisterXactCallback(cmd_xact_callback, NULL);
		xact_callback_registered = true;
	}
	cqrs_spi_connect_as_owner(&scope);

	cmd_lock(cmd);
	if (!cmd->sequence_given)
	{
		int64		last = cmd_last_sequence(cmd, true);

		if (pg_add_s64_overflow(last, 1, &cmd->sequence_id))
			ereport(ERROR,
					(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
					 errmsg("%s \"%s\" has no sequence_id left",
							cmd->noun, text_to_cstring(cmd->order_id)),
					 errdetail("Its last command has sequence_id " INT64_FORMAT ", the largest a bigint holds.",
							   last)));
	}
	else if (!cmd->creates)
		(void) cmd_last_sequence(cmd, false);	/* of another type? */

	if (!cmd_insert(cmd, receipt))
		cmd_resolve_conflict(cmd, receipt);
	else
	{
		wake_at_commit = true;
		appended[cmd->type]++;
	}

	cqrs_spi_finish(&scope);
}

/*
 * Turn a receipt into the function's cqrs.receipt result.
 */
static Datum
cmd_receipt_datum(FunctionCallInfo fcinfo, CqrsReceipt *receipt)
{
	TupleDesc	tupdesc;
	Datum		values[4];
	bool		nulls[4] = {false, false, false, false};

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);

	values[0] = UUIDPGetDatum(&receipt->command_id);
	values[1] = Int64GetDatum(receipt->log_id);
	values[2] = Int64GetDatum(receipt->sequence_id);
	values[3] = BoolGetDatum(receipt->duplicate);

	return HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls));
}

/*
 * What a command's span needs from before it ran: when it began, and what
 * looking up could fail once an error is on its way (the function's name,
 * the database's, the caller's).  Only when the command may be traced.
 */
typedef struct CqrsTraceCall
{
	bool		maybe;
	TimestampTz start;
	char	   *operation;
	char	   *database;
	char	   *user;
} CqrsTraceCall;

static void
cmd_trace_begin(CqrsTraceCall *trace, FunctionCallInfo fcinfo)
{
	memset(trace, 0, sizeof(CqrsTraceCall));
	if (!cqrs_trace_maybe())
		return;
	trace->maybe = true;
	trace->start = GetCurrentTimestamp();
	trace->operation = get_func_name(fcinfo->flinfo->fn_oid);
	trace->database = get_database_name(MyDatabaseId);
	trace->user = GetUserNameFromId(GetUserId(), true);
}

/*
 * The command's span, if it is traced: with the receipt it returns, or
 * the error it failed with.
 */
static void
cmd_trace_end(CqrsTraceCall *trace, CqrsCommand *cmd, CqrsReceipt *receipt,
			  ErrorData *edata)
{
	if (!trace->maybe)
		return;
	cqrs_trace_command(&(CqrsTraceCommand) {
		.operation = trace->operation,
			.database = trace->database,
			.user = trace->user,
			.command_type = cmd->type_name,
			.aggregate_id = cmd->order_id ? text_to_cstring(cmd->order_id) : NULL,
			.command_id = &cmd->command_id,
			.sequence_id = receipt ? receipt->sequence_id : cmd->sequence_id,
			.duplicate = receipt && receipt->duplicate,
			.start = trace->start,
			.edata = edata,
	});
}

/*
 * Validate and append one command with "build", and return its receipt.
 * A refused command is counted for cqrs_command_errors_total before the
 * error goes on to roll the transaction back.
 */
static Datum
cmd_run(FunctionCallInfo fcinfo,
		void (*build) (FunctionCallInfo fcinfo, CqrsCommand *cmd))
{
	MemoryContext context = CurrentMemoryContext;
	CqrsCommand cmd;
	CqrsReceipt receipt;
	CqrsTraceCall trace;

	memset(&cmd, 0, sizeof(cmd));
	cmd_trace_begin(&trace, fcinfo);
	PG_TRY();
	{
		build(fcinfo, &cmd);
		cmd_append(&cmd, &receipt);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(context);
		edata = CopyErrorData();
		cqrs_count_command_error(edata->sqlerrcode);
		cmd_trace_end(&trace, &cmd, NULL, edata);
		FreeErrorData(edata);
		PG_RE_THROW();
	}
	PG_END_TRY();

	cmd_trace_end(&trace, &cmd, &receipt, NULL);
	PG_RETURN_DATUM(cmd_receipt_datum(fcinfo, &receipt));
}

/*
 * cqrs.submit_order(order_id text, user_id text, amount numeric,
 *					 command_id uuid, sequence_id bigint) RETURNS cqrs.receipt
 */
static void
build_submit(FunctionCallInfo fcinfo, CqrsCommand *cmd)
{
	text	   *user_id;
	JsonbValue	amount;
	JsonbParseState *state = NULL;

	cmd_init(cmd, CQRS_CREATE_ORDER, fcinfo, 3, 4);
	user_id = cmd_get_id(fcinfo, 1, "user_id");
	amount.type = jbvNumeric;
	amount.val.numeric = cmd_get_amount(fcinfo, 2);

	(void) pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	cmd_json_put_text(&state, "order_id", cmd->order_id);
	cmd_json_put_text(&state, "user_id", user_id);
	cmd_json_put(&state, "amount", &amount);
	cmd->payload = JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL));
}

Datum
submit_order(PG_FUNCTION_ARGS)
{
	return cmd_run(fcinfo, build_submit);
}

/*
 * cqrs.ship_order(order_id text, command_id uuid, sequence_id bigint)
 *		RETURNS cqrs.receipt
 */
static void
build_ship(FunctionCallInfo fcinfo, CqrsCommand *cmd)
{
	JsonbParseState *state = NULL;

	cmd_init(cmd, CQRS_SHIP_ORDER, fcinfo, 1, 2);

	(void) pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	cmd_json_put_text(&state, "order_id", cmd->order_id);
	cmd->payload = JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL));
}

Datum
ship_order(PG_FUNCTION_ARGS)
{
	return cmd_run(fcinfo, build_ship);
}

/*
 * cqrs.cancel_order(order_id text, reason text, command_id uuid,
 *					 sequence_id bigint) RETURNS cqrs.receipt
 */
static void
build_cancel(FunctionCallInfo fcinfo, CqrsCommand *cmd)
{
	text	   *reason = NULL;
	JsonbParseState *state = NULL;

	cmd_init(cmd, CQRS_CANCEL_ORDER, fcinfo, 2, 3);
	if (!PG_ARGISNULL(1))
	{
		reason = PG_GETARG_TEXT_PP(1);
		if (VARSIZE_ANY_EXHDR(reason) > CQRS_MAX_REASON_BYTES)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("reason is too long"),
					 errdetail("It is %d bytes long; the limit is %d bytes.",
							   (int) VARSIZE_ANY_EXHDR(reason),
							   CQRS_MAX_REASON_BYTES)));
	}

	(void) pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	cmd_json_put_text(&state, "order_id", cmd->order_id);
	cmd_json_put_text(&state, "reason", reason);
	cmd->payload = JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL));
}

Datum
cancel_order(PG_FUNCTION_ARGS)
{
	return cmd_run(fcinfo, build_cancel);
}

/*
 * The payload argument of cqrs.submit(): not NULL (22004), at most
 * CQRS_MAX_PAYLOAD_BYTES (54000), a JSON object (22023).
 */
static Jsonb *
cmd_get_payload(FunctionCallInfo fcinfo, int argno, const char *type_name)
{
	Jsonb	   *payload;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("payload must not be null")));
	payload = PG_GETARG_JSONB_P(argno);
	if (VARSIZE(payload) > CQRS_MAX_PAYLOAD_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("payload is too large"),
				 errdetail("It is %d bytes long; the limit is %d bytes.",
						   (int) VARSIZE(payload), CQRS_MAX_PAYLOAD_BYTES)));
	if (!JB_ROOT_IS_OBJECT(payload) || JB_ROOT_IS_SCALAR(payload))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("payload of command type %s must be a JSON object", type_name)));
	return payload;
}

/*
 * The value of payload key "key" as a function argument: NULL when the key
 * is missing or JSON null; otherwise it must be of JSON type "want"
 * (jbvString: text, jbvNumeric: numeric).
 */
static void
builtin_arg(FunctionCallInfo fc, int argno, Jsonb *payload, const char *key,
			enum jbvType want, const char *type_name)
{
	JsonbValue *v = getKeyJsonValueFromContainer(&payload->root, key,
												 strlen(key), NULL);

	fc->args[argno].isnull = (v == NULL || v->type == jbvNull);
	fc->args[argno].value = (Datum) 0;
	if (fc->args[argno].isnull)
		return;
	if (v->type != want)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("payload key \"%s\" must be a JSON %s", key,
						want == jbvString ? "string" : "number"),
				 errcontext("payload key \"%s\" of command type %s", key, type_name)));
	if (want == jbvString)
		fc->args[argno].value =
			PointerGetDatum(cstring_to_text_with_len(v->val.string.val,
													 v->val.string.len));
	else
		fc->args[argno].value = NumericGetDatum(v->val.numeric);
}

/*
 * cqrs.submit() of a built-in orders command: the payload's keys become
 * the arguments of cqrs.submit_order(), cqrs.ship_order() or
 * cqrs.cancel_order(), which validate and build the command exactly as
 * when called themselves (so a retry through either is a duplicate).  The
 * payload may repeat the order's id as "order_id".
 */
static void
build_builtin(FunctionCallInfo fcinfo, const char *type_name, CqrsCommand *cmd)
{
	LOCAL_FCINFO(fc, 5);
	Jsonb	   *payload;
	const char *const *keys;
	static const char *const create_keys[] = {"order_id", "user_id", "amount"};
	static const char *const ship_keys[] = {"order_id"};
	static const char *const cancel_keys[] = {"order_id", "reason"};
	int			nargs;
	JsonbValue *given;

	payload = cmd_get_payload(fcinfo, 2, type_name);
	/* the arguments after order_id, in order; the payload may repeat it */
	if (strcmp(type_name, "CREATE_ORDER") == 0)
		keys = create_keys, nargs = 5;
	else if (strcmp(type_name, "SHIP_ORDER") == 0)
		keys = ship_keys, nargs = 3;
	else
		keys = cancel_keys, nargs = 4;
	cqrs_check_payload_keys(payload, keys, nargs - 2, type_name, InvalidOid);
	given = getKeyJsonValueFromContainer(&payload->root, "order_id", 8, NULL);
	if (given != NULL && !PG_ARGISNULL(1) &&
		(given->type != jbvString ||
		 given->val.string.len != (int) VARSIZE_ANY_EXHDR(PG_GETARG_TEXT_PP(1)) ||
		 memcmp(given->val.string.val, VARDATA_ANY(PG_GETARG_TEXT_PP(1)),
				given->val.string.len) != 0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("payload key \"order_id\" differs from aggregate_id")));

	InitFunctionCallInfoData(*fc, fcinfo->flinfo, nargs, InvalidOid, NULL, NULL);
	fc->args[0] = fcinfo->args[1];		/* order_id */
	fc->args[nargs - 2] = fcinfo->args[3];	/* command_id */
	fc->args[nargs - 1] = fcinfo->args[4];	/* sequence_id */
	if (nargs == 5)
	{
		builtin_arg(fc, 1, payload, "user_id", jbvString, type_name);
		builtin_arg(fc, 2, payload, "amount", jbvNumeric, type_name);
		build_submit(fc, cmd);
	}
	else if (nargs == 3)
		build_ship(fc, cmd);
	else
	{
		builtin_arg(fc, 1, payload, "reason", jbvString, type_name);
		build_cancel(fc, cmd);
	}
}

/*
 * cqrs.submit(command_type text, aggregate_id text, payload jsonb,
 *			   command_id uuid, sequence_id bigint) RETURNS cqrs.receipt
 *
 * A command of any declared type: its payload checked against the type's
 * payload type, then by its validator, run as the role that declared it.
 * The built-in orders commands take the order functions' path.
 */
static void
build_declared(FunctionCallInfo fcinfo, CqrsCommand *cmd)
{
	char	   *type_name;
	const CqrsCommandDef *def;
	Jsonb	   *payload;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("command_type must not be null")));
	type_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	def = cqrs_command_def(type_name);
	if (def == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("command type \"%s\" does not exist", type_name),
				 errhint("cqrs.command_type lists the declared ones; cqrs.create_command_type() declares one.")));
	if (def->builtin)
	{
		build_builtin(fcinfo, type_name, cmd);
		return;
	}

	memset(cmd, 0, sizeof(CqrsCommand));
	cmd->type = CQRS_DECLARED_COMMAND;
	cmd->type_name = pstrdup(type_name);
	cmd->noun = pstrdup(def->aggregate_type);
	cmd->creates = def->creates;
	cmd->order_id = cmd_get_id(fcinfo, 1, "aggregate_id");
	cmd_init_common(cmd, fcinfo, 3, 4);

	payload = cmd_get_payload(fcinfo, 2, type_name);
	cqrs_check_payload(def, cmd->type_name, payload);
	cqrs_run_validator(def, cmd->order_id, payload);
	cmd->payload = payload;
}

Datum
submit(PG_FUNCTION_ARGS)
{
	return cmd_run(fcinfo, build_declared);
}
