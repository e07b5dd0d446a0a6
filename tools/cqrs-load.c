/*-------------------------------------------------------------------------
 *
 * cqrs-load.c
 *		Load generator for cqrs: writers submit, ship and cancel orders
 *		through the command functions, readers read orders cache-aside
 *		(Redis, then the read model), and a probe measures how long a
 *		command takes from its commit to the read model.
 *
 *	cqrs-load [options]; cqrs-load --help lists them.
 *
 * Writers (libpq, one connection each) issue creates, ships and cancels at
 * a target rate or flat out; every order is created, then shipped or
 * cancelled once, so the mix has no invalid transitions of its own.
 * Readers pick orders the writers created and read them:
 *   cache-aside  GET order:<id>; on a miss, one query per key whatever the
 *                number of threads asking (singleflight), then SET ... NX
 *                with the TTL give or take the jitter; a missing order is
 *                cached as "-" for --miss-ttl seconds.  When Redis is down
 *                the reader goes to the database and retries Redis every
 *                second.
 *   redis        GET only (the baseline of a raw Redis read).
 *   db           the primary-key SELECT only.
 * The probe submits one order at a time, notes when its commit returned,
 * and asks cqrs.wait_for() when the read model has it.
 *
 * With --pooled, for a transaction-pooling PgBouncer, no statement is
 * prepared by name and no setting outlives its transaction: each statement
 * is sent unnamed (parse, bind and execute in one round trip), and the
 * writers' synchronous_commit is set for each command's own transaction.
 *
 * Every second a progress line; at the end (or at Ctrl-C) a summary, and
 * optionally the same as JSON (--json) and one line per second as CSV
 * (--series) for plotting.
 *
 *-------------------------------------------------------------------------
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "redis_cluster.h"

#define MAX_SECONDS		86400
#define RING_SIZE		(1 << 20)
#define ID_LEN			48
#define MAX_ERROR_KINDS	32
#define SF_BUCKETS		1024

typedef enum ReadMode
{
	READ_CACHE_ASIDE,
	READ_REDIS,
	READ_DB
} ReadMode;

static const char *const read_mode_names[] = {"cache-aside", "redis", "db"};

/* Options. */
static const char *opt_db = "dbname=postgres";
static const char *opt_redis = NULL;
static int	opt_writers = 4;
static int	opt_readers = 4;
static double opt_write_rate = 0;	/* per second, all writers; 0 = flat out */
static double opt_read_rate = 0;
static int	opt_duration = 10;
static int	opt_ttl = 300;
static int	opt_ttl_jitter = 30;
static int	opt_miss_ttl = 5;
static ReadMode opt_read_mode = READ_CACHE_ASIDE;
static bool opt_read_mode_set = false;
static bool opt_probe = true;
static bool opt_quiet = false;
static int	opt_preload = 1000;
static const char *opt_json = NULL;
static const char *opt_series = NULL;
static const char *opt_sync_commit = NULL;
static bool opt_pooled = false;

/* Redis target (one server or a cluster's seed nodes), from --redis. */
static RcTarget redis_target;

static atomic_bool stopping = false;
static struct timespec started;
static char run_id[16];

/* Per-second counters, indexed by second since the start. */
static atomic_uint_fast64_t sec_writes[MAX_SECONDS + 1];
static atomic_uint_fast64_t sec_reads[MAX_SECONDS + 1];
static atomic_uint_fast64_t sec_hits[MAX_SECONDS + 1];
static atomic_uint_fast64_t sec_misses[MAX_SECONDS + 1];
static atomic_uint_fast64_t sec_errors[MAX_SECONDS + 1];
static atomic_uint_fast64_t collapsed;

/* Orders the writers created, for the readers to read. */
static char (*ring)[ID_LEN];
static atomic_uint_fast64_t ring_count;

/* Errors by kind: an SQLSTATE, or "connection", "redis". */
static pthread_mutex_t errors_lock = PTHREAD_MUTEX_INITIALIZER;
static struct
{
	char		kind[32];
	uint64_t	count;
}			errors[MAX_ERROR_KINDS];
static int	nerrors = 0;

/* Latency samples: microseconds, with the second they were taken in. */
typedef struct Samples
{
	float	   *us;
	uint32_t   *sec;
	size_t		n;
	size_t		cap;
} Samples;

static Samples *read_samples;	/* one per reader */
static Samples lag_samples;		/* the probe's, in microseconds too */

static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (ts.tv_sec - started.tv_sec) + (ts.tv_nsec - started.tv_nsec) / 1e9;
}

static int
current_second(void)
{
	int			s = (int) now_s();

	return s > MAX_SECONDS ? MAX_SECONDS : s;
}

static void
sleep_s(double s)
{
	struct timespec ts;

	if (s <= 0)
		return;
	ts.tv_sec = (time_t) s;
	ts.tv_nsec = (long) ((s - ts.tv_sec) * 1e9);
	nanosleep(&ts, NULL);
}

static void *
xmalloc(size_t n)
{
	void	   *p = malloc(n);

	if (p == NULL)
	{
		fprintf(stderr, "cqrs-load: out of memory\n");
		exit(1);
	}
	return p;
}

