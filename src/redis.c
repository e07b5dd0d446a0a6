/*-------------------------------------------------------------------------
 *
 * redis.c
 *		Optional write-through of the read model to Redis (hiredis), for
 *		applications that read cache-aside.
 *
 * Key order:<order_id>, value the JSON of the read-model row, TTL
 * cqrs.redis_ttl plus or minus up to cqrs.redis_ttl_jitter.  A Lua script
 * sets a key only when it does not hold a newer version, so neither a
 * stale fill by a client nor a late write of ours can move it backwards.
 *
 * Who writes what:
 *
 * - The projector, when connected, keeps the rows each batch writes and,
 *   once the batch has committed, sends them in one pipeline.
 * - Any other change of the read model (a batch while Redis is down or
 *   before it first answered, repairs and rebuilds in other sessions, a
 *   row deleted, a poison command's version bump) records the order in
 *   cqrs.redis_backlog, in the transaction that changes the row.  The
 *   projector drains the backlog whenever Redis answers: it reads the rows
 *   as they are then, writes them (or deletes the key of a row that is
 *   gone) and deletes the backlog entries it wrote.
 * - A pipeline that fails after its batch committed puts the batch's
 *   orders in the backlog before the projector goes on.
 * - The projector confirms its slot only after that (worker.c), so a
 *   crash between a batch's commit and its Redis write makes the batch's
 *   commands come again; they are recognised as applied, and their orders
 *   go to the backlog.
 * So every change of the read model reaches Redis, or waits in a table
 * that is exactly as durable as the change itself.
 *
 * Faults never stall projection: every Redis call has the timeout
 * cqrs.redis_timeout; the first failure marks Redis down, and until a
 * reconnection succeeds (tried with exponential backoff between
 * cqrs.backoff_base and cqrs.backoff_max) batches record their orders in
 * the backlog instead of waiting for Redis.
 *
 * Built without hiredis (make WITH_HIREDIS=no), everything here but the
 * settings is a no-op and cqrs.status.redis says "unavailable".
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>
#include <sys/time.h>

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "common/jsonapi.h"
#include "common/pg_prng.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "utils/array.h"
#include "utils/datetime.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "cqrs.h"
#include "redis_cluster.h"

char	   *cqrs_redis_url = NULL;
int			cqrs_redis_ttl = 300;
int			cqrs_redis_ttl_jitter = 30;
int			cqrs_redis_timeout = 200;

/*
 * check_hook of cqrs.redis_url: empty, or a URL rc_parse_url() takes.
 */
bool
cqrs_redis_check_url(char **newval, void **extra, GucSource source)
{
	RcTarget	t;
	const char *problem;

	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	if (rc_parse_url(*newval, &t, &problem))
		return true;
	GUC_check_errmsg("invalid value for parameter \"cqrs.redis_url\"");
	GUC_check_errdetail("%s", problem);
	GUC_check_errhint("The form is redis://[[user]:password@]host[:port][,host[:port]...][/db].");
	return false;
}

/* Is write-through configured (and built)? */
static inline bool
redis_configured(void)
{
#ifdef USE_HIREDIS
	return cqrs_redis_url != NULL && cqrs_redis_url[0] != '\0';
#else
	return false;
#endif
}

/*
 * What cqrs.status.redis says: unavailable (built without hiredis),
 * disabled (cqrs.redis_url empty), connected or down.
 */
const char *
cqrs_redis_state_name(void)
{
#ifdef USE_HIREDIS
	bool		connected = false;

	if (!redis_configured())
		return "disabled";
	if (cqrs_shared != NULL)
	{
		SpinLockAcquire(&cqrs_shared->mutex);
		connected = cqrs_shared->redis_connected;
		SpinLockRelease(&cqrs_shared->mutex);
	}
	return connected ? "connected" : "down";
#else
	return "unavailable";
#endif
}

/*
 * Keys that must be rewritten from their table, to insert into
 * cqrs.redis_backlog with the current transaction (redis_flush_stale()):
 * orders, and aggregates of declared projections.
 */
typedef struct StaleKey
{
	char	   *projection;		/* NULL: an order */
	char	   *id;
} StaleKey;

static List *stale_orders = NIL;	/* StaleKey * */
static bool backlog_written = false;
static bool callback_registered = false;

/* After commit, tell the projector there is backlog to drain. */
static void
redis_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (backlog_written && cqrs_shared != NULL)
			{
				Latch	   *latch;

				SpinLockAcquire(&cqrs_shared->mutex);
				cqrs_shared->redis_backlog_hint = true;
				latch = cqrs_shared->leader_latch;
				SpinLockRelease(&cqrs_shared->mutex);
				if (latch != NULL)
					SetLatch(latch);
			}
			backlog_written = false;
			stale_orders = NIL;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			backlog_written = false;
			stale_orders = NIL;
			break;
		default:
			break;
	}
}

