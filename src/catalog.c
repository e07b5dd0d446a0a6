/*-------------------------------------------------------------------------
 *
 * catalog.c
 *		Domains declared in SQL: cqrs.aggregate_type and cqrs.command_type,
 *		the functions that manage them, and what cqrs.submit() reads of
 *		them.
 *
 * Each backend keeps the command types it has used in a hash table.  A
 * statement trigger on cqrs.command_type sends a relcache invalidation of
 * that table at commit, and the callback here empties the cache: a
 * backend sees a new or dropped definition from its next command, without
 * reading the table on every call.
 *
 * A payload is checked against the composite type its command type names:
 * it must be a JSON object with no key the type does not have, each value
 * of the JSON type its field's type takes, and each converted by that
 * type's own input function, so that a domain's NOT NULL and CHECK
 * constraints and a typmod's length apply with PostgreSQL's own errors
 * (23502, 23514, 22001, 22P02, ...).  A key missing from the payload is a
 * NULL field.  The error context names the key.
 *
 * A validator function runs as the role that declared the command type,
 * with the security restrictions of a function run on another role's
 * behalf (SECURITY_RESTRICTED_OPERATION), never as the caller or the
 * extension's owner.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/regproc.h"
#include "utils/syscache.h"
#include "utils/typcache.h"

#include "cqrs.h"

PG_FUNCTION_INFO_V1(command_type_changed);
PG_FUNCTION_INFO_V1(create_aggregate_type);
PG_FUNCTION_INFO_V1(create_command_type);
PG_FUNCTION_INFO_V1(drop_command_type);
PG_FUNCTION_INFO_V1(drop_aggregate_type);

#define CATALOG_NAME_MAX	63

/* The cache of command types, and the table it caches. */
static HTAB *command_types = NULL;
static Oid	command_type_relid = InvalidOid;

static void
catalog_forget(void)
{
	if (command_types != NULL)
		hash_destroy(command_types);
	command_types = NULL;
}

static void
catalog_relcache_changed(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == command_type_relid)
		catalog_forget();
}

/* a payload type or validator dropped or made again */
static void
catalog_syscache_changed(Datum arg, int cacheid, uint32 hashvalue)
{
	catalog_forget();
}

/*
 * The definition of a command type, or NULL when there is none.  Read
 * once per backend, until a change to cqrs.command_type commits.
 */
