/*-------------------------------------------------------------------------
 *
 * cqrs.h
 *		Declarations shared by the modules of the cqrs extension.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_H
#define CQRS_H

#include "access/htup.h"
#include "access/tupdesc.h"
#include "access/xlogdefs.h"
#include "datatype/timestamp.h"
#include "port/atomics.h"
#include "storage/condition_variable.h"
#include "storage/latch.h"
#include "storage/spin.h"
#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/uuid.h"

#include "compat.h"

/* Limits the command functions enforce on their input. */
#define CQRS_MAX_ID_BYTES		256
#define CQRS_MAX_REASON_BYTES	1024
#define CQRS_MAX_PAYLOAD_BYTES	(64 * 1024)

/* Advisory lock spaces (field4 of the tag); user locks use 1 and 2. */
#define CQRS_ORDER_LOCK_SPACE	0x4351
#define CQRS_LEADER_LOCK_SPACE	0x4352
#define CQRS_COMMAND_LOCK_SPACE	0x4353
#define CQRS_APPLY_LOCK_SPACE	0x4354

#define CQRS_ERROR_LEN			512

/* Settings (cqrs.c) */
extern char *cqrs_database;
extern char *cqrs_slot_name;
extern bool cqrs_slot_failover;
extern int	cqrs_workers;
extern bool cqrs_enabled;
extern int	cqrs_batch_size_min;
extern int	cqrs_batch_size_max;
extern int	cqrs_projector_work_mem;
extern int	cqrs_poll_interval;
extern int	cqrs_batch_delay;
extern int	cqrs_backoff_base;
extern int	cqrs_backoff_max;
extern int	cqrs_max_lag;
extern char *cqrs_traceparent;
extern char *cqrs_redis_url;
extern int	cqrs_redis_ttl;
extern int	cqrs_redis_ttl_jitter;
extern int	cqrs_redis_timeout;

/* What the projector is doing, as cqrs.status reports it. */
typedef enum CqrsState
{
	CQRS_STATE_IDLE = 0,		/* no leader */
	CQRS_STATE_RUNNING,
	CQRS_STATE_CATCHING_UP,
	CQRS_STATE_DISABLED,
	CQRS_STATE_ERROR,
	CQRS_STATE_PAUSED
} CqrsState;

/* Buckets of the commit-to-read-model lag histogram, in milliseconds. */
#define CQRS_LAG_BUCKETS		24
extern const double cqrs_lag_bucket_ms[CQRS_LAG_BUCKETS];

/* Command types, in the order of cqrs_command_type_names. */
typedef enum CqrsCommandType
{
	CQRS_CREATE_ORDER,
	CQRS_SHIP_ORDER,
	CQRS_CANCEL_ORDER,
	CQRS_DECLARED_COMMAND		/* any type declared in cqrs.command_type */
} CqrsCommandType;
#define CQRS_COMMAND_TYPES		4
extern const char *const cqrs_command_type_names[CQRS_COMMAND_TYPES];

/* Why a command function refused a command (cqrs_command_errors_total). */
typedef enum CqrsErrorKind
{
	CQRS_ERR_INVALID_INPUT,		/* class 22 */
	CQRS_ERR_CONFLICT,			/* 23505: duplicate order, id or sequence */
	CQRS_ERR_NO_ORDER,			/* 23503: order not in the log */
	CQRS_ERR_BACKPRESSURE,		/* 53400: cqrs.max_lag */
	CQRS_ERR_CONCURRENCY,		/* class 40 */
	CQRS_ERR_PRIVILEGE,			/* 42501 */
	CQRS_ERR_OTHER
} CqrsErrorKind;
#define CQRS_ERROR_KINDS		7
extern const char *const cqrs_error_kind_names[CQRS_ERROR_KINDS];

/* Buckets of the batch flush duration histogram, in seconds. */
#define CQRS_FLUSH_BUCKETS		12
extern const double cqrs_flush_bucket_s[CQRS_FLUSH_BUCKETS];