static void
redis_register_callback(void)
{
	if (!callback_registered)
	{
		RegisterXactCallback(redis_xact_callback, NULL);
		callback_registered = true;
	}
}

/*
 * The key of this order must be rewritten from the read model once the
 * current transaction commits (a row deleted, a version bumped, a change
 * made while Redis is down or outside the projector).
 */
void
cqrs_redis_stale(const char *order_id)
{
	cqrs_redis_stale_in(NULL, order_id);
}

/* Is there a Redis to write to (cqrs.redis_url set, hiredis built in)? */
bool
cqrs_redis_wanted(void)
{
	return redis_configured();
}

/*
 * The same for the key of an aggregate in a declared projection (NULL:
 * the orders).
 */
void
cqrs_redis_stale_in(const char *projection, const char *id)
{
	MemoryContext old;
	StaleKey   *k;

	if (!redis_configured())
		return;
	redis_register_callback();
	/* not CurTransactionContext: a subtransaction may roll back first */
	old = MemoryContextSwitchTo(TopTransactionContext);
	k = palloc(sizeof(StaleKey));
	k->projection = projection ? pstrdup(projection) : NULL;
	k->id = pstrdup(id);
	stale_orders = lappend(stale_orders, k);
	MemoryContextSwitchTo(old);
}

/*
 * Insert the orders cqrs_redis_stale() collected into cqrs.redis_backlog,
 * in the current transaction (SPI connected, as the extension's owner).
 */
void
cqrs_redis_flush_stale(void)
{
	static SPIPlanPtr plans[2];
	static const char *const sql[2] = {
		/* 0.1.0 not updated yet: orders only */
		"INSERT INTO cqrs.redis_backlog (order_id)"
		" SELECT pg_catalog.unnest($1::pg_catalog.text[])",
		"INSERT INTO cqrs.redis_backlog (order_id, projection)"
		" SELECT * FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]),"
		" pg_catalog.unnest($2::pg_catalog.text[]))"};
	Oid			argtypes[2] = {TEXTARRAYOID, TEXTARRAYOID};
	Datum		values[2];
	Datum	   *ids;
	Datum	   *projections;
	bool	   *nulls;
	int			n = list_length(stale_orders);
	int			i = 0;
	int			v;
	ListCell   *lc;

	if (n == 0)
		return;
	v = cqrs_schema_020() ? 1 : 0;
	ids = palloc(sizeof(Datum) * n);
	projections = palloc(sizeof(Datum) * n);
	nulls = palloc(sizeof(bool) * n);
	foreach(lc, stale_orders)
	{
		StaleKey   *k = lfirst(lc);

		ids[i] = CStringGetTextDatum(k->id);
		nulls[i] = (k->projection == NULL);
		projections[i] = nulls[i] ? (Datum) 0 : CStringGetTextDatum(k->projection);
		i++;
	}
	values[0] = cqrs_array(ids, NULL, n, TEXTOID);
	values[1] = cqrs_array(projections, nulls, n, TEXTOID);
	stale_orders = NIL;
	(void) cqrs_exec(cqrs_keep_plan(&plans[v], sql[v], v + 1, argtypes), values,
					 NULL, 0, SPI_OK_INSERT);
	backlog_written = true;
}

/*
 * Every order of the read model goes to the backlog (a rebuild about to
 * rewrite the whole table); SPI connected, as the extension's owner.
 */