static void
samples_add(Samples *s, double us)
{
	if (s->n == s->cap)
	{
		s->cap = s->cap ? s->cap * 2 : 65536;
		s->us = realloc(s->us, s->cap * sizeof(float));
		s->sec = realloc(s->sec, s->cap * sizeof(uint32_t));
		if (s->us == NULL || s->sec == NULL)
		{
			fprintf(stderr, "cqrs-load: out of memory\n");
			exit(1);
		}
	}
	s->us[s->n] = (float) us;
	s->sec[s->n] = (uint32_t) current_second();
	s->n++;
}

static void
count_error(const char *kind)
{
	pthread_mutex_lock(&errors_lock);
	for (int i = 0; i < nerrors; i++)
	{
		if (strcmp(errors[i].kind, kind) == 0)
		{
			errors[i].count++;
			goto done;
		}
	}
	if (nerrors < MAX_ERROR_KINDS)
	{
		snprintf(errors[nerrors].kind, sizeof(errors[nerrors].kind), "%s", kind);
		errors[nerrors++].count = 1;
	}
done:
	pthread_mutex_unlock(&errors_lock);
	atomic_fetch_add(&sec_errors[current_second()], 1);
}

/* A failed query: count it by SQLSTATE, or as a lost connection. */
static void
count_pg_error(PGconn *conn, PGresult *res)
{
	const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;

	if (PQstatus(conn) != CONNECTION_OK)
	{
		count_error("connection");
		PQreset(conn);
		if (PQstatus(conn) != CONNECTION_OK)
			sleep_s(0.1);
	}
	else
		count_error(state ? state : "unknown");
}

/*
 * Connect to opt_db.  Run as root, with no role named (PGUSER or user= in
 * -d), it connects as postgres rather than as a role "root" that
 * PostgreSQL installations do not have; a role named in -d still wins.
 */
static PGconn *
pg_connect(bool fatal)
{
	const char *keywords[3] = {"user", "dbname", NULL};
	const char *values[3] = {NULL, opt_db, NULL};
	PGconn	   *conn;

	if (geteuid() == 0 && getenv("PGUSER") == NULL)
		values[0] = "postgres";
	conn = PQconnectdbParams(keywords, values, 1);

	if (PQstatus(conn) != CONNECTION_OK)
	{
		if (fatal)
		{
			fprintf(stderr, "cqrs-load: could not connect to the database: %s",
					PQerrorMessage(conn));
			exit(1);
		}
	}
	return conn;
}

/*
 * Statements of this thread, kept instead of prepared with --pooled.  A
 * writer's ("sync") take synchronous_commit as one more parameter, set for
 * their own transaction, which commits at the statement's end.
 */
#define MAX_POOLED_STMTS 4
#define SYNC_FILTER " WHERE pg_catalog.set_config('synchronous_commit', $%d, true) IS NOT NULL"

typedef struct PooledStmt
{
	const char *name;
	char	   *sql;
	bool		sync;
} PooledStmt;

static __thread PooledStmt pooled_stmts[MAX_POOLED_STMTS];
static __thread int npooled_stmts;

static bool
pg_prepare_as(PGconn *conn, const char *name, const char *sql, int nparams,
			  bool sync)
{
	PGresult   *res;
	bool		ok;

	if (opt_pooled)
	{
		PooledStmt *st;
		size_t		len = strlen(sql) + sizeof(SYNC_FILTER) + 8;

		if (npooled_stmts >= MAX_POOLED_STMTS)
			abort();
		st = &pooled_stmts[npooled_stmts++];
		st->name = name;
		st->sync = sync && opt_sync_commit != NULL;
		st->sql = xmalloc(len);
		if (st->sync)
			snprintf(st->sql, len, "%s" SYNC_FILTER, sql, nparams + 1);
		else
			snprintf(st->sql, len, "%s", sql);
		return true;
	}
	res = PQprepare(conn, name, sql, nparams, NULL);
	ok = PQresultStatus(res) == PGRES_COMMAND_OK;

	if (!ok)
		fprintf(stderr, "cqrs-load: could not prepare \"%s\": %s", name,
				PQerrorMessage(conn));
	PQclear(res);
	return ok;
}

static bool
pg_prepare(PGconn *conn, const char *name, const char *sql, int nparams)
{
	return pg_prepare_as(conn, name, sql, nparams, false);
}

/* Run a prepared statement; true on success (result in *out if wanted). */
static bool
pg_exec(PGconn *conn, const char *name, int n, const char *const *params,
		PGresult **out)
{
	PGresult   *res = NULL;
	ExecStatusType st;

	if (opt_pooled)
	{
		for (int i = 0; i < npooled_stmts; i++)
		{
			const PooledStmt *ps = &pooled_stmts[i];
			const char *all[8];

			if (strcmp(ps->name, name) != 0)
				continue;
			if (n >= (int) (sizeof(all) / sizeof(all[0])))
				abort();
			memcpy(all, params, n * sizeof(*params));
			if (ps->sync)
				all[n++] = opt_sync_commit;
			res = PQexecParams(conn, ps->sql, n, NULL, all, NULL, NULL, 0);
			break;
		}
		if (res == NULL)
			abort();
	}
	else
		res = PQexecPrepared(conn, name, n, params, NULL, NULL, 0);
	st = PQresultStatus(res);

	if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK)
	{
		count_pg_error(conn, res);
		PQclear(res);
		return false;
	}
	if (out)
		*out = res;
	else
		PQclear(res);
	return true;
}

/* ---------------------------------------------------------------- writers */