/* Shared state of the projector workers (shmem.c). */
typedef struct CqrsShared
{
	slock_t		mutex;
	int			workers_alive;	/* projector processes running */
	Latch	   *leader_latch;	/* set on commit of a command */
	XLogRecPtr	wake_lsn;		/* end of the latest command commit */
	int			leader_pid;
	CqrsState	state;
	XLogRecPtr	applied_lsn;	/* all commands committed before are applied */
	uint64		applied_total;	/* commands processed */
	uint64		batches_total;
	int			batch_size;		/* current adaptive target */
	int			last_batch_size;
	double		last_batch_ms;
	uint64		lag_histogram[CQRS_LAG_BUCKETS + 1];	/* + overflow */
	char		last_error[CQRS_ERROR_LEN];
	TimestampTz last_error_at;
	uint64		control_generation;	/* bumped when cqrs.pause() or
										 * cqrs.resume() commits */
	XLogRecPtr	read_lsn;		/* where cqrs.wait_for_lsn() waiters need
								 * the projector to read to */
	bool		pause_requested;	/* what the last of them asked for, or
									 * what the projector last read */
	ConditionVariable applied_cv;	/* broadcast when applied_lsn moves */
	pg_atomic_uint64 repair_generation;	/* bumped by every repair function */
	TimestampTz pending_since;	/* commit time of the oldest command not
								 * applied yet, at most; valid while
								 * wake_lsn > applied_lsn */
	uint64		dead_letter_total;	/* dead letters written */
	uint64		slots_lost;		/* invalidated slots recreated */
	uint64		spilled_total;	/* commands spilled beyond projector_work_mem */
	uint64		flush_histogram[CQRS_FLUSH_BUCKETS + 1];	/* + overflow */
	double		flush_seconds_sum;
	/* counted by the command functions, without the spinlock */
	pg_atomic_uint64 commands_total[CQRS_COMMAND_TYPES];
	pg_atomic_uint64 command_errors[CQRS_ERROR_KINDS];
	/* Redis write-through (redis.c) */
	bool		redis_connected;
	bool		redis_backlog_hint;	/* a session committed backlog entries */
	uint64		redis_writes_total; /* keys the projector wrote */
	uint64		redis_errors_total;
	uint64		redis_redirects_total;	/* cluster redirections followed */
	uint64		redis_hits;		/* Redis's keyspace_hits, keyspace_misses */
	uint64		redis_misses;
} CqrsShared;

extern CqrsShared *cqrs_shared;

/* catalog.c: a declared command type, as cqrs.submit() uses it */
typedef struct CqrsCommandDef
{
	char		name[NAMEDATALEN];	/* hash key */
	bool		exists;
	char		aggregate_type[NAMEDATALEN];
	bool		creates;
	bool		builtin;
	Oid			payload_type;	/* composite type, or InvalidOid: any object */
	Oid			validator;		/* (text, jsonb) RETURNS void, or InvalidOid */
	Oid			owner;			/* the role that declared it */
} CqrsCommandDef;

extern const CqrsCommandDef *cqrs_command_def(const char *name);
extern void cqrs_check_payload_keys(Jsonb *payload, const char *const *keys,
									int nkeys, const char *type_name,
									Oid payload_type);
extern void cqrs_check_payload(const CqrsCommandDef *def, const char *type_name,
							   Jsonb *payload);
extern void cqrs_run_validator(const CqrsCommandDef *def, text *aggregate_id,
							   Jsonb *payload);

/* shmem.c */
extern void cqrs_shmem_request(void);
extern void cqrs_shmem_startup(void);
extern void cqrs_set_error(const char *message);
extern void cqrs_wake_projector(XLogRecPtr commit_end, TimestampTz commit_time);
extern double cqrs_lag_seconds(CqrsShared *snap, TimestampTz now);
extern void cqrs_control_changed(int paused);
extern XLogRecPtr cqrs_insert_end(void);
extern void cqrs_request_read(XLogRecPtr lsn);
extern void cqrs_set_applied(XLogRecPtr lsn, bool only_forward);
extern void cqrs_count_command_error(int sqlerrcode);
extern XLogRecPtr cqrs_slot_confirmed_lsn(void);

/* A decoded command (decoder.c fills, projector.c applies). */
typedef struct CqrsRecord
{
	int64		log_id;
	pg_uuid_t	command_id;
	char	   *command_type;
	char	   *aggregate_id;
	int64		sequence_id;
	Jsonb	   *payload;
	char	   *traceparent;	/* W3C trace context, or NULL */
	TimestampTz created_at;		/* as in the log */
	XLogRecPtr	commit_lsn;		/* end of the commit record */
	TimestampTz commit_time;
} CqrsRecord;

