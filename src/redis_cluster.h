/*-------------------------------------------------------------------------
 *
 * redis_cluster.h
 *		Redis targets: the URL, and (with hiredis) one server or a Redis
 *		Cluster behind one interface.  Plain C with no PostgreSQL
 *		dependency: the projector and the cqrs-load tool both use it.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_REDIS_CLUSTER_H
#define CQRS_REDIS_CLUSTER_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/time.h>

#define RC_MAX_SEEDS		16
#define RC_MAX_NODES		64	/* nodes one cluster map may name */
#define RC_SLOTS			16384
#define RC_MAX_REDIRECTS	5	/* per command, within one rc_run() */

typedef struct RcAddr
{
	char		host[256];
	int			port;
} RcAddr;

/* A parsed redis:// URL: seed nodes, credentials, database. */
typedef struct RcTarget
{
	RcAddr		seeds[RC_MAX_SEEDS];
	int			nseeds;
	char		user[128];
	char		password[256];
	int			db;
} RcTarget;

extern bool rc_parse_url(const char *url, RcTarget *t, const char **problem);
extern unsigned int rc_key_slot(const char *key, size_t len);

#ifdef USE_HIREDIS
#include <hiredis.h>

typedef struct RcNode
{
	RcAddr		addr;
	char		id[48];			/* the cluster's node ID ("" unknown) */
	redisContext *ctx;			/* NULL until first used */
	bool		serves;			/* owns slots in the last map */
} RcNode;

/*
 * A connection to one server or to a cluster.  Set target, timeout and
 * (optionally) script, then rc_open().  A single server is node 0 serving
 * every slot.  Allocation-free apart from hiredis's own.
 */
typedef struct RcConn
{
	RcTarget	target;
	struct timeval timeout;
	const char *script;			/* loaded on every node; NULL: none */
	char		sha[41];		/* its SHA1 */
	bool		cluster;		/* false: one server */
	bool		refresh;		/* a MOVED made the map stale */
	bool		primary_gone;	/* a map dropped a primary: see rc_load_map() */
	int			nnodes;
	RcNode		nodes[RC_MAX_NODES];
	short		slot_node[RC_SLOTS];	/* node index, -1: not served */
	unsigned long redirects;	/* MOVED and ASK replies followed */
	char		err[600];		/* why the last call failed */
} RcConn;

/* One command of a pipeline; key routes it (NULL: node 0). */
typedef struct RcCommand
{
	int			argc;
	const char **argv;
	const char *key;
	redisReply *reply;			/* set by rc_run(); the caller frees it */
} RcCommand;

extern bool rc_open(RcConn *c);
extern void rc_close(RcConn *c);
extern redisContext *rc_node(RcConn *c, int node);
extern bool rc_run(RcConn *c, RcCommand *cmds, int n);
extern redisReply *rc_node_command(RcConn *c, int node, int argc,
								   const char **argv);
extern const char *rc_describe(RcConn *c, char *buf, size_t len);
#endif							/* USE_HIREDIS */

#endif							/* CQRS_REDIS_CLUSTER_H */
