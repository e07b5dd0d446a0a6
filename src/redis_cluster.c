/*-------------------------------------------------------------------------
 *
 * redis_cluster.c
 *		The redis:// URL, and one server or a Redis Cluster behind one
 *		interface: key slots, the slot map, per-node pipelines, MOVED and
 *		ASK redirections.
 *
 * Debian packages no cluster-aware hiredis, so the routing is written
 * here, on top of plain hiredis contexts, in the way the cluster
 * specification describes for a client:
 *
 * - A key's slot is CRC16 (XMODEM) of the key, or of the part between the
 *   first "{" and the next "}" when that part is not empty, modulo 16384.
 * - The slot map comes from CLUSTER SLOTS, asked of any node that answers
 *   (the nodes already known first, then the seeds of the URL).
 * - A pipeline is split by node; commands answered MOVED are sent again to
 *   the node named, whose slot is noted at once (the whole map is read
 *   again after the call); commands answered ASK are sent again, once,
 *   after ASKING, to the node named, and the map is left alone.
 * - Nodes are connected when first needed; each is authenticated and, if
 *   a script is set, has it loaded, so EVALSHA works on any of them.
 *
 * INFO cluster tells a cluster from one server; a single server is node 0
 * and serves every slot, so callers never branch on which they have.
 * Any failure to reach a node is returned to the caller, who closes
 * everything (rc_close) and opens again later: the projector's backlog,
 * not a retry here, is what keeps writes from being lost.
 *
 * Plain C without PostgreSQL's headers: the cqrs-load tool links it too.
 *
 *-------------------------------------------------------------------------
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "redis_cluster.h"

/* Copy src[0, len) to dst (size dstlen), decoding %XX; false if bad. */
static bool
rc_url_part(char *dst, size_t dstlen, const char *src, size_t len)
{
	size_t		n = 0;

	for (size_t i = 0; i < len; i++)
	{
		char		c = src[i];

		if (c == '%')
		{
			char		hex[3];
			char	   *end;

			if (i + 2 >= len)
				return false;
			hex[0] = src[i + 1];
			hex[1] = src[i + 2];
			hex[2] = '\0';
			c = (char) strtol(hex, &end, 16);
			if (*end != '\0' || c == '\0')
				return false;
			i += 2;
		}
		if (n + 1 >= dstlen)
			return false;
		dst[n++] = c;
	}
	dst[n] = '\0';
	return true;
}

/* Parse host[:port] (host may be [IPv6]) at *pp, up to , / or the end. */
static bool
rc_parse_addr(const char **pp, RcAddr *a, const char **problem)
{
	const char *p = *pp;
	const char *host_end;
	char	   *end;
	long		v;

	a->port = 6379;
	if (*p == '[')
	{
		host_end = strchr(p, ']');
		if (host_end == NULL)
		{
			*problem = "An IPv6 address must end with ].";
			return false;
		}
		if (!rc_url_part(a->host, sizeof(a->host), p + 1, host_end - p - 1))
		{
			*problem = "A host name is too long.";
			return false;
		}
		p = host_end + 1;
	}
	else
	{
		host_end = p + strcspn(p, ":/,");
		if (!rc_url_part(a->host, sizeof(a->host), p, host_end - p))
		{
			*problem = "A host name is too long.";
			return false;
		}
		p = host_end;
	}
	if (a->host[0] == '\0')
	{
		*problem = "It names no host, or an empty one.";
		return false;
	}
	if (*p == ':')
	{
		errno = 0;
		v = strtol(p + 1, &end, 10);
		if (end == p + 1 || errno != 0 || v < 1 || v > 65535)
		{
			*problem = "The port must be a number from 1 to 65535.";
			return false;
		}
		a->port = (int) v;
		p = end;
	}
	*pp = p;
	return true;
}

/*
 * Parse redis://[[user]:password@]host[:port][,host[:port]...][/db].
 * Several hosts are seed nodes of one Redis Cluster.  On failure, returns
 * false with *problem saying what is wrong, never quoting the URL (it may
 * hold a password).
 */