typedef struct Writer
{
	int			id;
	unsigned int seed;
	uint64_t	created;
	/* orders created and not yet shipped or cancelled, FIFO */
	char	  (*open)[ID_LEN];
	size_t		open_head;
	size_t		open_tail;
	size_t		open_cap;
} Writer;

static void *
writer_main(void *arg)
{
	Writer	   *w = arg;
	PGconn	   *conn = pg_connect(false);
	double		interval = opt_write_rate > 0 ? opt_writers / opt_write_rate : 0;
	double		next = now_s();

	if (PQstatus(conn) == CONNECTION_OK && opt_sync_commit && !opt_pooled)
	{
		const char *params[1] = {opt_sync_commit};

		PQclear(PQexecParams(conn, "SELECT pg_catalog.set_config('synchronous_commit', $1, false)",
							 1, NULL, params, NULL, NULL, 0));
	}
	if (PQstatus(conn) != CONNECTION_OK ||
		!pg_prepare_as(conn, "create", "SELECT 1 FROM cqrs.submit_order($1, $2, $3)", 3, true) ||
		!pg_prepare_as(conn, "ship", "SELECT 1 FROM cqrs.ship_order($1)", 1, true) ||
		!pg_prepare_as(conn, "cancel", "SELECT 1 FROM cqrs.cancel_order($1, 'changed my mind')", 1, true))
	{
		count_error("connection");
		PQfinish(conn);
		return NULL;
	}
	w->open_cap = 1 << 16;
	w->open = xmalloc(w->open_cap * ID_LEN);

	while (!atomic_load(&stopping) && now_s() < opt_duration)
	{
		size_t		nopen = w->open_tail - w->open_head;
		int			r = rand_r(&w->seed) % 100;
		bool		ok;

		if (interval > 0)
		{
			next += interval;
			sleep_s(next - now_s());
		}
		if (nopen == 0 || r < 60 || nopen >= w->open_cap - 1)
		{
			char		id[ID_LEN];
			char		user[32];
			char		amount[32];
			const char *params[3] = {id, user, amount};

			snprintf(id, sizeof(id), "L%s-%d-%llu", run_id, w->id,
					 (unsigned long long) w->created);
			snprintf(user, sizeof(user), "user-%d", rand_r(&w->seed) % 1000);
			snprintf(amount, sizeof(amount), "%d.%02d",
					 1 + rand_r(&w->seed) % 500, rand_r(&w->seed) % 100);
			ok = pg_exec(conn, "create", 3, params, NULL);
			if (ok)
			{
				uint64_t	slot = atomic_fetch_add(&ring_count, 1);

				w->created++;
				memcpy(ring[slot % RING_SIZE], id, ID_LEN);
				memcpy(w->open[w->open_tail % w->open_cap], id, ID_LEN);
				w->open_tail++;
			}
		}
		else
		{
			const char *params[1] = {w->open[w->open_head % w->open_cap]};

			ok = pg_exec(conn, r < 85 ? "ship" : "cancel", 1, params, NULL);
			w->open_head++;
		}
		if (ok)
			atomic_fetch_add(&sec_writes[current_second()], 1);
	}
	PQfinish(conn);
	free(w->open);
	return NULL;
}

/* ------------------------------------------------------------ singleflight */

/*
 * Concurrent misses for one key wait for the first one's query: the first
 * caller of sf_begin() for a key leads (returns true) and calls sf_end();
 * the others block in sf_begin() until then and return false.
 */
typedef struct SfEntry
{
	char		key[ID_LEN];
	struct SfEntry *next;
	pthread_cond_t done_cv;
	bool		done;
	int			refs;
} SfEntry;

static struct
{
	pthread_mutex_t lock;
	SfEntry    *head;
}			sf[SF_BUCKETS];

static unsigned
sf_hash(const char *s)
{
	unsigned	h = 2166136261u;

	for (; *s; s++)
		h = (h ^ (unsigned char) *s) * 16777619u;
	return h % SF_BUCKETS;
}

static bool
sf_begin(const char *key, SfEntry **entry)
{
	unsigned	b = sf_hash(key);
	SfEntry    *e;

	pthread_mutex_lock(&sf[b].lock);
	for (e = sf[b].head; e != NULL; e = e->next)
	{
		if (strcmp(e->key, key) == 0)
		{
			e->refs++;
			while (!e->done)
				pthread_cond_wait(&e->done_cv, &sf[b].lock);
			if (--e->refs == 0)
			{
				pthread_cond_destroy(&e->done_cv);
				free(e);
			}
			pthread_mutex_unlock(&sf[b].lock);
			atomic_fetch_add(&collapsed, 1);
			return false;
		}
	}
	e = xmalloc(sizeof(SfEntry));
	snprintf(e->key, sizeof(e->key), "%s", key);
	pthread_cond_init(&e->done_cv, NULL);
	e->done = false;
	e->refs = 1;
	e->next = sf[b].head;
	sf[b].head = e;
	pthread_mutex_unlock(&sf[b].lock);
	*entry = e;
	return true;
}

static void
sf_end(SfEntry *e)
{
	unsigned	b = sf_hash(e->key);
	SfEntry   **p;

	pthread_mutex_lock(&sf[b].lock);
	for (p = &sf[b].head; *p != NULL; p = &(*p)->next)
	{
		if (*p == e)
		{
			*p = e->next;
			break;
		}
	}
	e->done = true;
	pthread_cond_broadcast(&e->done_cv);
	if (--e->refs == 0)
	{
		pthread_cond_destroy(&e->done_cv);
		free(e);
	}
	pthread_mutex_unlock(&sf[b].lock);
}