/*
 * Commands decoded in the projector process, waiting to be applied.  Up to
 * cqrs.projector_work_mem they are kept in memory; past it, the rest of the
 * transaction being decoded goes to a temporary file, and decoding stops
 * at its commit.  Spilled commands all belong to that last transaction.
 */
typedef struct CqrsQueue
{
	MemoryContext context;		/* records live here; reset per batch */
	CqrsRecord *records;
	int			nrecords;
	int			capacity;
	int			xact_start;		/* first record of the transaction decoding */
	struct BufFile *spill;		/* commands beyond the budget, or NULL */
	int64		nspilled;		/* how many */
	int64		nunspilled;		/* how many read back so far */
	XLogRecPtr	last_commit_lsn;
	TimestampTz last_commit_time;
	bool		catalog_changed;	/* a decoded transaction changed catalogs */
} CqrsQueue;

/* decoder.c: the columns of cqrs.command_log, found by name */
typedef enum CqrsLogColumn
{
	COL_LOG_ID,
	COL_COMMAND_ID,
	COL_COMMAND_TYPE,
	COL_AGGREGATE_ID,
	COL_SEQUENCE_ID,
	COL_PAYLOAD,
	COL_TRACEPARENT,
	COL_CREATED_AT,
	NUM_COLS
} CqrsLogColumn;
extern void cqrs_log_attnums(TupleDesc desc, AttrNumber *attnums);

/* decoder.c: set in the projector process only, NULL elsewhere */
extern CqrsQueue *cqrs_decoding_queue;
extern void cqrs_queue_reset(CqrsQueue *queue);
extern int	cqrs_queue_unspill(CqrsQueue *queue, CqrsRecord *records, int max);

/* projector.c */
struct _SPI_plan;

typedef struct CqrsApplyStats
{
	int64		applied;		/* commands that changed or dead-lettered an order */
	int64		skipped;		/* already applied */
	int64		parked;			/* newly parked */
	int64		unparked;
	int64		dead;			/* newly dead-lettered */
	int64		poisoned;		/* failed on their own (a subset of dead) */
} CqrsApplyStats;

/*
 * The array parameters of one set-based statement, filled row by row:
 * column c of the statement is the array of values[c].
 */
#define CQRS_BATCH_MAX_COLS 10

typedef struct CqrsBatch
{
	int			ncols;
	int			nrows;
	int			capacity;
	Oid			types[CQRS_BATCH_MAX_COLS];	/* element types */
	Datum	   *values[CQRS_BATCH_MAX_COLS];
	bool	   *nulls[CQRS_BATCH_MAX_COLS];
} CqrsBatch;

extern void cqrs_batch_init(CqrsBatch *b, int capacity, int ncols,
							const Oid *types);
extern void cqrs_batch_grow(CqrsBatch *b);
extern void cqrs_batch_put(CqrsBatch *b, int c, Datum value);
extern void cqrs_batch_put_text(CqrsBatch *b, int c, const char *s);
extern uint64 cqrs_batch_exec(CqrsBatch *b, struct _SPI_plan **plan,
							  const char *sql, int expected);
extern Datum cqrs_array(Datum *elems, bool *nulls, int n, Oid elemtype);

/* A dead letter to write. */
typedef struct CqrsDeadLetter
{
	CqrsRecord *rec;
	char	   *reason;
	char	   *projection;		/* a declared projection, or NULL */
	char	   *sqlstate;		/* of the error that refused it, or NULL */
} CqrsDeadLetter;

extern int64 cqrs_write_dead(List *dead);
extern List *cqrs_parked_load(Datum aggregate_ids);
extern void cqrs_parked_store(CqrsBatch *park);
extern void cqrs_parked_remove(CqrsBatch *unpark);
extern void cqrs_parked_put(CqrsBatch *park, CqrsRecord *rec, int64 waiting_for);
extern void cqrs_unpark_put(CqrsBatch *unpark, CqrsRecord *rec);
extern bool cqrs_is_order_command(const char *type);
extern void cqrs_project(CqrsRecord *records, int nrecords,
						 CqrsApplyStats *stats);
extern void cqrs_stats_add(CqrsApplyStats *to, const CqrsApplyStats *from);
struct HTAB;
extern struct HTAB *cqrs_id_hash_create(const char *name, long nelem,
										Size entrysize);