void
cqrs_redis_stale_all(void)
{
	if (!redis_configured())
		return;
	redis_register_callback();
	if (SPI_execute("INSERT INTO cqrs.redis_backlog (order_id)"
					" SELECT order_id FROM cqrs.read_model",
					false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not fill cqrs.redis_backlog");
	backlog_written = true;
}

/*
 * Every aggregate a declared projection has folded goes to the backlog
 * (all of them: projection NULL); SPI connected, as the extension's owner.
 */
void
cqrs_redis_stale_projection(const char *projection)
{
	static SPIPlanPtr plan = NULL;
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1];
	char		nulls[1] = {' '};

	if (!redis_configured() || !cqrs_schema_020())
		return;
	redis_register_callback();
	if (projection)
		values[0] = CStringGetTextDatum(projection);
	else
		nulls[0] = 'n';
	(void) cqrs_exec(cqrs_keep_plan(&plan,
									"INSERT INTO cqrs.redis_backlog (order_id, projection)"
									" SELECT aggregate_id, projection FROM cqrs.projection_version"
									" WHERE aggregate_id OPERATOR(pg_catalog.<>) ''"
									" AND ($1 IS NULL OR projection OPERATOR(pg_catalog.=) $1)",
									1, argtypes),
					 values, nulls, 0, SPI_OK_INSERT);
	backlog_written = true;
}

#ifdef USE_HIREDIS

/*
 * The JSON of a read-model row, as the key's value: the columns
 * order_id, user_id, total_amount, status, version, updated_at (UTC).
 */
static void
redis_row_json(StringInfo buf, const char *order_id, const char *user_id,
			   const char *amount, const char *status, int64 version,
			   TimestampTz updated_at)
{
	char		ts[MAXDATELEN + 1];
	int			utc = 0;

	resetStringInfo(buf);
	appendStringInfoString(buf, "{\"order_id\":");
	escape_json(buf, order_id);
	appendStringInfoString(buf, ",\"user_id\":");
	escape_json(buf, user_id);
	appendStringInfoString(buf, ",\"total_amount\":");
	if (IsValidJsonNumber(amount, strlen(amount)))
		appendStringInfoString(buf, amount);
	else
		escape_json(buf, amount);
	appendStringInfoString(buf, ",\"status\":");
	escape_json(buf, status);
	appendStringInfo(buf, ",\"version\":" INT64_FORMAT ",\"updated_at\":",
					 version);
	JsonEncodeDateTime(ts, TimestampTzGetDatum(updated_at), TIMESTAMPTZOID,
					   &utc);
	escape_json(buf, ts);
	appendStringInfoChar(buf, '}');
}

/*
 * Set the key to the value unless it holds a newer version; returns 1 when
 * it wrote, 0 when it kept the newer one.  The version is read from the
 * stored JSON, wherever the writer put it.
 */
static const char redis_cas_script[] =
"local cur = redis.call('GET', KEYS[1])\n"
"if cur then\n"
"  local v = tonumber(string.match(cur, '\"version\"%s*:%s*(%d+)'))\n"
"  if v and v > tonumber(ARGV[2]) then return 0 end\n"
"end\n"
"redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])\n"
"return 1\n";

/* One key to write after commit: a row's JSON, or a deletion. */
typedef struct RedisWrite
{
	char	   *projection;		/* a declared projection, or NULL: an order */
	char	   *order_id;		/* the aggregate */
	char	   *json;			/* NULL: delete the key */
	int64		version;
	bool		created;		/* the batch created the row (version 1) */
} RedisWrite;

/*
 * The connection: one server or a cluster (redis_cluster.c), NULL until
 * first opened; redis_up while it is open and answering.
 */
static RcConn *redis = NULL;
static bool redis_up = false;
static char *redis_url_open = NULL;	/* the URL redis was opened for */
static TimestampTz redis_retry_at = 0;
static int	redis_failures = 0;
static bool redis_was_up = false;
static bool redis_drain_needed = true;
static TimestampTz redis_stats_at = 0;
static unsigned long redis_redirects_seen = 0;

/*
 * The installation the projector writes for (system identifier, database,
 * extension OID), and whether Redis's marker key has been found to name it
 * since the connection was opened or the installation changed.
 */
#define REDIS_MARKER_KEY	"cqrs:installation"
static char redis_installation[64] = "";
static bool redis_marker_ok = false;
static bool redis_resync_needed = false;

/* The rows of the batch in progress, written after its commit. */
static MemoryContext redis_context = NULL;
static List *redis_pending = NIL;
static bool redis_write_through = false;

static void
redis_set_connected(bool connected)
{
	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->redis_connected = connected;
	SpinLockRelease(&cqrs_shared->mutex);
}

/* Where we write, for messages: never the password. */
static const char *
redis_where(void)
{
	static char where[300];
	RcTarget	t;
	const char *problem;

	if (redis_up)
		return rc_describe(redis, where, sizeof(where));
	if (!rc_parse_url(cqrs_redis_url, &t, &problem))
		return "Redis";
	snprintf(where, sizeof(where), "Redis at %s:%d%s", t.seeds[0].host,
			 t.seeds[0].port, t.nseeds > 1 ? " and other seed nodes" : "");
	return where;
}

static void
redis_close(void)
{
	if (redis != NULL)
		rc_close(redis);
	redis_up = false;
	redis_write_through = false;
	redis_set_connected(false);
}

/*
 * Redis failed: count it, say so once, close, and schedule the next
 * attempt with exponential backoff and jitter.
 */
static void
redis_fail(const char *what)
{
	long		delay;

	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->redis_errors_total++;
	SpinLockRelease(&cqrs_shared->mutex);

	if (redis_was_up || redis_failures == 0)
		ereport(WARNING,
				(errmsg("cqrs projector cannot write to %s: %s",
						redis_where(), what),
				 errdetail("Projection goes on; the orders it changes are kept in cqrs.redis_backlog and written once Redis answers again.")));
	redis_was_up = false;
	redis_close();

	delay = cqrs_backoff_base;
	for (int i = 0; i < redis_failures && delay < cqrs_backoff_max; i++)
		delay *= 2;
	delay = Min(delay, cqrs_backoff_max);
	delay = delay / 2 + (long) pg_prng_uint64_range(&pg_global_prng_state, 0, delay / 2);
	redis_retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), delay);
	redis_failures++;
}

/*
 * After a call: count the redirections it followed, and if the cluster's
 * map lost a primary (failed over: its last writes may not have reached
 * the replica that took over), write every key again.
 */
