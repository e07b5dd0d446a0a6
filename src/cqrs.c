/*-------------------------------------------------------------------------
 *
 * cqrs.c
 *		Module entry point of the cqrs extension: settings, shared memory
 *		hooks and registration of the projector workers.
 *
 * The library is loaded three ways: preloaded by the postmaster through
 * shared_preload_libraries, by a backend calling one of its SQL functions,
 * and by a decoding backend as the logical decoding output plugin "cqrs".
 * Only the first may register background workers or request shared memory,
 * so _PG_init defines the settings and returns for the other two.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "utils/guc.h"

#include "cqrs.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

char	   *cqrs_database = NULL;
char	   *cqrs_slot_name = NULL;
bool		cqrs_slot_failover = true;
int			cqrs_workers = 1;
bool		cqrs_enabled = true;
int			cqrs_batch_size_min = 64;
int			cqrs_batch_size_max = 10000;
int			cqrs_projector_work_mem = 65536;
int			cqrs_poll_interval = 1000;
int			cqrs_batch_delay = 5;
int			cqrs_backoff_base = 100;
int			cqrs_backoff_max = 5000;
int			cqrs_max_lag = 0;
char	   *cqrs_traceparent = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/*
 * shmem_request_hook: reserve the projector's shared state.
 */
static void
cqrs_shmem_request_hook(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	cqrs_shmem_request();
}

/*
 * shmem_startup_hook: attach to (or create) the projector's shared state.
 */
static void
cqrs_shmem_startup_hook(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	cqrs_shmem_startup();
}

/*
 * check_hook of cqrs.traceparent: empty, or a W3C Trace Context
 * traceparent, version-traceid-parentid-flags in lowercase hex, with a
 * known version (not ff) and ids that are not all zeros.
 */
static bool
cqrs_check_traceparent(char **newval, void **extra, GucSource source)
{
	const char *v = *newval;
	static const int field_len[4] = {2, 32, 16, 2};
	const char *p = v;

	if (v == NULL || v[0] == '\0')
		return true;
	for (int f = 0; f < 4; f++)
	{
		bool		zero = true;

		for (int i = 0; i < field_len[f]; i++, p++)
		{
			if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f')))
				goto bad;
			if (*p != '0')
				zero = false;
		}
		if ((f == 1 || f == 2) && zero)
		{
			GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
			GUC_check_errdetail("The %s of a traceparent must not be all zeros.",
								f == 1 ? "trace-id" : "parent-id");
			return false;
		}
		if (f < 3 && *p++ != '-')
			goto bad;
	}
	if (strncmp(v, "ff", 2) == 0 || (strncmp(v, "00", 2) == 0 && *p != '\0'))
		goto bad;
	/* later versions may add fields: "-" and more lowercase hex, bounded */
	if (*p != '\0')
	{
		if (*p != '-' || strlen(v) > 256)
			goto bad;
		for (; *p; p++)
			if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f') || *p == '-'))
				goto bad;
	}
	return true;

bad:
	GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
	GUC_check_errdetail("A traceparent is version-traceid-parentid-flags in lowercase hex, "
						"such as 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.");
	return false;
}

/*
 * Define the settings that make sense in any process loading the library.
 */