bool
rc_parse_url(const char *url, RcTarget *t, const char **problem)
{
	const char *p;
	const char *at;
	char	   *end;
	long		v;

	memset(t, 0, sizeof(*t));
	if (strncmp(url, "redis://", 8) != 0)
	{
		*problem = "It must start with redis://.";
		return false;
	}
	p = url + 8;
	at = strrchr(p, '@');
	if (at != NULL)
	{
		const char *colon = memchr(p, ':', at - p);

		if (colon == NULL)
		{
			*problem = "The part before @ must be :password or user:password.";
			return false;
		}
		if (!rc_url_part(t->user, sizeof(t->user), p, colon - p) ||
			!rc_url_part(t->password, sizeof(t->password), colon + 1,
						 at - colon - 1))
		{
			*problem = "The user name or password is too long or badly percent-encoded.";
			return false;
		}
		p = at + 1;
	}

	for (;;)
	{
		if (t->nseeds == RC_MAX_SEEDS)
		{
			*problem = "It names more than 16 hosts.";
			return false;
		}
		if (!rc_parse_addr(&p, &t->seeds[t->nseeds], problem))
			return false;
		t->nseeds++;
		if (*p != ',')
			break;
		p++;
	}

	if (*p == '/' && p[1] != '\0')
	{
		errno = 0;
		v = strtol(p + 1, &end, 10);
		if (end == p + 1 || errno != 0 || v < 0 || v > INT_MAX || *end != '\0')
		{
			*problem = "The database must be a number.";
			return false;
		}
		t->db = (int) v;
		p = end;
	}
	else if (*p == '/')
		p++;
	if (*p != '\0')
	{
		*problem = "Only ports, more hosts and a database number may follow the host.";
		return false;
	}
	if (t->nseeds > 1 && t->db != 0)
	{
		*problem = "Several hosts name a Redis Cluster, which has only database 0.";
		return false;
	}
	return true;
}

/* CRC16-CCITT (XMODEM: polynomial 0x1021, initial 0), as Redis Cluster. */
static unsigned int
rc_crc16(const char *buf, size_t len)
{
	unsigned int crc = 0;

	for (size_t i = 0; i < len; i++)
	{
		crc ^= ((unsigned int) (unsigned char) buf[i]) << 8;
		for (int b = 0; b < 8; b++)
			crc = (crc & 0x8000) ? ((crc << 1) ^ 0x1021) : (crc << 1);
		crc &= 0xffff;
	}
	return crc;
}

/*
 * The hash slot of a key: of its hash tag when it has a non-empty one
 * ("{...}", the first "{" and the first "}" after it), else of the key.
 */
unsigned int
rc_key_slot(const char *key, size_t len)
{
	const char *open = memchr(key, '{', len);

	if (open != NULL)
	{
		size_t		rest = len - (open - key) - 1;
		const char *close = memchr(open + 1, '}', rest);

		if (close != NULL && close > open + 1)
			return rc_crc16(open + 1, close - open - 1) & (RC_SLOTS - 1);
	}
	return rc_crc16(key, len) & (RC_SLOTS - 1);
}

#ifdef USE_HIREDIS

/* Note why a call failed, naming the node. */
static void
rc_fail(RcConn *c, const RcAddr *a, const char *what)
{
	snprintf(c->err, sizeof(c->err), "%.255s:%d: %.300s", a->host, a->port, what);
}

/* The reply of a command on ctx, or NULL after rc_fail() if not expected. */
static redisReply *
rc_expect(RcConn *c, const RcAddr *a, redisContext *ctx, int argc,
		  const char **argv, int type)
{
	redisReply *reply = redisCommandArgv(ctx, argc, argv, NULL);
	char		what[256];

	if (reply != NULL && reply->type == type)
		return reply;
	snprintf(what, sizeof(what), "%s: %s", argv[0],
			 reply == NULL ? ctx->errstr :
			 reply->type == REDIS_REPLY_ERROR ? reply->str : "unexpected reply");
	rc_fail(c, a, what);
	if (reply != NULL)
		freeReplyObject(reply);
	return NULL;
}

