-- Installing the extension: objects, roles, and nothing for PUBLIC.
CREATE EXTENSION cqrs;

-- The extension cannot be moved or installed into another schema.
SELECT extrelocatable FROM pg_extension WHERE extname = 'cqrs';

-- The objects DESIGN.md names, all in schema cqrs.
SELECT pg_describe_object(classid, objid, objsubid) AS member
  FROM pg_depend
 WHERE refclassid = 'pg_extension'::regclass
   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'cqrs')
   AND deptype = 'e'
 ORDER BY 1;

-- Column shapes of the tables and of the receipt type.
SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) AS type,
       a.attnotnull
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
 WHERE c.relnamespace = 'cqrs'::regnamespace
   AND c.relkind IN ('r', 'c') AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY c.relname, a.attnum;

-- Unique keys of the log and the read model's lookup index.
SELECT indexrelid::regclass AS index, indisunique,
       pg_get_indexdef(indexrelid) AS definition
  FROM pg_index
 WHERE indrelid IN ('cqrs.command_log'::regclass, 'cqrs.read_model'::regclass)
 ORDER BY 1::text;

-- The three roles exist and cannot log in.
SELECT rolname, rolcanlogin, rolsuper FROM pg_roles
 WHERE rolname IN ('cqrs_writer', 'cqrs_reader', 'cqrs_admin') ORDER BY 1;

-- No object of the schema grants anything to PUBLIC (grantee 0).
SELECT 'schema' AS kind, nspname AS name FROM pg_namespace,
       aclexplode(coalesce(nspacl, acldefault('n', nspowner))) a
 WHERE nspname = 'cqrs' AND a.grantee = 0
UNION ALL
SELECT 'relation', relname FROM pg_class,
       aclexplode(coalesce(relacl, acldefault('r', relowner))) a
 WHERE relnamespace = 'cqrs'::regnamespace AND a.grantee = 0
UNION ALL
SELECT 'function', proname FROM pg_proc,
       aclexplode(coalesce(proacl, acldefault('f', proowner))) a
 WHERE pronamespace = 'cqrs'::regnamespace AND a.grantee = 0
UNION ALL
SELECT 'type', typname FROM pg_type,
       aclexplode(coalesce(typacl, acldefault('T', typowner))) a
 WHERE typnamespace = 'cqrs'::regnamespace AND a.grantee = 0
   AND typtype = 'c' AND typrelid IN (SELECT oid FROM pg_class WHERE relkind = 'c');

-- Every function is C, or SQL whose body was parsed at creation (BEGIN
-- ATOMIC) and runs with a fixed search_path: nothing a caller's
-- search_path could redirect.  None is SECURITY DEFINER.
SELECT proname, l.lanname, prosecdef, prosqlbody IS NOT NULL AS atomic_body,
       proconfig
  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
 WHERE pronamespace = 'cqrs'::regnamespace ORDER BY 1, 2;

-- A schema named cqrs that already exists is never adopted.
DROP EXTENSION cqrs;
CREATE SCHEMA cqrs;
CREATE EXTENSION cqrs;
DROP SCHEMA cqrs;
CREATE EXTENSION cqrs;
-- A second CREATE EXTENSION (as in another database) reuses the roles.
DROP EXTENSION cqrs;
CREATE EXTENSION cqrs;
SELECT count(*) AS cqrs_roles FROM pg_roles WHERE rolname LIKE 'cqrs\_%';

-- Every object of the extension says what it is in psql (\dt+, \df+, \dT+).
SELECT pg_describe_object(d.classid, d.objid, 0) AS without_comment
  FROM pg_depend d
 WHERE d.refclassid = 'pg_extension'::regclass
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'cqrs')
   AND d.deptype = 'e'
   AND obj_description(d.objid, d.classid::regclass::text) IS NULL
 ORDER BY 1;

-- Order and user ids compare by bytes (the "C" collation) everywhere.
SELECT c.relname || '.' || a.attname AS id_column, co.collname
  FROM pg_attribute a
  JOIN pg_class c ON c.oid = a.attrelid
  JOIN pg_collation co ON co.oid = a.attcollation
 WHERE c.relnamespace = 'cqrs'::regnamespace AND c.relkind = 'r'
   AND a.attname IN ('aggregate_id', 'order_id', 'user_id')
 ORDER BY 1;