extern void cqrs_project_forget(void);
extern bool cqrs_parked_maybe(void);
extern void cqrs_parked_note(int64 parked, int64 unparked);
extern void cqrs_save_offset(const char *slot_name, XLogRecPtr lsn);
extern XLogRecPtr cqrs_load_offset(const char *slot_name);
extern int64 cqrs_project_log(CqrsApplyStats *stats);
typedef void (*CqrsFoldFn) (CqrsRecord *records, int n, void *arg);
extern int64 cqrs_scan_log(const char *sql, int nargs, Oid *argtypes,
						   Datum *values, bool whole_aggregates,
						   CqrsFoldFn fold, void *arg);
extern void cqrs_project_rebuild_mode(bool on);
extern void cqrs_project_rebuild_prune(void);
extern bool cqrs_blames_command(int sqlerrcode);
extern bool cqrs_lock_projection(bool wait);

/* projection.c */
extern void cqrs_project_declared(CqrsRecord *records, int n,
								  CqrsApplyStats *stats);
extern bool cqrs_retry_declared(CqrsRecord *rec, const char *projection);
extern void cqrs_projection_json(const char *projection, int n, char **ids,
								 char **json, int64 *versions);
extern void cqrs_redis_stale_declared(const char *command_type,
									  const char *aggregate_id);

/* redis.c */
extern bool cqrs_redis_check_url(char **newval, void **extra, GucSource source);
extern const char *cqrs_redis_state_name(void);
extern void cqrs_redis_stale(const char *order_id);
extern bool cqrs_redis_wanted(void);
extern void cqrs_redis_stale_in(const char *projection, const char *id);
extern void cqrs_redis_stale_projection(const char *projection);
extern void cqrs_redis_declared_row(const char *projection, const char *id,
									const char *json, int64 version,
									bool created);
extern void cqrs_redis_flush_stale(void);
extern void cqrs_redis_stale_all(void);
extern void cqrs_redis_installation(Oid extension);
extern bool cqrs_redis_tick(void);
extern bool cqrs_redis_drain(int limit);
extern void cqrs_redis_batch_begin(void);
extern void cqrs_redis_row(const char *order_id, const char *user_id,
						   Datum amount, const char *status, int64 version);
extern int	cqrs_redis_mark(void);
extern void cqrs_redis_forget(int mark);
extern bool cqrs_redis_batch_done(void);
extern void cqrs_redis_batch_abort(void);
extern bool cqrs_redis_batch_pending(void);
extern void cqrs_redis_backlog_failed(void);

/* trace.c: OpenTelemetry spans */
#define CQRS_TRACE_ID_LEN		16
#define CQRS_SPAN_ID_LEN		8
#define CQRS_SPAN_LINKS			16	/* links a batch span keeps */
#define CQRS_SPAN_AGGREGATE_LEN	128 /* of an aggregate id, in a span */

typedef enum CqrsSpanKind
{
	CQRS_SPAN_COMMAND,
	CQRS_SPAN_BATCH,
	CQRS_SPAN_APPLY,
	CQRS_SPAN_REDIS
} CqrsSpanKind;

typedef struct CqrsSpanLink
{
	uint8		trace_id[CQRS_TRACE_ID_LEN];
	uint8		span_id[CQRS_SPAN_ID_LEN];
} CqrsSpanLink;

/* A finished span, as it waits in shared memory to be exported. */
typedef struct CqrsSpan
{
	uint8		trace_id[CQRS_TRACE_ID_LEN];
	uint8		span_id[CQRS_SPAN_ID_LEN];
	uint8		parent_id[CQRS_SPAN_ID_LEN];	/* all zeros: a root span */
	uint8		kind;			/* CqrsSpanKind */
	bool		error;
	bool		has_command;	/* command_id is set */
	bool		duplicate;		/* command: a retry of a logged command */
	bool		taken;			/* read with cqrs.spans(consume => true) */
	uint8		outcome;		/* apply: 1 applied, 2 parked, 3 dead-lettered */
	Oid			dbid;			/* the database it happened in */
	int32		encoding;		/* that database's, its strings' */
	int16		nlinks;
	int32		batch_size;		/* batch: commands; redis: keys */
	int32		traced;			/* batch: traced commands in it */
	int32		attempts;		/* batch: tries until it committed */
	TimestampTz start;
	TimestampTz end;
	pg_uuid_t	command_id;
	int64		sequence_id;
	XLogRecPtr	lsn_start;		/* batch: commit of its first command */
	XLogRecPtr	lsn_end;		/* and of its last: the batch id */
	char		sqlstate[6];
	char		database[NAMEDATALEN];
	char		operation[NAMEDATALEN]; /* command: the function called */
	char		user[NAMEDATALEN];	/* command: who called it */
	char		command_type[NAMEDATALEN];
	char		aggregate_id[CQRS_SPAN_AGGREGATE_LEN];
	char		message[128];	/* of the error */
	CqrsSpanLink links[CQRS_SPAN_LINKS];
} CqrsSpan;