/* Connect to one address and authenticate; NULL after rc_fail(). */
static redisContext *
rc_connect(RcConn *c, const RcAddr *a)
{
	redisContext *ctx = redisConnectWithTimeout(a->host, a->port, c->timeout);
	redisReply *reply;

	if (ctx == NULL || ctx->err)
	{
		rc_fail(c, a, ctx ? ctx->errstr : "out of memory");
		if (ctx != NULL)
			redisFree(ctx);
		return NULL;
	}
	if (redisSetTimeout(ctx, c->timeout) != REDIS_OK)
	{
		rc_fail(c, a, "could not set the timeout");
		redisFree(ctx);
		return NULL;
	}
	if (c->target.password[0] != '\0')
	{
		const char *argv[3] = {"AUTH", c->target.user, c->target.password};

		reply = c->target.user[0] == '\0' ?
			rc_expect(c, a, ctx, 2, (const char *[]) {"AUTH", c->target.password},
					  REDIS_REPLY_STATUS) :
			rc_expect(c, a, ctx, 3, argv, REDIS_REPLY_STATUS);
		if (reply == NULL)
		{
			redisFree(ctx);
			return NULL;
		}
		freeReplyObject(reply);
	}
	return ctx;
}

/* The index of the node at host:port, added if new; -1 if the table is full. */
static int
rc_node_index(RcConn *c, const char *host, int port)
{
	for (int i = 0; i < c->nnodes; i++)
		if (c->nodes[i].addr.port == port &&
			strcmp(c->nodes[i].addr.host, host) == 0)
			return i;
	if (c->nnodes == RC_MAX_NODES)
		return -1;
	memset(&c->nodes[c->nnodes], 0, sizeof(RcNode));
	snprintf(c->nodes[c->nnodes].addr.host, sizeof(c->nodes[0].addr.host),
			 "%s", host);
	c->nodes[c->nnodes].addr.port = port;
	return c->nnodes++;
}

/*
 * Read the slot map from a CLUSTER SLOTS reply of the node at asked: each
 * range's first node is its primary (an empty address is the node asked).
 *
 * A primary of the previous map that serves nothing now was failed over
 * (or emptied by a resharding): replication is asynchronous, so its last
 * writes may be missing on the replica that took over.  That sets
 * primary_gone, for the caller to write every key again.
 */
static bool
rc_load_map(RcConn *c, const RcAddr *asked, redisReply *reply)
{
	char		before[RC_MAX_NODES][48];
	int			nbefore = 0;

	for (int i = 0; i < c->nnodes; i++)
	{
		if (c->nodes[i].serves && c->nodes[i].id[0] != '\0')
			memcpy(before[nbefore++], c->nodes[i].id, 48);
		c->nodes[i].serves = false;
	}
	for (int s = 0; s < RC_SLOTS; s++)
		c->slot_node[s] = -1;
	for (size_t i = 0; i < reply->elements; i++)
	{
		redisReply *r = reply->element[i];
		redisReply *n;
		const char *host;
		int			node;

		if (r->type != REDIS_REPLY_ARRAY || r->elements < 3 ||
			r->element[0]->type != REDIS_REPLY_INTEGER ||
			r->element[1]->type != REDIS_REPLY_INTEGER ||
			r->element[2]->type != REDIS_REPLY_ARRAY ||
			r->element[2]->elements < 2 ||
			r->element[2]->element[0]->type != REDIS_REPLY_STRING ||
			r->element[2]->element[1]->type != REDIS_REPLY_INTEGER ||
			r->element[0]->integer < 0 || r->element[1]->integer >= RC_SLOTS ||
			r->element[0]->integer > r->element[1]->integer)
		{
			rc_fail(c, asked, "CLUSTER SLOTS: unexpected reply");
			return false;
		}
		n = r->element[2];
		host = n->element[0]->str[0] != '\0' && strcmp(n->element[0]->str, "?") != 0 ?
			n->element[0]->str : asked->host;
		node = rc_node_index(c, host, (int) n->element[1]->integer);
		if (node < 0)
		{
			rc_fail(c, asked, "the cluster has more than 64 nodes");
			return false;
		}
		if (n->elements >= 3 && n->element[2]->type == REDIS_REPLY_STRING)
			snprintf(c->nodes[node].id, sizeof(c->nodes[node].id), "%s",
					 n->element[2]->str);
		c->nodes[node].serves = true;
		for (long long s = r->element[0]->integer; s <= r->element[1]->integer; s++)
			c->slot_node[s] = (short) node;
	}
	for (int k = 0; k < nbefore; k++)
	{
		bool		serves = false;

		for (int i = 0; i < c->nnodes && !serves; i++)
			serves = c->nodes[i].serves && strcmp(c->nodes[i].id, before[k]) == 0;
		if (!serves)
			c->primary_gone = true;
	}
	return true;
}