const CqrsCommandDef *
cqrs_command_def(const char *name)
{
	static SPIPlanPtr plan = NULL;
	static const char *sql =
		"SELECT aggregate_type, creates, builtin,"
		" CAST(pg_catalog.to_regtype(payload_type) AS pg_catalog.oid),"
		" CAST(pg_catalog.to_regprocedure(validator) AS pg_catalog.oid),"
		" CAST(owner AS pg_catalog.oid),"
		" EXISTS (SELECT FROM pg_catalog.pg_roles AS r"
		"         WHERE r.oid OPERATOR(pg_catalog.=) CAST(owner AS pg_catalog.oid)),"
		" payload_type, validator"
		" FROM cqrs.command_type WHERE name OPERATOR(pg_catalog.=) $1";
	char		key[NAMEDATALEN];
	CqrsCommandDef *def;
	bool		found;
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1];
	CqrsOwnerScope scope;
	static bool registered = false;

	if (strlen(name) > CATALOG_NAME_MAX)
		return NULL;
	if (!registered)
	{
		CacheRegisterRelcacheCallback(catalog_relcache_changed, (Datum) 0);
		CacheRegisterSyscacheCallback(TYPEOID, catalog_syscache_changed, (Datum) 0);
		CacheRegisterSyscacheCallback(PROCOID, catalog_syscache_changed, (Datum) 0);
		registered = true;
	}
	command_type_relid = cqrs_relid(CQRS_REL_COMMAND_TYPE);
	if (command_types == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = NAMEDATALEN;
		ctl.entrysize = sizeof(CqrsCommandDef);
		ctl.hcxt = CacheMemoryContext;
		command_types = hash_create("cqrs command types", 16, &ctl,
									HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	}
	memset(key, 0, sizeof(key));
	strlcpy(key, name, sizeof(key));
	def = hash_search(command_types, key, HASH_FIND, &found);
	if (found)
		return def->exists ? def : NULL;

	values[0] = CStringGetTextDatum(name);
	cqrs_spi_connect_as_owner(&scope);
	(void) cqrs_exec(cqrs_keep_plan(&plan, sql, 1, argtypes), values, NULL, 1,
					 SPI_OK_SELECT);
	/* the cache may have been emptied by an invalidation meanwhile */
	if (command_types == NULL)
	{
		cqrs_spi_finish(&scope);
		return cqrs_command_def(name);
	}
	def = hash_search(command_types, key, HASH_ENTER, &found);
	def->exists = (SPI_processed == 1);
	if (def->exists)
	{
		HeapTuple	tup = SPI_tuptable->vals[0];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		char	   *agg = TextDatumGetCString(SPI_getbinval(tup, desc, 1, &isnull));
		Datum		d;

		strlcpy(def->aggregate_type, agg, sizeof(def->aggregate_type));
		def->creates = DatumGetBool(SPI_getbinval(tup, desc, 2, &isnull));
		def->builtin = DatumGetBool(SPI_getbinval(tup, desc, 3, &isnull));
		d = SPI_getbinval(tup, desc, 4, &isnull);
		def->payload_type = isnull ? InvalidOid : DatumGetObjectId(d);
		d = SPI_getbinval(tup, desc, 5, &isnull);
		def->validator = isnull ? InvalidOid : DatumGetObjectId(d);
		def->owner = DatumGetObjectId(SPI_getbinval(tup, desc, 6, &isnull));
		for (int c = 4; c <= 5; c++)
		{
			char	   *named = SPI_getvalue(tup, desc, c + 4);

			(void) SPI_getbinval(tup, desc, c, &isnull);
			if (named != NULL && isnull)
			{
				(void) hash_search(command_types, key, HASH_REMOVE, NULL);
				ereport(ERROR,
						(errcode(c == 4 ? ERRCODE_UNDEFINED_OBJECT : ERRCODE_UNDEFINED_FUNCTION),
						 errmsg("%s %s of command type \"%s\" does not exist",
								c == 4 ? "payload type" : "validator", named, name),
						 errhint("Create it again, or drop the command type and declare it again.")));
			}
		}
		if (!DatumGetBool(SPI_getbinval(tup, desc, 7, &isnull)))
		{
			/* read again next time */
			(void) hash_search(command_types, key, HASH_REMOVE, NULL);
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("the role that declared command type \"%s\" no longer exists", name),
					 errhint("Drop the command type and declare it again as an existing role.")));
		}
	}
	cqrs_spi_finish(&scope);
	return def->exists ? def : NULL;
}

/* Error context: the payload key being checked. */
static void
catalog_key_context(void *arg)
{
	const char **names = arg;

	errcontext("payload key \"%s\" of command type %s", names[0], names[1]);
}

/*
 * The JSON value v as the text its field's input function takes.
 */
static char *
catalog_json_text(JsonbValue *v)
{
	switch (v->type)
	{
		case jbvString:
			return pnstrdup(v->val.string.val, v->val.string.len);
		case jbvNumeric:
			return DatumGetCString(DirectFunctionCall1(numeric_out,
													   NumericGetDatum(v->val.numeric)));
		case jbvBool:
			return pstrdup(v->val.boolean ? "true" : "false");
		case jbvBinary:
			return JsonbToCString(NULL, v->val.binary.data, v->val.binary.len);
		default:
			elog(ERROR, "unexpected JSON value of type %d", (int) v->type);
			return NULL;
	}
}

/* The JSON type a value must have for a field of type typid, as a word. */
static const char *
catalog_json_kind(Oid typid)
{
	Oid			base = getBaseType(typid);
	char		category;
	bool		preferred;

	if (base == JSONBOID || base == JSONOID)
		return NULL;			/* anything */
	get_type_category_preferred(base, &category, &preferred);
	switch (category)
	{
		case TYPCATEGORY_NUMERIC:
			return "number";
		case TYPCATEGORY_BOOLEAN:
			return "boolean";
		default:
			return "string";
	}
}

static bool
catalog_json_fits(JsonbValue *v, const char *kind)
{
	if (kind == NULL)
		return true;
	if (strcmp(kind, "number") == 0)
		return v->type == jbvNumeric;
	if (strcmp(kind, "boolean") == 0)
		return v->type == jbvBool;
	return v->type == jbvString;
}

/*
 * Refuse a payload (a JSON object) with a key not among keys[0..nkeys):
 * 22023, naming the key and, when there is one, the payload type.
 */