static void
redis_after_call(void)
{
	if (redis->primary_gone)
	{
		redis->primary_gone = false;
		ereport(LOG,
				(errmsg("cqrs projector found a Redis Cluster primary replaced or emptied"),
				 errdetail("Its last writes may not have reached the node that took over its slots; every key is written again from the read model.")));
		redis_resync_needed = true;
		redis_drain_needed = true;
	}
	if (redis->redirects == redis_redirects_seen)
		return;
	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->redis_redirects_total += redis->redirects - redis_redirects_seen;
	SpinLockRelease(&cqrs_shared->mutex);
	redis_redirects_seen = redis->redirects;
}

/*
 * Run commands, each routed by its key (rc_run()).  False after
 * redis_fail() when a node could not be reached, or when any command
 * answered an error or a type other than expected_type (-1: any).  The
 * replies are freed; *written counts integer 1 and status replies.
 */
static bool
redis_run(RcCommand *cmds, int n, int expected_type, uint64 *written)
{
	bool		ok = rc_run(redis, cmds, n);
	char		failure[256] = "";

	redis_after_call();
	if (!ok)
		strlcpy(failure, redis->err, sizeof(failure));
	if (written != NULL)
		*written = 0;
	for (int i = 0; i < n; i++)
	{
		redisReply *reply = cmds[i].reply;

		if (reply == NULL)
			continue;
		if (failure[0] == '\0' &&
			(reply->type == REDIS_REPLY_ERROR ||
			 (expected_type >= 0 && reply->type != expected_type)))
			snprintf(failure, sizeof(failure), "%s: %s", cmds[i].argv[0],
					 reply->type == REDIS_REPLY_ERROR ? reply->str : "unexpected reply");
		else if (written != NULL &&
				 ((reply->type == REDIS_REPLY_INTEGER && reply->integer == 1) ||
				  reply->type == REDIS_REPLY_STATUS))
			(*written)++;
		freeReplyObject(reply);
		cmds[i].reply = NULL;
	}
	if (failure[0] != '\0')
	{
		redis_fail(failure);
		return false;
	}
	return true;
}

/*
 * Learn the server or the cluster, connect to the first node that serves
 * a slot (which authenticates and loads the script, and so proves the
 * credentials), and start over: drain the backlog, read the counters.
 */
static bool
redis_open(void)
{
	RcTarget	t;
	const char *problem;
	int			first = -1;

	if (!rc_parse_url(cqrs_redis_url, &t, &problem))
		return false;			/* the check hook prevents this */
	if (redis == NULL)
		redis = MemoryContextAllocZero(TopMemoryContext, sizeof(RcConn));
	if (memcmp(&redis->target, &t, sizeof(t)) != 0)
	{
		/* another URL: forget the nodes of the old one */
		memset(redis, 0, sizeof(RcConn));
		redis->target = t;
	}
	redis->timeout.tv_sec = cqrs_redis_timeout / 1000;
	redis->timeout.tv_usec = (cqrs_redis_timeout % 1000) * 1000;
	redis->script = redis_cas_script;
	redis_redirects_seen = redis->redirects;

	if (rc_open(redis))
	{
		redis_after_call();
		for (int i = 0; i < redis->nnodes && first < 0; i++)
			if (redis->nodes[i].serves)
				first = i;
		if (first < 0)
			snprintf(redis->err, sizeof(redis->err), "no node serves a slot");
	}
	if (first < 0 || rc_node(redis, first) == NULL)
	{
		redis_fail(redis->err);
		return false;
	}
	redis_up = true;
	ereport(LOG,
			(errmsg("cqrs projector writes through to %s", redis_where())));
	redis_failures = 0;
	redis_was_up = true;
	redis_drain_needed = true;
	redis_stats_at = 0;
	redis_set_connected(true);
	return true;
}

/*
 * Send the writes in one call (a pipeline per node) and read every reply.
 * False (after redis_fail()) if any failed; some may have been done.
 */