/*
 * Learn what the target is, from the first node that answers (the nodes
 * known from an earlier map first, then the seeds): one server, or a
 * cluster and its slot map.  Connections are opened as commands need them.
 * False with c->err set if no node answered.
 */
bool
rc_open(RcConn *c)
{
	RcAddr		cand[RC_MAX_NODES + RC_MAX_SEEDS];
	int			ncand = 0;

	rc_close(c);
	for (int i = 0; i < c->nnodes; i++)
		cand[ncand++] = c->nodes[i].addr;
	for (int i = 0; i < c->target.nseeds; i++)
		cand[ncand++] = c->target.seeds[i];
	snprintf(c->err, sizeof(c->err), "no host to connect to");

	for (int i = 0; i < ncand; i++)
	{
		redisContext *ctx = rc_connect(c, &cand[i]);
		redisReply *reply;
		bool		cluster;

		if (ctx == NULL)
			continue;
		reply = rc_expect(c, &cand[i], ctx, 2,
						  (const char *[]) {"INFO", "cluster"}, REDIS_REPLY_STRING);
		if (reply == NULL)
		{
			redisFree(ctx);
			continue;
		}
		cluster = strstr(reply->str, "cluster_enabled:1") != NULL;
		freeReplyObject(reply);

		if (!cluster)
		{
			if (c->target.nseeds > 1)
			{
				rc_fail(c, &cand[i], "not a cluster node, and several hosts name a cluster");
				redisFree(ctx);
				return false;
			}
			c->cluster = false;
			c->nnodes = 0;
			(void) rc_node_index(c, cand[i].host, cand[i].port);
			c->nodes[0].serves = true;
			for (int s = 0; s < RC_SLOTS; s++)
				c->slot_node[s] = 0;
			redisFree(ctx);
			return true;
		}
		if (c->target.db != 0)
		{
			rc_fail(c, &cand[i], "a Redis Cluster has only database 0");
			redisFree(ctx);
			return false;
		}
		reply = rc_expect(c, &cand[i], ctx, 2,
						  (const char *[]) {"CLUSTER", "SLOTS"}, REDIS_REPLY_ARRAY);
		redisFree(ctx);
		if (reply == NULL)
			continue;
		c->cluster = true;
		if (!rc_load_map(c, &cand[i], reply))
		{
			freeReplyObject(reply);
			continue;
		}
		freeReplyObject(reply);
		c->refresh = false;
		return true;
	}
	return false;
}

/* Close every connection; the nodes stay known for the next rc_open(). */
void
rc_close(RcConn *c)
{
	for (int i = 0; i < c->nnodes; i++)
	{
		if (c->nodes[i].ctx != NULL)
			redisFree(c->nodes[i].ctx);
		c->nodes[i].ctx = NULL;
	}
}

/*
 * The connection to a node, opened (authenticated, database selected,
 * script loaded) if it is not yet; NULL after rc_fail().
 */