/* ---------------------------------------------------------------- readers */

typedef struct Reader
{
	int			id;
	unsigned int seed;
	PGconn	   *conn;
#ifdef USE_HIREDIS
	RcConn	   *redis;			/* NULL while Redis is down */
#endif
	double		redis_retry_at;
	Samples    *samples;
} Reader;

#ifdef USE_HIREDIS
static void
redis_free(RcConn *c)
{
	rc_close(c);
	free(c);
}

/*
 * Open Redis (one server or a cluster, routed by redis_cluster.c) and
 * check that it answers; NULL on failure, or exit if fatal.
 */
static RcConn *
redis_open(bool fatal)
{
	RcConn	   *c = calloc(1, sizeof(RcConn));
	RcCommand	ping = {1, (const char *[]) {"PING"}, NULL, NULL};

	if (c == NULL)
	{
		fprintf(stderr, "cqrs-load: out of memory\n");
		exit(1);
	}
	c->target = redis_target;
	c->timeout.tv_usec = 200 * 1000;
	if (rc_open(c) && rc_run(c, &ping, 1) &&
		ping.reply->type != REDIS_REPLY_ERROR)
	{
		freeReplyObject(ping.reply);
		return c;
	}
	if (fatal)
	{
		fprintf(stderr, "cqrs-load: could not connect to Redis: %s\n",
				ping.reply ? ping.reply->str : c->err);
		exit(1);
	}
	if (ping.reply)
		freeReplyObject(ping.reply);
	redis_free(c);
	return NULL;
}

/* One command on the key's node; the reply, or NULL. */
static redisReply *
redis_key_command(RcConn *c, int argc, const char **argv, const char *key)
{
	RcCommand	cmd = {argc, argv, key, NULL};

	if (!rc_run(c, &cmd, 1))
	{
		if (cmd.reply)
			freeReplyObject(cmd.reply);
		return NULL;
	}
	return cmd.reply;
}

/* Redis failed: go to the database, retry in a second. */
static void
reader_redis_down(Reader *r)
{
	count_error("redis");
	if (r->redis)
		redis_free(r->redis);
	r->redis = NULL;
	r->redis_retry_at = now_s() + 1;
}
#endif

/* The order's row as JSON from the read model, or NULL; malloc'd. */
static char *
reader_query(Reader *r, const char *id, bool *failed)
{
	const char *params[1] = {id};
	PGresult   *res;
	char	   *json = NULL;

	*failed = false;
	if (!pg_exec(r->conn, "read", 1, params, &res))
	{
		*failed = true;
		return NULL;
	}
	if (PQntuples(res) == 1)
		json = strdup(PQgetvalue(res, 0, 0));
	PQclear(res);
	return json;
}

/* One read; returns false when it failed. */
static bool
reader_read(Reader *r, const char *id)
{
	bool		failed;
	char	   *json;
	int			s = current_second();

#ifdef USE_HIREDIS
	if (opt_read_mode != READ_DB && r->redis == NULL && now_s() >= r->redis_retry_at)
	{
		r->redis = redis_open(false);
		if (r->redis == NULL)
			r->redis_retry_at = now_s() + 1;
	}
	if (opt_read_mode != READ_DB && r->redis != NULL)
	{
		char		key[ID_LEN + 8];
		redisReply *reply;
		SfEntry    *e;

		snprintf(key, sizeof(key), "order:%s", id);
		reply = redis_key_command(r->redis, 2, (const char *[]) {"GET", key}, key);

		if (reply == NULL || reply->type == REDIS_REPLY_ERROR)
		{
			if (reply)
				freeReplyObject(reply);
			reader_redis_down(r);
			if (opt_read_mode == READ_REDIS)
				return false;
		}
		else
		{
			bool		hit = reply->type == REDIS_REPLY_STRING;

			freeReplyObject(reply);
			if (hit)
			{
				atomic_fetch_add(&sec_hits[s], 1);
				return true;
			}
			atomic_fetch_add(&sec_misses[s], 1);
			if (opt_read_mode == READ_REDIS)
				return true;

			/* a miss: one query per key, then fill if absent */
			if (!sf_begin(id, &e))
				return true;	/* another thread read and filled it */
			json = reader_query(r, id, &failed);
			if (!failed && r->redis != NULL)
			{
				int			ttl = json ? opt_ttl - opt_ttl_jitter +
					rand_r(&r->seed) % (2 * opt_ttl_jitter + 1) : opt_miss_ttl;
				char		ttl_text[16];

				snprintf(ttl_text, sizeof(ttl_text), "%d", ttl);
				reply = redis_key_command(r->redis, 6, (const char *[]) {
					"SET", key, json ? json : "-", "EX", ttl_text, "NX"}, key);
				if (reply == NULL || reply->type == REDIS_REPLY_ERROR)
					reader_redis_down(r);
				if (reply)
					freeReplyObject(reply);
			}
			sf_end(e);
			free(json);
			return !failed;
		}
	}
#endif
	json = reader_query(r, id, &failed);
	free(json);
	return !failed;
}