void
cqrs_check_payload_keys(Jsonb *payload, const char *const *keys, int nkeys,
						const char *type_name, Oid payload_type)
{
	JsonbIterator *it = JsonbIteratorInit(&payload->root);
	JsonbValue	v;
	JsonbIteratorToken tok;

	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		bool		known = false;

		if (tok != WJB_KEY)
			continue;
		for (int i = 0; i < nkeys && !known; i++)
			known = ((int) strlen(keys[i]) == v.val.string.len &&
					 memcmp(keys[i], v.val.string.val, v.val.string.len) == 0);
		if (!known)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("payload key \"%.*s\" is not declared for command type %s",
							(int) v.val.string.len, v.val.string.val, type_name),
					 OidIsValid(payload_type) ?
					 errdetail("Its payload type %s has no field of that name.",
							   format_type_be(payload_type)) : 0));
	}
}

/*
 * Check payload, a JSON object, against the command type's composite
 * payload type; see the head of this file.
 */
void
cqrs_check_payload(const CqrsCommandDef *def, const char *type_name,
				   Jsonb *payload)
{
	TupleDesc	desc;
	const char **keys;
	int			nkeys = 0;
	ErrorContextCallback errcallback;
	const char *names[2];

	if (!OidIsValid(def->payload_type))
		return;

	desc = lookup_rowtype_tupdesc(def->payload_type, -1);
	keys = palloc(sizeof(char *) * desc->natts);
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (!att->attisdropped)
			keys[nkeys++] = NameStr(att->attname);
	}
	cqrs_check_payload_keys(payload, keys, nkeys, type_name, def->payload_type);

	/* every field: the JSON type, then the field type's own input */
	names[1] = type_name;
	errcallback.callback = catalog_key_context;
	errcallback.arg = names;
	errcallback.previous = error_context_stack;
	error_context_stack = &errcallback;
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		JsonbValue *found;
		char	   *str = NULL;
		Oid			input;
		Oid			ioparam;
		const char *kind;

		if (att->attisdropped)
			continue;
		names[0] = NameStr(att->attname);
		found = getKeyJsonValueFromContainer(&payload->root, NameStr(att->attname),
											 strlen(NameStr(att->attname)), NULL);
		if (found != NULL && found->type != jbvNull)
		{
			kind = catalog_json_kind(att->atttypid);
			if (!catalog_json_fits(found, kind))
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("payload key \"%s\" must be a JSON %s", names[0], kind),
						 errdetail("Field \"%s\" of %s is of type %s.", names[0],
								   format_type_be(def->payload_type),
								   format_type_be(att->atttypid))));
			str = catalog_json_text(found);
		}
		getTypeInputInfo(att->atttypid, &input, &ioparam);
		(void) OidInputFunctionCall(input, str, ioparam, att->atttypmod);
	}
	error_context_stack = errcallback.previous;
	ReleaseTupleDesc(desc);
}

/*
 * Run the command type's validator, if it has one, as the role that
 * declared the command type.
 */
void
cqrs_run_validator(const CqrsCommandDef *def, text *aggregate_id,
				   Jsonb *payload)
{
	Oid			save_userid;
	int			save_sec;

	if (!OidIsValid(def->validator))
		return;
	/* fmgr checks no privilege: the declaring role must still have it */
	if (CQRS_PROC_ACLCHECK(def->validator, def->owner, ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("the role that declared command type \"%s\" may no longer execute its validator %s",
						def->name, format_procedure(def->validator))));
	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(def->owner,
						   save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	PG_TRY();
	{
		(void) OidFunctionCall2(def->validator, PointerGetDatum(aggregate_id),
								JsonbPGetDatum(payload));
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_userid, save_sec);
	}
	PG_END_TRY();
}

/*
 * Statement trigger on cqrs.command_type: every backend empties its cache
 * when the change commits.
 */
Datum
command_type_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("command_type_changed() must be called as a trigger")));
	CacheInvalidateRelcacheByRelid(RelationGetRelid(trigdata->tg_relation));
	return PointerGetDatum(NULL);
}