redisContext *
rc_node(RcConn *c, int node)
{
	RcNode	   *n = &c->nodes[node];
	redisReply *reply;

	if (n->ctx != NULL)
		return n->ctx;
	n->ctx = rc_connect(c, &n->addr);
	if (n->ctx == NULL)
		return NULL;
	if (!c->cluster && c->target.db != 0)
	{
		char		db[16];

		snprintf(db, sizeof(db), "%d", c->target.db);
		reply = rc_expect(c, &n->addr, n->ctx, 2, (const char *[]) {"SELECT", db},
						  REDIS_REPLY_STATUS);
		if (reply == NULL)
			goto fail;
		freeReplyObject(reply);
	}
	if (c->script != NULL)
	{
		reply = rc_expect(c, &n->addr, n->ctx, 3,
						  (const char *[]) {"SCRIPT", "LOAD", c->script},
						  REDIS_REPLY_STRING);
		if (reply == NULL)
			goto fail;
		snprintf(c->sha, sizeof(c->sha), "%s", reply->str);
		freeReplyObject(reply);
	}
	return n->ctx;

fail:
	redisFree(n->ctx);
	n->ctx = NULL;
	return NULL;
}

/*
 * Is reply a redirection ("MOVED slot host:port" or "ASK slot host:port")?
 * Sets *ask, *slot and the node it names (an empty host: the node that
 * answered).
 */
static bool
rc_redirect(RcConn *c, redisReply *reply, const RcAddr *from, bool *ask,
			int *slot, int *node)
{
	const char *p;
	const char *colon;
	char		host[256];
	char	   *end;
	long		v;

	if (reply->type != REDIS_REPLY_ERROR)
		return false;
	if (strncmp(reply->str, "MOVED ", 6) == 0)
	{
		*ask = false;
		p = reply->str + 6;
	}
	else if (strncmp(reply->str, "ASK ", 4) == 0)
	{
		*ask = true;
		p = reply->str + 4;
	}
	else
		return false;
	v = strtol(p, &end, 10);
	if (end == p || *end != ' ' || v < 0 || v >= RC_SLOTS)
		return false;
	*slot = (int) v;
	p = end + 1;
	colon = strrchr(p, ':');
	if (colon == NULL || (size_t) (colon - p) >= sizeof(host))
		return false;
	memcpy(host, p, colon - p);
	host[colon - p] = '\0';
	v = strtol(colon + 1, &end, 10);
	if (end == colon + 1 || *end != '\0' || v < 1 || v > 65535)
		return false;
	*node = rc_node_index(c, host[0] != '\0' ? host : from->host, (int) v);
	return *node >= 0;
}

/* The next reply on a node's connection; NULL after rc_fail(). */
static redisReply *
rc_reply(RcConn *c, RcNode *node)
{
	redisReply *reply = NULL;

	if (redisGetReply(node->ctx, (void **) &reply) != REDIS_OK || reply == NULL)
	{
		rc_fail(c, &node->addr, node->ctx->errstr[0] ? node->ctx->errstr : "no reply");
		return NULL;
	}
	return reply;
}

/* Read and drop the reply to ASKING; false after rc_fail(). */
static bool
rc_skip_reply(RcConn *c, RcNode *node)
{
	redisReply *reply = rc_reply(c, node);

	if (reply == NULL)
		return false;
	freeReplyObject(reply);
	return true;
}

/*
 * Run n commands, each on the node that owns its key's slot, pipelined per
 * node, following redirections; every command's reply (an error reply
 * included) is left in cmds[i].reply for the caller to free.  False, with
 * c->err set, when a node could not be reached or a command was redirected
 * too often; then some replies may be missing and the caller must
 * rc_close() before anything else.
 */
