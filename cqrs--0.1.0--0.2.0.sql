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

-- What the functions now say about commands in flight and unknown ids.
COMMENT ON FUNCTION cqrs.wait_for(uuid, interval) IS
	'Wait until the command is processed (applied or dead-lettered); false at the timeout.  A command not in the log is an error on the primary; a standby waits for it';
COMMENT ON FUNCTION cqrs.retry_dead_letter(uuid) IS
	'Project a dead-lettered command again after a fix; true when applied, false when dead-lettered again; an error when it is not dead-lettered';
COMMENT ON FUNCTION cqrs.skip_parked(uuid) IS
	'Stop waiting for the missing predecessor of a parked command: move it to cqrs.dead_letter; an error when it is not parked';
COMMENT ON FUNCTION cqrs.lag_histogram() IS
	'Commit-to-read-model latency of the commands projected from the slot since the server started, per bucket; commands applied by folding the log are not counted';
COMMENT ON FUNCTION cqrs.verify() IS
	'Orders where the read model differs from the fold of the command log, commands not yet projected included; no rows means consistent';
