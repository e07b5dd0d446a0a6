/* cqrs--0.1.0--0.2.0.sql */

\echo Use "ALTER EXTENSION cqrs UPDATE TO '0.2.0'" to load this file. \quit

-- pg_dump leaves an extension's tables out of a dump unless marked: the
-- command log is the source of truth, so a backup made the usual way
-- (pg_dump, pg_dump -Fc with pg_restore) must carry every command and the
-- position of its log_id sequence.  Everything else the projector derives
-- from the log: a restored server's projector folds the log into the
-- read model, the dead letters and the parked commands by itself.
SELECT pg_catalog.pg_extension_config_dump('cqrs.command_log', '');
SELECT pg_catalog.pg_extension_config_dump('cqrs.command_log_log_id_seq', '');