static void *
reader_main(void *arg)
{
	Reader	   *r = arg;
	double		interval = opt_read_rate > 0 ? opt_readers / opt_read_rate : 0;
	double		next = now_s();

	r->conn = pg_connect(false);
	if (PQstatus(r->conn) != CONNECTION_OK ||
		!pg_prepare(r->conn, "read",
					"SELECT json_build_object('order_id', order_id, 'user_id', user_id,"
					" 'total_amount', total_amount, 'status', status, 'version', version,"
					" 'updated_at', updated_at AT TIME ZONE 'UTC')::text"
					" FROM cqrs.read_model WHERE order_id = $1", 1))
	{
		count_error("connection");
		return NULL;
	}

	while (!atomic_load(&stopping) && now_s() < opt_duration)
	{
		uint64_t	n = atomic_load(&ring_count);
		char		id[ID_LEN];
		double		t0;

		if (interval > 0)
		{
			next += interval;
			sleep_s(next - now_s());
		}
		if (n == 0)
		{
			sleep_s(0.001);
			continue;
		}
		/*
		 * Count back from the newest slot, leaving out the newest few: a
		 * writer may still be filling them.
		 */
		{
			uint64_t	avail = n < RING_SIZE ? n : RING_SIZE;
			uint64_t	skip = (uint64_t) opt_writers * 2;
			uint64_t	back = avail > skip ?
				skip + (uint64_t) rand_r(&r->seed) % (avail - skip) :
				(uint64_t) rand_r(&r->seed) % avail;

			memcpy(id, ring[(n - 1 - back) % RING_SIZE], ID_LEN);
		}
		t0 = now_s();
		if (reader_read(r, id))
		{
			samples_add(r->samples, (now_s() - t0) * 1e6);
			atomic_fetch_add(&sec_reads[current_second()], 1);
		}
	}
	PQfinish(r->conn);
#ifdef USE_HIREDIS
	if (r->redis)
		redis_free(r->redis);
#endif
	return NULL;
}

/* ------------------------------------------------------------------ probe */

static void *
probe_main(void *arg)
{
	PGconn	   *conn = pg_connect(false);
	uint64_t	n = 0;

	if (PQstatus(conn) != CONNECTION_OK ||
		!pg_prepare(conn, "probe", "SELECT command_id FROM cqrs.submit_order($1, 'probe', 1)", 1) ||
		!pg_prepare(conn, "wait", "SELECT cqrs.wait_for($1, '10 s')", 1))
	{
		count_error("connection");
		PQfinish(conn);
		return NULL;
	}
	while (!atomic_load(&stopping) && now_s() < opt_duration)
	{
		char		id[ID_LEN];
		const char *params[1] = {id};
		PGresult   *res;
		double		committed;

		snprintf(id, sizeof(id), "P%s-%llu", run_id, (unsigned long long) n++);
		if (!pg_exec(conn, "probe", 1, params, &res))
			continue;
		committed = now_s();
		{
			char		command_id[64];
			const char *wparams[1] = {command_id};
			PGresult   *wres;

			snprintf(command_id, sizeof(command_id), "%s", PQgetvalue(res, 0, 0));
			PQclear(res);
			if (pg_exec(conn, "wait", 1, wparams, &wres))
			{
				if (strcmp(PQgetvalue(wres, 0, 0), "t") == 0)
					samples_add(&lag_samples, (now_s() - committed) * 1e6);
				else
					count_error("lag probe timed out");
				PQclear(wres);
			}
		}
		sleep_s(0.05);
	}
	PQfinish(conn);
	return NULL;
}

/* ---------------------------------------------------------------- summary */

static int
cmp_float(const void *a, const void *b)
{
	float		x = *(const float *) a;
	float		y = *(const float *) b;

	return (x > y) - (x < y);
}

/* Percentile q (0-1) of sorted values, or NAN. */
static double
percentile(const float *v, size_t n, double q)
{
	size_t		i;

	if (n == 0)
		return NAN;
	i = (size_t) ceil(q * n);
	return v[i == 0 ? 0 : i - 1];
}

/* All samples of a set of Samples, sorted; optionally only second s. */
static float *
gather(Samples *sets, int nsets, int s, size_t *n)
{
	size_t		total = 0;
	float	   *all;

	for (int i = 0; i < nsets; i++)
		total += sets[i].n;
	all = xmalloc((total + 1) * sizeof(float));
	*n = 0;
	for (int i = 0; i < nsets; i++)
		for (size_t j = 0; j < sets[i].n; j++)
			if (s < 0 || sets[i].sec[j] == (uint32_t) s)
				all[(*n)++] = sets[i].us[j];
	qsort(all, *n, sizeof(float), cmp_float);
	return all;
}

static uint64_t
sum(atomic_uint_fast64_t *a, int upto)
{
	uint64_t	t = 0;

	for (int i = 0; i <= upto && i <= MAX_SECONDS; i++)
		t += atomic_load(&a[i]);
	return t;
}