static void
cqrs_define_settings(void)
{
	DefineCustomStringVariable("cqrs.database",
							   "Database the cqrs projector serves.",
							   NULL,
							   &cqrs_database,
							   "postgres",
							   PGC_POSTMASTER, 0,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("cqrs.slot_name",
							   "Logical replication slot the cqrs projector consumes.",
							   NULL,
							   &cqrs_slot_name,
							   "cqrs",
							   PGC_POSTMASTER, 0,
							   NULL, NULL, NULL);
	DefineCustomBoolVariable("cqrs.slot_failover",
							 "Makes the projector's slot a failover slot, synchronized to standbys (PostgreSQL 17 and later).",
							 "With sync_replication_slots on a standby, a promoted standby continues from the synchronized slot instead of folding the whole command log.  Ignored before PostgreSQL 17.",
							 &cqrs_slot_failover,
							 true,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("cqrs.workers",
							"Number of cqrs projector processes (one leads, the others stand by).",
							NULL,
							&cqrs_workers,
							1, 0, 8,
							PGC_POSTMASTER, 0,
							NULL, NULL, NULL);
	DefineCustomBoolVariable("cqrs.enabled",
							 "Whether the cqrs projector applies commands to the read model.",
							 "Turning it off stops projection and keeps the position; "
							 "turning it on again resumes where it stopped.",
							 &cqrs_enabled,
							 true,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("cqrs.batch_size_min",
							"Smallest number of commands the projector aims to apply per transaction.",
							NULL,
							&cqrs_batch_size_min,
							64, 1, 1000000,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("cqrs.batch_size_max",
							"Largest number of commands the projector applies per transaction.",
							NULL,
							&cqrs_batch_size_max,
							10000, 1, 1000000,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("cqrs.projector_work_mem",
							"Memory the projector keeps decoded commands in before it spills them to a temporary file.",
							"A transaction with more commands than fit is read back and applied in parts of at most cqrs.batch_size_max commands.",
							&cqrs_projector_work_mem,
							65536, 64, MAX_KILOBYTES,
							PGC_SIGHUP, GUC_UNIT_KB,
							NULL, NULL, NULL);
	DefineCustomIntVariable("cqrs.batch_delay",
							"How long the projector lets commands gather between two batches while they keep coming.",
							"After a batch of more than one command the projector waits this long before reading the next, "
							"so that under load it applies fewer, larger batches; a lone command is applied at once. "
							"0 starts the next batch at once.",
							&cqrs_batch_delay,
							5, 0, 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("cqrs.poll_interval",
							"How long the idle projector sleeps when no commit wakes it.",
							NULL,
							&cqrs_poll_interval,
							1000, 10, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("cqrs.backoff_base",
							"First delay before the projector retries a failed batch.",
							NULL,
							&cqrs_backoff_base,
							100, 1, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("cqrs.backoff_max",
							"Longest delay between retries of a failed batch.",
							NULL,
							&cqrs_backoff_max,
							5000, 1, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomStringVariable("cqrs.traceparent",
							   "W3C trace context stored with each command this session submits.",
							   "It appears in the command log, in the projector's log lines about the "
							   "command and in cqrs.dead_letter. Empty: none.",
							   &cqrs_traceparent,
							   "",
							   PGC_USERSET, 0,
							   cqrs_check_traceparent, NULL, NULL);
	DefineCustomIntVariable("cqrs.max_lag",
							"WAL the projector may fall behind before commands are refused.",
							"Past it, the command functions fail with SQLSTATE 53400, so that "
							"a stalled projector cannot fill the disk with retained WAL. "
							"0 turns the limit off.",
							&cqrs_max_lag,
							0, 0, MAX_KILOBYTES,
							PGC_SIGHUP, GUC_UNIT_KB,
							NULL, NULL, NULL);
	DefineCustomStringVariable("cqrs.redis_url",
							   "Redis the projector writes changed orders through to.",
							   "redis://[[user]:password@]host[:port][/db]; empty turns write-through off. "
							   "Only superusers can see it: it may hold a password.",
							   &cqrs_redis_url,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   cqrs_redis_check_url, NULL, NULL);
	DefineCustomIntVariable("cqrs.redis_ttl",
							"Time to live of the Redis keys the projector writes.",
							NULL,
							&cqrs_redis_ttl,
							300, 1, INT_MAX / 1000,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomIntVariable("cqrs.redis_ttl_jitter",
							"Most the time to live of a Redis key differs from cqrs.redis_ttl, either way.",
							"Spreads the expiry of keys written together.",
							&cqrs_redis_ttl_jitter,
							30, 0, INT_MAX / 1000,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomIntVariable("cqrs.redis_timeout",
							"How long the projector waits for Redis to connect or answer.",
							"Past it, Redis counts as down: projection goes on and the changed "
							"orders wait in cqrs.redis_backlog.",
							&cqrs_redis_timeout,
							200, 1, 60 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomRealVariable("cqrs.trace_sample_ratio",
							 "Share of the commands submitted without a sampled traceparent that are traced.",
							 "A command whose cqrs.traceparent is sampled is always traced; one without a "
							 "traceparent is traced with this probability, as the root of a new trace.",
							 &cqrs_trace_sample_ratio,
							 0.0, 0.0, 1.0,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("cqrs.trace_max_spans",
							"Finished spans kept in shared memory until they are exported or read.",
							"When they are all taken, the oldest is dropped for a new one.",
							&cqrs_trace_max_spans,
							4096, 16, 1024 * 1024,
							PGC_POSTMASTER, 0,
							NULL, NULL, NULL);
	DefineCustomStringVariable("cqrs.otel_endpoint",
							   "OTLP/HTTP URL the spans are posted to as JSON, such as http://127.0.0.1:4318/v1/traces.",
							   "Empty: spans are not exported, and stay for cqrs.spans(). "
							   "Only superusers can see it: it may hold credentials.",
							   &cqrs_otel_endpoint,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   cqrs_otel_check_endpoint, NULL, NULL);
	DefineCustomStringVariable("cqrs.otel_service_name",
							   "service.name of the exported spans.",
							   NULL,
							   &cqrs_otel_service_name,
							   "cqrs",
							   PGC_SIGHUP, 0,
							   NULL, NULL, NULL);
	DefineCustomIntVariable("cqrs.otel_naptime",
							"How often the exporter sends the spans waiting.",
							"It sends sooner when half of cqrs.trace_max_spans are waiting.",
							&cqrs_otel_naptime,
							1000, 10, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("cqrs.otel_timeout",
							"Longest the exporter waits for the collector to connect and answer one request.",
							"The spans of a request it gives up on are lost and counted.",
							&cqrs_otel_timeout,
							1000, 1, 60 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	MarkGUCPrefixReserved("cqrs");
}

/*
 * Register the projector workers: static workers, one of which leads.
 */
static void
cqrs_register_workers(void)
{
	for (int i = 0; i < cqrs_workers; i++)
	{
		BackgroundWorker worker;

		memset(&worker, 0, sizeof(worker));
		worker.bgw_flags = BGWORKER_SHMEM_ACCESS |
			BGWORKER_BACKEND_DATABASE_CONNECTION;
		/* never during recovery: a standby has nothing to project */
		worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
		worker.bgw_restart_time = 5;
		snprintf(worker.bgw_library_name, BGW_MAXLEN, "cqrs");
		snprintf(worker.bgw_function_name, BGW_MAXLEN, "cqrs_worker_main");
		snprintf(worker.bgw_name, BGW_MAXLEN, "cqrs projector %d", i);
		snprintf(worker.bgw_type, BGW_MAXLEN, "cqrs projector");
		worker.bgw_main_arg = Int32GetDatum(i);
		RegisterBackgroundWorker(&worker);
	}
}

/*
 * Module load callback.
 */
void
_PG_init(void)
{
	cqrs_define_settings();

	if (!process_shared_preload_libraries_in_progress)
		return;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = cqrs_shmem_request_hook;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = cqrs_shmem_startup_hook;

	/* pg_upgrade starts servers that must not run our workers */
	if (!IsBinaryUpgrade)
	{
		cqrs_register_workers();
		cqrs_otel_register();
	}
}
