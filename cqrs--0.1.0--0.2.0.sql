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

-- The pause (cqrs.pause()) is an operator's decision a restore must keep.
-- The table's row is written by the first pause, not by the installation:
-- a row the installation made would collide with the dumped one.  No row
-- means projection runs, as a row saying so did.
DELETE FROM cqrs.projector_state WHERE NOT paused;
SELECT pg_catalog.pg_extension_config_dump('cqrs.projector_state', '');
COMMENT ON TABLE cqrs.projector_state IS
	'At most one row, written by cqrs.pause() and cqrs.resume(): whether projection is paused, since when and by whom (no row: running)';

-- Whoever changes the table (a pause, a resume, the restore of a dump),
-- the projectors read it again once the change commits.
CREATE FUNCTION cqrs.projector_state_changed()
RETURNS trigger
AS 'MODULE_PATHNAME', 'projector_state_changed'
LANGUAGE C;
REVOKE ALL ON FUNCTION cqrs.projector_state_changed() FROM PUBLIC;
COMMENT ON FUNCTION cqrs.projector_state_changed() IS
	'Trigger telling the projectors that cqrs.projector_state changed, at commit';
CREATE TRIGGER projector_state_changed
	AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON cqrs.projector_state
	FOR EACH STATEMENT EXECUTE FUNCTION cqrs.projector_state_changed();