/* A name argument: not NULL, matching pattern, at most 63 bytes. */
static char *
catalog_name_arg(FunctionCallInfo fcinfo, int argno, const char *what,
				 bool upper)
{
	char	   *name;
	int			len;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
	name = text_to_cstring(PG_GETARG_TEXT_PP(argno));
	len = strlen(name);
	for (int i = 0; i < len; i++)
	{
		char		c = name[i];
		bool		ok = (c == '_' || (c >= '0' && c <= '9' && i > 0) ||
						  (upper ? (c >= 'A' && c <= 'Z') : (c >= 'a' && c <= 'z')));

		if (!ok)
			len = -1;
	}
	if (len <= 0 || len > CATALOG_NAME_MAX || name[0] == '_')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("invalid %s \"%s\"", what, name),
				 errdetail("It must be 1 to %d %s letters, digits and underscores, starting with a letter.",
						   CATALOG_NAME_MAX, upper ? "upper-case" : "lower-case")));
	return name;
}

/* Run a statement on the catalog as the extension's owner; rows processed. */
static uint64
catalog_exec(const char *sql, int nargs, Oid *types, Datum *values,
			 const char *nulls)
{
	CqrsOwnerScope scope;
	uint64		n;
	int			rc;

	cqrs_spi_connect_as_owner(&scope);
	rc = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0);
	if (rc < 0)
		elog(ERROR, "SPI failed on \"%s\": %s", sql, SPI_result_code_string(rc));
	n = SPI_processed;
	cqrs_spi_finish(&scope);
	return n;
}

static bool
catalog_exists(const char *sql, const char *name)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(name)};

	return catalog_exec(sql, 1, types, values, NULL) > 0;
}

/*
 * cqrs.create_aggregate_type(name text) RETURNS void
 */
Datum
create_aggregate_type(PG_FUNCTION_ARGS)
{
	char	   *name = catalog_name_arg(fcinfo, 0, "aggregate type name", false);
	Oid			types[2] = {TEXTOID, OIDOID};
	Datum		values[2];

	if (catalog_exists("SELECT FROM cqrs.aggregate_type WHERE name OPERATOR(pg_catalog.=) $1", name))
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("aggregate type \"%s\" already exists", name)));
	values[0] = CStringGetTextDatum(name);
	values[1] = ObjectIdGetDatum(GetUserId());
	(void) catalog_exec("INSERT INTO cqrs.aggregate_type (name, owner)"
						" VALUES ($1, CAST($2 AS pg_catalog.regrole))",
						2, types, values, NULL);
	PG_RETURN_VOID();
}

/*
 * cqrs.create_command_type(name text, aggregate_type text, creates boolean,
 *		payload_type regtype, validator regprocedure) RETURNS void
 */
Datum
create_command_type(PG_FUNCTION_ARGS)
{
	char	   *name = catalog_name_arg(fcinfo, 0, "command type name", true);
	char	   *aggregate = catalog_name_arg(fcinfo, 1, "aggregate type name", false);
	Oid			payload_type = PG_ARGISNULL(3) ? InvalidOid : PG_GETARG_OID(3);
	Oid			validator = PG_ARGISNULL(4) ? InvalidOid : PG_GETARG_OID(4);
	Oid			types[6] = {TEXTOID, TEXTOID, BOOLOID, TEXTOID, TEXTOID, OIDOID};
	Datum		values[6];
	char		nulls[6] = {' ', ' ', ' ', ' ', ' ', ' '};

	if (PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("creates must not be null")));
	if (!catalog_exists("SELECT FROM cqrs.aggregate_type WHERE name OPERATOR(pg_catalog.=) $1", aggregate))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("aggregate type \"%s\" does not exist", aggregate),
				 errhint("Declare it with cqrs.create_aggregate_type().")));
	if (catalog_exists("SELECT FROM cqrs.command_type WHERE name OPERATOR(pg_catalog.=) $1", name))
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("command type \"%s\" already exists", name)));

	if (OidIsValid(payload_type))
	{
		if (get_typtype(payload_type) != TYPTYPE_COMPOSITE)
			ereport(ERROR,
					(errcode(ERRCODE_WRONG_OBJECT_TYPE),
					 errmsg("payload type %s is not a composite type",
							format_type_be(payload_type)),
					 errhint("Declare the payload with CREATE TYPE ... AS (field type, ...).")));
		if (CQRS_TYPE_ACLCHECK(payload_type, GetUserId(), ACL_USAGE) != ACLCHECK_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied for type %s", format_type_be(payload_type))));
	}
	if (OidIsValid(validator))
	{
		HeapTuple	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(validator));
		Form_pg_proc proc;
		bool		fits;

		if (!HeapTupleIsValid(tup))
			elog(ERROR, "cache lookup failed for function %u", validator);
		proc = (Form_pg_proc) GETSTRUCT(tup);
		fits = (proc->pronargs == 2 && proc->proargtypes.values[0] == TEXTOID &&
				proc->proargtypes.values[1] == JSONBOID &&
				proc->prorettype == VOIDOID && !proc->proretset &&
				proc->prokind == PROKIND_FUNCTION);
		ReleaseSysCache(tup);
		if (!fits)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_FUNCTION_DEFINITION),
					 errmsg("validator %s must take (aggregate_id text, payload jsonb) and return void",
							format_procedure(validator))));
		if (CQRS_PROC_ACLCHECK(validator, GetUserId(), ACL_EXECUTE) != ACLCHECK_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied for function %s", format_procedure(validator))));
	}

	values[0] = CStringGetTextDatum(name);
	values[1] = CStringGetTextDatum(aggregate);
	values[2] = PG_GETARG_DATUM(2);
	values[3] = OidIsValid(payload_type) ?
		CStringGetTextDatum(format_type_be_qualified(payload_type)) : (Datum) 0;
	values[4] = OidIsValid(validator) ?
		CStringGetTextDatum(format_procedure_qualified(validator)) : (Datum) 0;
	values[5] = ObjectIdGetDatum(GetUserId());
	if (!OidIsValid(payload_type))
		nulls[3] = 'n';
	if (!OidIsValid(validator))
		nulls[4] = 'n';
	(void) catalog_exec("INSERT INTO cqrs.command_type"
						" (name, aggregate_type, creates, payload_type, validator, owner)"
						" VALUES ($1, $2, $3, $4, $5, CAST($6 AS pg_catalog.regrole))",
						6, types, values, nulls);
	PG_RETURN_VOID();
}