static bool
redis_send(List *writes)
{
	static MemoryContext send_context = NULL;
	MemoryContext old;
	ListCell   *lc;
	int			n = list_length(writes);
	RcCommand  *cmds;
	uint64		written;
	int			jitter = Min(cqrs_redis_ttl_jitter, cqrs_redis_ttl - 1);
	int			i = 0;
	bool		ok;

	/* the commands live for this call only; it runs outside transactions */
	if (send_context == NULL)
		send_context = AllocSetContextCreate(TopMemoryContext, "cqrs redis send",
											 ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(send_context);
	cmds = palloc0(sizeof(RcCommand) * Max(n, 1));

	foreach(lc, writes)
	{
		RedisWrite *w = lfirst(lc);
		RcCommand  *cmd = &cmds[i++];
		const char **argv = palloc(sizeof(char *) * 7);

		cmd->argv = argv;
		cmd->key = psprintf("%s:%s", w->projection ? w->projection : "order",
							w->order_id);
		if (w->json == NULL)
		{
			cmd->argc = 2;
			argv[0] = "DEL";
			argv[1] = cmd->key;
			continue;
		}

		/*
		 * Nothing is newer than a row just created: a key that exists
		 * already is a client's fill of this very version.  So no script,
		 * only "if absent".
		 */
		if (w->created)
		{
			cmd->argc = 6;
			argv[0] = "SET";
			argv[1] = cmd->key;
			argv[2] = w->json;
			argv[3] = "EX";
			argv[5] = "NX";
		}
		else
		{
			cmd->argc = 7;
			argv[0] = "EVALSHA";
			argv[1] = redis->sha;
			argv[2] = "1";
			argv[3] = cmd->key;
			argv[4] = w->json;
			argv[5] = psprintf(INT64_FORMAT, w->version);
		}
		argv[cmd->argc == 6 ? 4 : 6] =
			psprintf("%d", cqrs_redis_ttl - jitter +
					 (int) pg_prng_uint64_range(&pg_global_prng_state, 0, 2 * jitter));
	}

	ok = redis_run(cmds, n, -1, &written);
	MemoryContextSwitchTo(old);
	MemoryContextReset(send_context);
	if (!ok)
		return false;
	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->redis_writes_total += written;
	SpinLockRelease(&cqrs_shared->mutex);
	return true;
}

/* Sum keyspace_hits and keyspace_misses from INFO stats of every primary. */
static void
redis_read_stats(void)
{
	uint64		hits = 0;
	uint64		misses = 0;

	for (int i = 0; i < redis->nnodes; i++)
	{
		redisReply *reply;
		const char *p;

		if (!redis->nodes[i].serves)
			continue;
		reply = rc_node_command(redis, i, 2, (const char *[]) {"INFO", "stats"});
		if (reply == NULL || reply->type != REDIS_REPLY_STRING)
		{
			if (reply != NULL)
				freeReplyObject(reply);
			redis_fail(redis->err);
			return;
		}
		if ((p = strstr(reply->str, "keyspace_hits:")) != NULL)
			hits += strtoull(p + strlen("keyspace_hits:"), NULL, 10);
		if ((p = strstr(reply->str, "keyspace_misses:")) != NULL)
			misses += strtoull(p + strlen("keyspace_misses:"), NULL, 10);
		freeReplyObject(reply);
	}

	SpinLockAcquire(&cqrs_shared->mutex);
	cqrs_shared->redis_hits = hits;
	cqrs_shared->redis_misses = misses;
	SpinLockRelease(&cqrs_shared->mutex);
}

/*
 * Is this reply Redis refusing a command to our ACL user?
 */
static bool
redis_noperm(redisReply *reply)
{
	return reply != NULL && reply->type == REDIS_REPLY_ERROR &&
		strncmp(reply->str, "NOPERM", 6) == 0;
}

/*
 * Delete every order key, SCANning each primary in batches of about 1000
 * keys.  False after redis_fail().
 */
static bool
redis_purge_orders(uint64 *deleted)
{
	*deleted = 0;
	for (int node = 0; node < redis->nnodes; node++)
	{
		char		cursor[32] = "0";

		if (!redis->nodes[node].serves)
			continue;
		do
		{
			redisReply *reply;
			redisReply *keys;

			reply = rc_node_command(redis, node, 6,
									(const char *[]) {"SCAN", cursor, "MATCH", "order:*",
													  "COUNT", "1000"});
			if (reply == NULL || reply->type != REDIS_REPLY_ARRAY ||
				reply->elements != 2 || reply->element[0]->type != REDIS_REPLY_STRING ||
				reply->element[1]->type != REDIS_REPLY_ARRAY)
			{
				if (reply != NULL)
					freeReplyObject(reply);
				redis_fail(reply == NULL ? redis->err : "SCAN: unexpected reply");
				return false;
			}
			strlcpy(cursor, reply->element[0]->str, sizeof(cursor));
			keys = reply->element[1];
			if (keys->elements > 0)
			{
				RcCommand  *cmds = palloc0(sizeof(RcCommand) * keys->elements);
				uint64		gone;

				for (size_t i = 0; i < keys->elements; i++)
				{
					const char **argv = palloc(sizeof(char *) * 2);

					argv[0] = "DEL";
					argv[1] = keys->element[i]->str;
					cmds[i].argc = 2;
					cmds[i].argv = argv;
					cmds[i].key = argv[1];
				}
				if (!redis_run(cmds, (int) keys->elements, REDIS_REPLY_INTEGER, &gone))
				{
					freeReplyObject(reply);
					return false;
				}
				*deleted += gone;
			}
			freeReplyObject(reply);
		} while (strcmp(cursor, "0") != 0);
	}
	return true;
}

/*
 * Make sure Redis holds nothing of another installation.  Redis's marker
 * key names the installation whose rows its order keys are.  Another name
 * (the extension dropped and created again, a restore into another
 * cluster, one Redis moved between servers) means keys that may be newer
 * by version than ours and yet wrong: they are deleted.  No marker (a new
 * Redis, or one restarted empty) or another name means every key must be
 * written again from the read model: all orders go to the backlog.  False
 * after redis_fail().
 */
static bool
redis_check_marker(void)
{
	RcCommand	cmd = {2, (const char *[]) {"GET", REDIS_MARKER_KEY}, REDIS_MARKER_KEY, NULL};
	redisReply *reply;
	uint64		deleted = 0;
	bool		other;

	if (!rc_run(redis, &cmd, 1))
	{
		if (cmd.reply != NULL)
			freeReplyObject(cmd.reply);
		redis_fail(redis->err);
		return false;
	}
	redis_after_call();
	reply = cmd.reply;
	if (redis_noperm(reply))
	{
		freeReplyObject(reply);
		ereport(WARNING,
				(errmsg("cqrs projector may not read the Redis key \"%s\"",
						REDIS_MARKER_KEY),
				 errdetail("Without it, keys another installation left in Redis are not deleted."),
				 errhint("Allow the projector's Redis user the keys cqrs:* and the command SCAN.")));
		redis_marker_ok = true;
		return true;
	}
	if (reply->type != REDIS_REPLY_STRING && reply->type != REDIS_REPLY_NIL)
	{
		redis_fail(reply->type == REDIS_REPLY_ERROR ? reply->str : "GET: unexpected reply");
		freeReplyObject(reply);
		return false;
	}
	if (reply->type == REDIS_REPLY_STRING &&
		strcmp(reply->str, redis_installation) == 0)
	{
		freeReplyObject(reply);
		redis_marker_ok = true;
		return true;
	}
	other = (reply->type == REDIS_REPLY_STRING);
	freeReplyObject(reply);

	if (other && !redis_purge_orders(&deleted))
		return false;
	cmd.argc = 3;
	cmd.argv = (const char *[]) {"SET", REDIS_MARKER_KEY, redis_installation};
	if (!redis_run(&cmd, 1, REDIS_REPLY_STATUS, NULL))
		return false;
	if (other)
		ereport(LOG,
				(errmsg("cqrs projector deleted " UINT64_FORMAT " order keys another installation left in Redis",
						deleted),
				 errdetail("Every order is written again from the read model.")));
	else
		ereport(LOG,
				(errmsg("cqrs projector found no installation marker in Redis"),
				 errdetail("Every order is written again from the read model.")));
	redis_marker_ok = true;
	redis_resync_needed = true;
	redis_drain_needed = true;
	return true;
}

/*
 * The projector's turn for Redis, once per loop: follow cqrs.redis_url,
 * reconnect when the backoff allows, refresh the hit counters every
 * second.  Returns true when the backlog should be drained now
 * (cqrs_redis_drain(), in a transaction).
 */
bool
cqrs_redis_tick(void)
{
	TimestampTz now;
	bool		hint;

	if (redis_url_open != NULL &&
		(cqrs_redis_url == NULL || strcmp(redis_url_open, cqrs_redis_url) != 0))
	{
		redis_close();
		pfree(redis_url_open);
		redis_url_open = NULL;
		redis_failures = 0;
		redis_retry_at = 0;
	}
	if (!redis_configured())
		return false;
	if (redis_url_open == NULL)
		redis_url_open = MemoryContextStrdup(TopMemoryContext, cqrs_redis_url);

	now = GetCurrentTimestamp();
	if (!redis_up)
	{
		if (now < redis_retry_at || !redis_open())
			return false;
		redis_marker_ok = false;
	}
	if (!redis_marker_ok && redis_installation[0] != '\0' &&
		!redis_check_marker())
		return false;
	if (now >= TimestampTzPlusMilliseconds(redis_stats_at, 1000))
	{
		redis_stats_at = now;
		redis_read_stats();
		if (!redis_up)
			return false;
	}

	SpinLockAcquire(&cqrs_shared->mutex);
	hint = cqrs_shared->redis_backlog_hint;
	cqrs_shared->redis_backlog_hint = false;
	SpinLockRelease(&cqrs_shared->mutex);
	if (hint)
		redis_drain_needed = true;
	return redis_drain_needed;
}

/*
 * Fill in the JSON and version of backlog entries of declared projections
 * (RedisWrite *), a projection at a time; a row that is gone, or a
 * projection dropped, leaves the JSON NULL: the key is deleted.
 */
static void
redis_declared_rows(List *declared)
{
	while (declared != NIL)
	{
		RedisWrite *first = linitial(declared);
		List	   *same = NIL;
		List	   *rest = NIL;
		ListCell   *lc;
		char	  **ids;
		char	  **json;
		int64	   *versions;
		int			n = 0;

		foreach(lc, declared)
		{
			RedisWrite *w = lfirst(lc);

			if (strcmp(w->projection, first->projection) == 0)
				same = lappend(same, w);
			else
				rest = lappend(rest, w);
		}
		ids = palloc(sizeof(char *) * list_length(same));
		json = palloc0(sizeof(char *) * list_length(same));
		versions = palloc0(sizeof(int64) * list_length(same));
		foreach(lc, same)
			ids[n++] = ((RedisWrite *) lfirst(lc))->order_id;
		cqrs_projection_json(first->projection, n, ids, json, versions);
		n = 0;
		foreach(lc, same)
		{
			RedisWrite *w = lfirst(lc);

			w->json = json[n];
			w->version = versions[n];
			n++;
		}
		declared = rest;
	}
}

/*
 * Write up to limit backlog entries to Redis from the read model as it is
 * now, and delete them; in a transaction, SPI connected.  When fewer were
 * left, the backlog is done until the next hint.  Returns whether more is
 * waiting.
 */
bool
cqrs_redis_drain(int limit)
{
	static SPIPlanPtr delete_plan = NULL;
	static SPIPlanPtr read_plans[2];
	static const char *const read_sql[2] = {
		/* 0.1.0 not updated yet: orders only */
		"SELECT b.id, b.order_id, r.user_id, r.total_amount::pg_catalog.text,"
		" r.status, r.version, r.updated_at, NULL::pg_catalog.text"
		" FROM (SELECT id, order_id FROM cqrs.redis_backlog"
		"       ORDER BY id LIMIT $1) AS b"
		" LEFT JOIN cqrs.read_model AS r"
		" ON r.order_id OPERATOR(pg_catalog.=) b.order_id",
		"SELECT b.id, b.order_id, r.user_id, r.total_amount::pg_catalog.text,"
		" r.status, r.version, r.updated_at, b.projection"
		" FROM (SELECT id, order_id, projection FROM cqrs.redis_backlog"
		"       ORDER BY id LIMIT $1) AS b"
		" LEFT JOIN cqrs.read_model AS r"
		" ON b.projection IS NULL AND r.order_id OPERATOR(pg_catalog.=) b.order_id"};
	int			v = cqrs_schema_020() ? 1 : 0;
	static const char *delete_sql =
		"DELETE FROM cqrs.redis_backlog"
		" WHERE id OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.int8[])";
	Oid			read_types[1] = {INT4OID};
	Oid			delete_types[1] = {INT8ARRAYOID};
	Datum		values[1];
	Datum	   *ids;
	List	   *writes = NIL;
	List	   *declared = NIL;
	StringInfoData json;
	uint64		n;

	if (!redis_up)
		return false;
	if (redis_resync_needed)
	{
		cqrs_redis_stale_all();
		cqrs_redis_stale_projection(NULL);
		redis_resync_needed = false;
	}
	values[0] = Int32GetDatum(limit);
	n = cqrs_exec(cqrs_keep_plan(&read_plans[v], read_sql[v], 1, read_types),
				  values, NULL, 0, SPI_OK_SELECT);
	if (n < (uint64) limit)
		redis_drain_needed = false;
	if (n == 0)
		return false;

	initStringInfo(&json);
	ids = palloc(sizeof(Datum) * n);
	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		RedisWrite *w = palloc0(sizeof(RedisWrite));
		bool		isnull;
		Datum		version;

		ids[i] = SPI_getbinval(tup, desc, 1, &isnull);
		w->order_id = cqrs_spi_text(tup, desc, 2);
		w->projection = cqrs_spi_text(tup, desc, 8);
		version = SPI_getbinval(tup, desc, 6, &isnull);
		if (w->projection != NULL)
			declared = lappend(declared, w);
		else if (!isnull)
		{
			w->version = DatumGetInt64(version);
			redis_row_json(&json, w->order_id, cqrs_spi_text(tup, desc, 3),
						   cqrs_spi_text(tup, desc, 4),
						   cqrs_spi_text(tup, desc, 5), w->version,
						   DatumGetTimestampTz(SPI_getbinval(tup, desc, 7, &isnull)));
			w->json = pstrdup(json.data);
		}
		writes = lappend(writes, w);
	}
	/* the rows of declared projections, read as each projection's owner */
	if (declared != NIL)
		redis_declared_rows(declared);
	if (!redis_send(writes))
	{
		redis_drain_needed = true;
		return false;
	}
	values[0] = PointerGetDatum(construct_array(ids, (int) n, INT8OID, 8,
												FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	(void) cqrs_exec(cqrs_keep_plan(&delete_plan, delete_sql, 1, delete_types),
					 values, NULL, 0, SPI_OK_DELETE);
	return redis_drain_needed;
}

/*
 * A projector batch begins: write its rows through after commit if Redis
 * is connected, else record them in the backlog.
 */
void
cqrs_redis_batch_begin(void)
{
	if (redis_context == NULL)
		redis_context = AllocSetContextCreate(TopMemoryContext,
											  "cqrs redis writes",
											  ALLOCSET_DEFAULT_SIZES);
	MemoryContextReset(redis_context);
	redis_pending = NIL;
	redis_write_through = redis_configured() && redis_up;
}

/*
 * A row the current batch writes to the read model (updated_at is the
 * transaction's start, as now() in the statements that write it).
 */
void
cqrs_redis_row(const char *order_id, const char *user_id, Datum amount,
			   const char *status, int64 version)
{
	MemoryContext old;
	RedisWrite *w;
	StringInfoData json;

	if (!redis_configured())
		return;
	if (!redis_write_through)
	{
		cqrs_redis_stale(order_id);
		return;
	}
	old = MemoryContextSwitchTo(redis_context);
	w = palloc0(sizeof(RedisWrite));
	w->order_id = pstrdup(order_id);
	w->version = version;
	w->created = (version == 1);
	initStringInfo(&json);
	redis_row_json(&json, order_id, user_id,
				   DatumGetCString(DirectFunctionCall1(numeric_out, amount)),
				   status, version, GetCurrentTransactionStartTimestamp());
	w->json = json.data;
	redis_pending = lappend(redis_pending, w);
	MemoryContextSwitchTo(old);
}

/*
 * A row (as JSON with its version, see cqrs_projection_json()) the current
 * batch writes to a declared projection, or NULL: the row was deleted.
 * "created": the batch made the row.
 */
void
cqrs_redis_declared_row(const char *projection, const char *id,
						const char *json, int64 version, bool created)
{
	MemoryContext old;
	RedisWrite *w;

	if (!redis_configured())
		return;
	if (!redis_write_through)
	{
		cqrs_redis_stale_in(projection, id);
		return;
	}
	old = MemoryContextSwitchTo(redis_context);
	w = palloc0(sizeof(RedisWrite));
	w->projection = pstrdup(projection);
	w->order_id = pstrdup(id);
	w->json = json ? pstrdup(json) : NULL;
	w->version = version;
	w->created = created && json != NULL;
	redis_pending = lappend(redis_pending, w);
	MemoryContextSwitchTo(old);
}

/* How many rows the batch has noted so far (for cqrs_redis_forget()). */
int
cqrs_redis_mark(void)
{
	return list_length(redis_pending);
}

/* A subtransaction of the batch rolled back: forget what it noted. */
void
cqrs_redis_forget(int mark)
{
	if (list_length(redis_pending) > mark)
		redis_pending = list_truncate(redis_pending, mark);
}

/*
 * The batch committed: write its rows.  Returns false when that failed;
 * the caller then records them with cqrs_redis_backlog_failed() in a new
 * transaction before it goes on.
 */
bool
cqrs_redis_batch_done(void)
{
	redis_write_through = false;
	if (redis_pending == NIL)
		return true;
	if (!redis_up || !redis_send(redis_pending))
		return false;
	redis_pending = NIL;
	return true;
}

/* The batch rolled back: nothing to write. */
void
cqrs_redis_batch_abort(void)
{
	redis_write_through = false;
	redis_pending = NIL;
}

/* Has the batch rows to write through? */
bool
cqrs_redis_batch_pending(void)
{
	return redis_pending != NIL;
}

/* Put the rows of a batch whose write failed in the backlog (SPI connected). */
void
cqrs_redis_backlog_failed(void)
{
	ListCell   *lc;

	foreach(lc, redis_pending)
		cqrs_redis_stale_in(((RedisWrite *) lfirst(lc))->projection,
							((RedisWrite *) lfirst(lc))->order_id);
	redis_pending = NIL;
	cqrs_redis_flush_stale();
	redis_drain_needed = true;
}

/*
 * The installation the projector now serves; Redis's marker is checked
 * again when it changes.
 */
void
cqrs_redis_installation(Oid extension)
{
	char		id[64];

	snprintf(id, sizeof(id), UINT64_FORMAT "/%u/%u", GetSystemIdentifier(),
			 MyDatabaseId, extension);
	if (strcmp(id, redis_installation) == 0)
		return;
	strlcpy(redis_installation, id, sizeof(redis_installation));
	redis_marker_ok = false;
}

#else							/* !USE_HIREDIS */

void
cqrs_redis_installation(Oid extension)
{
}

bool
cqrs_redis_tick(void)
{
	return false;
}

bool
cqrs_redis_drain(int limit)
{
	return false;
}

void
cqrs_redis_batch_begin(void)
{
}

void
cqrs_redis_row(const char *order_id, const char *user_id, Datum amount,
			   const char *status, int64 version)
{
}

void
cqrs_redis_declared_row(const char *projection, const char *id,
						const char *json, int64 version, bool created)
{
}

int
cqrs_redis_mark(void)
{
	return 0;
}

void
cqrs_redis_forget(int mark)
{
}

bool
cqrs_redis_batch_done(void)
{
	return true;
}

void
cqrs_redis_batch_abort(void)
{
}

bool
cqrs_redis_batch_pending(void)
{
	return false;
}

void
cqrs_redis_backlog_failed(void)
{
}

#endif							/* USE_HIREDIS */