static void
report(double elapsed)
{
	int			last = (int) elapsed;
	uint64_t	writes = sum(sec_writes, MAX_SECONDS);
	uint64_t	reads = sum(sec_reads, MAX_SECONDS);
	uint64_t	hits = sum(sec_hits, MAX_SECONDS);
	uint64_t	misses = sum(sec_misses, MAX_SECONDS);
	size_t		nr,
				nl;
	float	   *r = gather(read_samples, opt_readers, -1, &nr);
	float	   *l = gather(&lag_samples, 1, -1, &nl);
	double		hit_ratio = hits + misses ? (double) hits / (hits + misses) : NAN;
	FILE	   *f;

	printf("\ncqrs-load summary: %.1f s, %d writers, %d readers (%s%s)\n",
		   elapsed, opt_writers, opt_readers, read_mode_names[opt_read_mode],
		   opt_redis ? "" : ", no Redis");
	printf("  writes    %10llu  %10.0f/s\n", (unsigned long long) writes, writes / elapsed);
	printf("  reads     %10llu  %10.0f/s\n", (unsigned long long) reads, reads / elapsed);
	printf("  read latency ms   p50 %.3f  p95 %.3f  p99 %.3f\n",
		   percentile(r, nr, 0.50) / 1e3, percentile(r, nr, 0.95) / 1e3,
		   percentile(r, nr, 0.99) / 1e3);
	printf("  cache hit ratio   %.3f  (%llu hits, %llu misses, %llu misses collapsed)\n",
		   hit_ratio, (unsigned long long) hits, (unsigned long long) misses,
		   (unsigned long long) atomic_load(&collapsed));
	printf("  lag ms (commit to read model, %zu probes)   p50 %.1f  p99 %.1f  max %.1f\n",
		   nl, percentile(l, nl, 0.50) / 1e3, percentile(l, nl, 0.99) / 1e3,
		   nl ? l[nl - 1] / 1e3 : NAN);
	printf("  errors:");
	if (nerrors == 0)
		printf(" none");
	for (int i = 0; i < nerrors; i++)
		printf(" %s=%llu", errors[i].kind, (unsigned long long) errors[i].count);
	printf("\n");

	if (opt_json && (f = fopen(opt_json, "w")) != NULL)
	{
		char		ratio[32] = "null";

		if (!isnan(hit_ratio))
			snprintf(ratio, sizeof(ratio), "%.4f", hit_ratio);
		fprintf(f, "{\"seconds\": %.3f, \"writers\": %d, \"readers\": %d, \"read_mode\": \"%s\",\n"
				" \"writes\": %llu, \"writes_per_s\": %.1f, \"reads\": %llu, \"reads_per_s\": %.1f,\n"
				" \"read_p50_ms\": %.4f, \"read_p95_ms\": %.4f, \"read_p99_ms\": %.4f,\n"
				" \"cache_hit_ratio\": %s, \"misses_collapsed\": %llu,\n"
				" \"lag_probes\": %zu, \"lag_p50_ms\": %.2f, \"lag_p99_ms\": %.2f, \"lag_max_ms\": %.2f,\n"
				" \"errors\": {",
				elapsed, opt_writers, opt_readers, read_mode_names[opt_read_mode],
				(unsigned long long) writes, writes / elapsed,
				(unsigned long long) reads, reads / elapsed,
				nr ? percentile(r, nr, 0.50) / 1e3 : 0, nr ? percentile(r, nr, 0.95) / 1e3 : 0,
				nr ? percentile(r, nr, 0.99) / 1e3 : 0,
				ratio, (unsigned long long) atomic_load(&collapsed),
				nl, nl ? percentile(l, nl, 0.50) / 1e3 : 0,
				nl ? percentile(l, nl, 0.99) / 1e3 : 0, nl ? l[nl - 1] / 1e3 : 0);
		for (int i = 0; i < nerrors; i++)
			fprintf(f, "%s\"%s\": %llu", i ? ", " : "", errors[i].kind,
					(unsigned long long) errors[i].count);
		fprintf(f, "}}\n");
		fclose(f);
	}

	if (opt_series && (f = fopen(opt_series, "w")) != NULL)
	{
		fprintf(f, "second,writes,reads,read_p50_ms,read_p95_ms,read_p99_ms,lag_max_ms\n");
		for (int s = 0; s < last && s < MAX_SECONDS; s++)
		{
			size_t		n,
						m;
			float	   *rs = gather(read_samples, opt_readers, s, &n);
			float	   *ls = gather(&lag_samples, 1, s, &m);

			fprintf(f, "%d,%llu,%llu,%.4f,%.4f,%.4f,%.2f\n", s + 1,
					(unsigned long long) atomic_load(&sec_writes[s]),
					(unsigned long long) atomic_load(&sec_reads[s]),
					n ? percentile(rs, n, 0.50) / 1e3 : NAN,
					n ? percentile(rs, n, 0.95) / 1e3 : NAN,
					n ? percentile(rs, n, 0.99) / 1e3 : NAN,
					m ? ls[m - 1] / 1e3 : NAN);
			free(rs);
			free(ls);
		}
		fclose(f);
	}
	free(r);
	free(l);
}

/* ------------------------------------------------------------------- main */

static void
on_sigint(int sig)
{
	atomic_store(&stopping, true);
	signal(sig, SIG_DFL);		/* a second Ctrl-C ends at once */
}