/*
 * Drop the declared row named "name" of a catalog table: refused for a
 * built-in one (0A000) and while in_use_sql finds a row that depends on it
 * (2BP01, saying in_use, with a detail or a hint); 42704 when there is
 * none.
 */
static void
catalog_drop(const char *what, const char *name, const char *builtin_sql,
			 const char *in_use_sql, const char *in_use, const char *in_use_detail,
			 const char *in_use_hint, const char *delete_sql)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(name)};

	if (catalog_exists(builtin_sql, name))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("%s \"%s\" is built in", what, name)));
	if (catalog_exists(in_use_sql, name))
		ereport(ERROR,
				(errcode(ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST),
				 errmsg("%s \"%s\" %s", what, name, in_use),
				 in_use_detail ? errdetail("%s", in_use_detail) : 0,
				 in_use_hint ? errhint("%s", in_use_hint) : 0));
	if (catalog_exec(delete_sql, 1, types, values, NULL) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("%s \"%s\" does not exist", what, name)));
}

/*
 * cqrs.drop_command_type(name text) RETURNS void: only a declared type, and
 * only while no command of it is in the log (whose rows stay as they are).
 */
Datum
drop_command_type(PG_FUNCTION_ARGS)
{
	catalog_drop("command type",
				 catalog_name_arg(fcinfo, 0, "command type name", true),
				 "SELECT FROM cqrs.command_type"
				 " WHERE name OPERATOR(pg_catalog.=) $1 AND builtin",
				 "SELECT FROM cqrs.command_log"
				 " WHERE command_type OPERATOR(pg_catalog.=) $1 LIMIT 1",
				 "has commands in the command log",
				 "The log is append-only: its commands keep their type.", NULL,
				 "DELETE FROM cqrs.command_type WHERE name OPERATOR(pg_catalog.=) $1");
	PG_RETURN_VOID();
}

/*
 * cqrs.drop_aggregate_type(name text) RETURNS void: only a declared type
 * no command type acts on.
 */
Datum
drop_aggregate_type(PG_FUNCTION_ARGS)
{
	catalog_drop("aggregate type",
				 catalog_name_arg(fcinfo, 0, "aggregate type name", false),
				 "SELECT FROM cqrs.aggregate_type"
				 " WHERE name OPERATOR(pg_catalog.=) $1 AND builtin",
				 "SELECT FROM cqrs.command_type"
				 " WHERE aggregate_type OPERATOR(pg_catalog.=) $1 LIMIT 1",
				 "has command types", NULL,
				 "Drop them with cqrs.drop_command_type() first.",
				 "DELETE FROM cqrs.aggregate_type WHERE name OPERATOR(pg_catalog.=) $1");
	PG_RETURN_VOID();
}