bool
rc_run(RcConn *c, RcCommand *cmds, int n)
{
	int		   *todo = malloc(sizeof(int) * 2 * (n + 1));
	int		   *target = malloc(sizeof(int) * (n + 1));
	bool	   *ask = calloc(n + 1, sizeof(bool));
	int			ntodo = n;
	bool		ok = true;

	if (todo == NULL || target == NULL || ask == NULL)
	{
		snprintf(c->err, sizeof(c->err), "out of memory");
		ok = false;
		goto done;
	}
	for (int i = 0; i < n; i++)
	{
		int			s = cmds[i].key == NULL ? 0 :
			rc_key_slot(cmds[i].key, strlen(cmds[i].key));

		cmds[i].reply = NULL;
		todo[i] = i;
		/* a slot no node serves yet: ask any, it redirects or refuses */
		target[i] = c->slot_node[s] >= 0 ? c->slot_node[s] : 0;
	}

	for (int round = 0; ntodo > 0; round++)
	{
		int		   *next = todo + n + 1;
		int			nnext = 0;

		if (round > RC_MAX_REDIRECTS)
		{
			snprintf(c->err, sizeof(c->err), "a command was redirected more than %d times",
					 RC_MAX_REDIRECTS);
			ok = false;
			goto done;
		}
		for (int k = 0; k < ntodo; k++)
		{
			int			i = todo[k];
			redisContext *ctx = rc_node(c, target[i]);

			if (ctx == NULL ||
				(ask[i] && redisAppendCommand(ctx, "ASKING") != REDIS_OK) ||
				redisAppendCommandArgv(ctx, cmds[i].argc, cmds[i].argv, NULL) != REDIS_OK)
			{
				if (ctx != NULL)
					rc_fail(c, &c->nodes[target[i]].addr, "out of memory");
				ok = false;
				goto done;
			}
		}
		/* replies come back per connection in the order sent */
		for (int k = 0; k < ntodo; k++)
		{
			int			i = todo[k];
			RcNode	   *node = &c->nodes[target[i]];
			redisReply *reply;
			bool		to_ask;
			int			slot;
			int			to;

			if ((ask[i] && !rc_skip_reply(c, node)) ||
				(reply = rc_reply(c, node)) == NULL)
			{
				ok = false;
				goto done;
			}
			if (c->cluster && rc_redirect(c, reply, &node->addr, &to_ask, &slot, &to))
			{
				c->redirects++;
				if (!to_ask)
				{
					c->slot_node[slot] = (short) to;
					c->nodes[to].serves = true;
					c->refresh = true;
				}
				ask[i] = to_ask;
				target[i] = to;
				next[nnext++] = i;
				freeReplyObject(reply);
				continue;
			}
			ask[i] = false;
			cmds[i].reply = reply;
		}
		memmove(todo, next, sizeof(int) * nnext);
		ntodo = nnext;
	}

	/* after a MOVED, read the whole map again from a node that answers */
	if (c->refresh)
	{
		for (int i = 0; i < c->nnodes; i++)
		{
			redisReply *reply;
			RcAddr		addr = c->nodes[i].addr;

			if (c->nodes[i].ctx == NULL)
				continue;
			reply = rc_expect(c, &addr, c->nodes[i].ctx, 2,
							  (const char *[]) {"CLUSTER", "SLOTS"}, REDIS_REPLY_ARRAY);
			if (reply == NULL)
			{
				ok = false;
				goto done;
			}
			ok = rc_load_map(c, &addr, reply);
			freeReplyObject(reply);
			break;
		}
		c->refresh = false;
	}

done:
	free(todo);
	free(target);
	free(ask);
	return ok;
}

/* One command on one node (INFO, SCAN); NULL after rc_fail(). */
redisReply *
rc_node_command(RcConn *c, int node, int argc, const char **argv)
{
	redisContext *ctx = rc_node(c, node);
	redisReply *reply;

	if (ctx == NULL)
		return NULL;
	reply = redisCommandArgv(ctx, argc, argv, NULL);
	if (reply == NULL)
		rc_fail(c, &c->nodes[node].addr, ctx->errstr);
	return reply;
}

/* What rc_open() found, for messages: "Redis at host:port" or a cluster. */
const char *
rc_describe(RcConn *c, char *buf, size_t len)
{
	int			primaries = 0;

	if (!c->cluster)
	{
		snprintf(buf, len, "Redis at %s:%d", c->nodes[0].addr.host,
				 c->nodes[0].addr.port);
		return buf;
	}
	for (int i = 0; i < c->nnodes; i++)
		if (c->nodes[i].serves)
			primaries++;
	snprintf(buf, len, "Redis Cluster of %d primaries", primaries);
	return buf;
}

#endif							/* USE_HIREDIS */