static void
usage(FILE *f)
{
	fprintf(f,
			"cqrs-load: load generator for the cqrs extension\n\n"
			"Usage: cqrs-load [OPTION]...\n\n"
			"  -d, --dbname=CONNINFO     libpq connection string (default \"dbname=postgres\";\n"
			"                            run as root, the role is postgres unless PGUSER or user= names one)\n"
			"  -r, --redis=URL           redis://[[user]:password@]host[:port][,host[:port]...][/db]\n"
			"                            (several hosts: a Redis Cluster); none: read the database only\n"
			"  -w, --writers=N           writer threads (default 4; 0: no writes)\n"
			"  -W, --write-rate=R        writes per second, all writers (default 0: flat out)\n"
			"  -c, --readers=N           reader threads (default 4; 0: no reads)\n"
			"  -R, --read-rate=R         reads per second, all readers (default 0: flat out)\n"
			"  -m, --read-mode=MODE      cache-aside (default with --redis), redis, db (default without)\n"
			"  -T, --duration=SECONDS    how long to run (default 10)\n"
			"  -p, --preload=N           orders to create before the run, for readers to read (default 1000)\n"
			"      --ttl=S, --ttl-jitter=S, --miss-ttl=S   cache fills: TTL 300 +/- 30 s, misses 5 s\n"
			"  -s, --synchronous-commit=on|off   for the writers (default: the server's)\n"
			"      --pooled              for transaction pooling (PgBouncer): no prepared statements,\n"
			"                            no session settings\n"
			"      --no-probe            do not measure commit-to-read-model lag\n"
			"      --json=FILE           write the summary as JSON\n"
			"      --series=FILE         write one CSV line per second (rates, read latency, lag)\n"
			"  -q, --quiet               no progress lines\n"
			"  -h, --help                this help\n\n"
			"Every second a progress line; at the end, or at Ctrl-C, a summary.\n");
}

static double
parse_number(const char *opt, const char *v, double min, double max)
{
	char	   *end;
	double		d;

	errno = 0;
	d = strtod(v, &end);
	if (errno != 0 || end == v || *end != '\0' || d < min || d > max || isnan(d))
	{
		fprintf(stderr, "cqrs-load: invalid value \"%s\" for --%s: a number from %g to %g\n",
				v, opt, min, max);
		exit(2);
	}
	return d;
}

static void
parse_redis_url(const char *url)
{
	const char *problem;

	if (rc_parse_url(url, &redis_target, &problem))
		return;
	fprintf(stderr, "cqrs-load: invalid --redis URL: %s The form is redis://[[user]:password@]host[:port][,host[:port]...][/db]\n",
			problem);
	exit(2);
}

int
main(int argc, char **argv)
{
	static const struct option long_options[] = {
		{"dbname", required_argument, NULL, 'd'},
		{"redis", required_argument, NULL, 'r'},
		{"writers", required_argument, NULL, 'w'},
		{"write-rate", required_argument, NULL, 'W'},
		{"readers", required_argument, NULL, 'c'},
		{"read-rate", required_argument, NULL, 'R'},
		{"read-mode", required_argument, NULL, 'm'},
		{"duration", required_argument, NULL, 'T'},
		{"preload", required_argument, NULL, 'p'},
		{"ttl", required_argument, NULL, 1},
		{"ttl-jitter", required_argument, NULL, 2},
		{"miss-ttl", required_argument, NULL, 3},
		{"no-probe", no_argument, NULL, 4},
		{"json", required_argument, NULL, 5},
		{"series", required_argument, NULL, 6},
		{"pooled", no_argument, NULL, 7},
		{"synchronous-commit", required_argument, NULL, 's'},
		{"quiet", no_argument, NULL, 'q'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0}
	};
	int			c;
	pthread_t  *threads;
	Writer	   *writers;
	Reader	   *readers;
	pthread_t	probe;
	int			nthreads = 0;
	PGconn	   *conn;
	PGresult   *res;
	int			shown = 0;
	double		elapsed;

	while ((c = getopt_long(argc, argv, "d:r:w:W:c:R:m:T:p:s:qh", long_options, NULL)) != -1)
	{
		switch (c)
		{
			case 'd':
				opt_db = optarg;
				break;
			case 'r':
				opt_redis = optarg;
				parse_redis_url(optarg);
				break;
			case 'w':
				opt_writers = (int) parse_number("writers", optarg, 0, 1000);
				break;
			case 'W':
				opt_write_rate = parse_number("write-rate", optarg, 0, 1e7);
				break;
			case 'c':
				opt_readers = (int) parse_number("readers", optarg, 0, 1000);
				break;
			case 'R':
				opt_read_rate = parse_number("read-rate", optarg, 0, 1e7);
				break;
			case 'm':
				for (c = 0; c < 3; c++)
					if (strcmp(optarg, read_mode_names[c]) == 0)
						break;
				if (c == 3)
				{
					fprintf(stderr, "cqrs-load: invalid --read-mode \"%s\": cache-aside, redis or db\n", optarg);
					exit(2);
				}
				opt_read_mode = (ReadMode) c;
				opt_read_mode_set = true;
				break;
			case 'T':
				opt_duration = (int) parse_number("duration", optarg, 1, MAX_SECONDS - 1);
				break;
			case 'p':
				opt_preload = (int) parse_number("preload", optarg, 0, 1e7);
				break;
			case 1:
				opt_ttl = (int) parse_number("ttl", optarg, 1, 1e7);
				break;
			case 2:
				opt_ttl_jitter = (int) parse_number("ttl-jitter", optarg, 0, 1e7);
				break;
			case 3:
				opt_miss_ttl = (int) parse_number("miss-ttl", optarg, 1, 1e7);
				break;
			case 4:
				opt_probe = false;
				break;
			case 5:
				opt_json = optarg;
				break;
			case 6:
				opt_series = optarg;
				break;
			case 7:
				opt_pooled = true;
				break;
			case 's':
				if (strcmp(optarg, "on") != 0 && strcmp(optarg, "off") != 0)
				{
					fprintf(stderr, "cqrs-load: invalid --synchronous-commit \"%s\": on or off\n", optarg);
					exit(2);
				}
				opt_sync_commit = optarg;
				break;
			case 'q':
				opt_quiet = true;
				break;
			case 'h':
				usage(stdout);
				return 0;
			default:
				fprintf(stderr, "Try \"cqrs-load --help\" for more information.\n");
				return 2;
		}
	}
	if (optind < argc)
	{
		fprintf(stderr, "cqrs-load: unexpected argument \"%s\"\nTry \"cqrs-load --help\" for more information.\n",
				argv[optind]);
		return 2;
	}
	if (opt_ttl_jitter >= opt_ttl)
	{
		fprintf(stderr, "cqrs-load: --ttl-jitter must be less than --ttl\n");
		return 2;
	}
	if (!opt_redis && !opt_read_mode_set)
		opt_read_mode = READ_DB;
	if (opt_read_mode != READ_DB && !opt_redis)
	{
		fprintf(stderr, "cqrs-load: --read-mode %s needs --redis\n", read_mode_names[opt_read_mode]);
		return 2;
	}
#ifndef USE_HIREDIS
	if (opt_redis)
	{
		fprintf(stderr, "cqrs-load: built without hiredis: --redis is not available\n");
		return 2;
	}
#endif

	/* Check both servers before starting anything. */
	conn = pg_connect(true);
	res = PQexec(conn, "SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'cqrs'");
	if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1)
	{
		fprintf(stderr, "cqrs-load: the database has no cqrs extension (CREATE EXTENSION cqrs)\n");
		return 1;
	}
	PQclear(res);