extern int	cqrs_trace_max_spans;
extern double cqrs_trace_sample_ratio;
extern Size cqrs_trace_shmem_size(void);
extern void cqrs_trace_shmem_startup(void);
extern bool cqrs_trace_sampled(const char *traceparent,
							   const pg_uuid_t *command_id,
							   uint8 *trace_id, uint8 *parent_id);
extern bool cqrs_trace_maybe(void);
/* A command function call, for its span. */
typedef struct CqrsTraceCommand
{
	const char *operation;		/* the function */
	const char *database;
	const char *user;			/* who called it */
	const char *command_type;	/* NULL: refused before it was known */
	const char *aggregate_id;
	const pg_uuid_t *command_id;	/* all zeros: not known yet */
	int64		sequence_id;
	bool		duplicate;		/* a retry: the command was in the log */
	TimestampTz start;
	ErrorData  *edata;			/* the error it failed with, or NULL */
} CqrsTraceCommand;
extern void cqrs_trace_command(const CqrsTraceCommand *call);
extern void cqrs_trace_batch_begin(CqrsRecord *records, int n);
extern void cqrs_trace_batch_outcomes(CqrsRecord *records);
extern void cqrs_trace_redis_begin(int keys);
extern void cqrs_trace_redis_end(bool ok);
extern void cqrs_trace_batch_end(CqrsRecord *records, int n, int attempts);
extern void cqrs_trace_set_exporter(Latch *latch);
extern int	cqrs_trace_take(CqrsSpan *out, int max);
extern void cqrs_trace_exported(int n, bool ok);
extern bool cqrs_trace_counts(uint64 *buffered, uint64 *dropped,
							  uint64 *exported, uint64 *failed);
extern void cqrs_trace_otlp_span(StringInfo buf, const CqrsSpan *s);

/* otel.c: the exporter */
extern char *cqrs_otel_endpoint;
extern char *cqrs_otel_service_name;
extern int	cqrs_otel_naptime;
extern int	cqrs_otel_timeout;
extern bool cqrs_otel_check_endpoint(char **newval, void **extra,
									 GucSource source);
extern void cqrs_otel_register(void);
extern PGDLLEXPORT void cqrs_otel_main(Datum main_arg);

/* worker.c */
extern PGDLLEXPORT void cqrs_worker_main(Datum main_arg);

/* spi.c */

typedef struct CqrsOwnerScope
{
	Oid			save_userid;
	int			save_sec_context;
} CqrsOwnerScope;

extern void cqrs_spi_connect_as_owner(CqrsOwnerScope *scope);

/* spi.c: relations looked up once per process */
typedef enum CqrsRelation
{
	CQRS_REL_COMMAND_LOG,
	CQRS_REL_COMMAND_TYPE,
	CQRS_REL_PROJECTION,
	CQRS_REL_PARKED,
	CQRS_RELATIONS
} CqrsRelation;
extern Oid	cqrs_relid(CqrsRelation rel);
extern bool cqrs_schema_020(void);
extern void cqrs_spi_finish(CqrsOwnerScope *scope);

/* repair.c */
extern void cqrs_repair_begin(CqrsOwnerScope *scope, const char *name);
extern char *cqrs_spi_text(HeapTuple tuple, TupleDesc desc, int col);
extern uint64 cqrs_exec(struct _SPI_plan *plan, Datum *values,
						const char *nulls, long tcount, int expected);
extern ErrorData *cqrs_try_subtransaction(void (*fn) (void *arg), void *arg);
extern struct _SPI_plan *cqrs_keep_plan(struct _SPI_plan **cache,
										const char *sql, int nargs,
										Oid *argtypes);

/* uuidv7.c */
extern void cqrs_generate_uuidv7(pg_uuid_t *uuid);

#endif							/* CQRS_H */