#ifdef USE_HIREDIS
	if (opt_redis)
		redis_free(redis_open(true));
#endif

	clock_gettime(CLOCK_MONOTONIC, &started);
	snprintf(run_id, sizeof(run_id), "%lx", (unsigned long) (time(NULL) ^ getpid()) & 0xffffff);
	ring = xmalloc((size_t) RING_SIZE * ID_LEN);
	for (int i = 0; i < SF_BUCKETS; i++)
		pthread_mutex_init(&sf[i].lock, NULL);

	/* Orders to read from the first second on. */
	if (opt_preload > 0 && opt_readers > 0)
	{
		char		sql[512];

		snprintf(sql, sizeof(sql),
				 "SELECT 'L%s-pre-' || g FROM generate_series(1, %d) g,"
				 " LATERAL cqrs.submit_order('L%s-pre-' || g, 'user-' || g %% 1000, 10)",
				 run_id, opt_preload, run_id);
		res = PQexec(conn, sql);
		if (PQresultStatus(res) != PGRES_TUPLES_OK)
		{
			fprintf(stderr, "cqrs-load: could not preload orders: %s", PQerrorMessage(conn));
			return 1;
		}
		for (int i = 0; i < PQntuples(res) && i < RING_SIZE; i++)
			snprintf(ring[i], ID_LEN, "%s", PQgetvalue(res, i, 0));
		atomic_store(&ring_count, (uint64_t) PQntuples(res));
		PQclear(res);
		res = PQexec(conn, "SELECT cqrs.wait_for_lsn(pg_current_wal_lsn(), '30 s')");
		PQclear(res);
	}
	PQfinish(conn);

	clock_gettime(CLOCK_MONOTONIC, &started);
	signal(SIGINT, on_sigint);
	signal(SIGTERM, on_sigint);

	threads = xmalloc(sizeof(pthread_t) * (opt_writers + opt_readers + 1));
	writers = calloc(opt_writers + 1, sizeof(Writer));
	readers = calloc(opt_readers + 1, sizeof(Reader));
	read_samples = calloc(opt_readers + 1, sizeof(Samples));
	for (int i = 0; i < opt_writers; i++)
	{
		writers[i].id = i;
		writers[i].seed = (unsigned) (i * 7919 + getpid());
		pthread_create(&threads[nthreads++], NULL, writer_main, &writers[i]);
	}
	for (int i = 0; i < opt_readers; i++)
	{
		readers[i].id = i;
		readers[i].seed = (unsigned) (i * 104729 + getpid());
		readers[i].samples = &read_samples[i];
		pthread_create(&threads[nthreads++], NULL, reader_main, &readers[i]);
	}
	if (opt_probe && opt_writers > 0)
		pthread_create(&probe, NULL, probe_main, NULL);

	while (!atomic_load(&stopping) && now_s() < opt_duration)
	{
		sleep_s(0.05);
		if (!opt_quiet && (int) now_s() > shown)
		{
			int			s = shown;
			uint64_t	h = atomic_load(&sec_hits[s]);
			uint64_t	m = atomic_load(&sec_misses[s]);

			shown++;
			printf("%4ds  writes/s %7llu  reads/s %7llu  hit %5.3f  errors %llu\n", shown,
				   (unsigned long long) atomic_load(&sec_writes[s]),
				   (unsigned long long) atomic_load(&sec_reads[s]),
				   h + m ? (double) h / (h + m) : NAN,
				   (unsigned long long) atomic_load(&sec_errors[s]));
			fflush(stdout);
		}
	}
	elapsed = now_s();
	if (elapsed > opt_duration)
		elapsed = opt_duration;
	atomic_store(&stopping, true);
	for (int i = 0; i < nthreads; i++)
		pthread_join(threads[i], NULL);
	if (opt_probe && opt_writers > 0)
		pthread_join(probe, NULL);

	report(elapsed);
	return 0;
}
