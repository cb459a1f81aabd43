-- Duet's PostgreSQL schema, version 6: a job claims a range of the report queue instead of
-- copying its reports out of it.
--
-- Until version 5 job creation deleted a job's reports from `report_queue` and wrote them into
-- the job's row as arrays: every payload was written twice, the second time sorted, aggregated
-- and moved out of line (about 30 ms per job of 800 Prio3Histogram(100) reports). Now a job's
-- reports stay in the queue until the job ends, and the job names them as a range of the queue's
-- claim order, (upload_xid, client_time, report_id), from just after `from_*` up to and including
-- `to_*`.
--
-- * `replay_tasks.claimed_*`: the Leader's claim cursor per task, the position of the last
--   report a job has claimed (both roles share the table; the Helper never moves its cursor).
--   Job creation claims only reports uploaded by transactions older than every transaction
--   still running (`pg_snapshot_xmin`), so no upload can later commit behind the cursor (a
--   write transaction left open anywhere on the server holds newer uploads back until it ends).
-- * `aggregation_jobs.from_*` / `to_*`: the job's range. When the job ends, its reports are
--   deleted from the queue in the transaction that ends it.
-- * `report_queue_order` is in claim order, so that job creation reads the next reports after
--   the cursor, and a job its range, straight from the index.
-- * Queued reports name their task by its key (`replay_tasks.task_key`, which every task with
--   queued reports now has) instead of its 32-byte ID: rows and index entries are about 30 bytes
--   shorter, which pays for the index's longer claim order.
--
-- Jobs created before this version keep their arrays (and NULL ranges) until they end. The
-- reports still queued were never claimed, so the cursor starts before all of them.

ALTER TABLE replay_tasks
    ADD COLUMN claimed_xid  XID8 NOT NULL DEFAULT '0',
    ADD COLUMN claimed_time BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN claimed_id   BYTEA NOT NULL DEFAULT '';
-- Job creation finds the tasks with queued reports by their cursors: every such task has one
-- (from now on `put_reports` creates it).
INSERT INTO replay_tasks (task_id) SELECT DISTINCT task_id FROM report_queue ON CONFLICT DO NOTHING;

ALTER TABLE aggregation_jobs
    ADD COLUMN from_xid  XID8,
    ADD COLUMN from_time BIGINT,
    ADD COLUMN from_id   BYTEA,
    ADD COLUMN to_xid    XID8,
    ADD COLUMN to_time   BIGINT,
    ADD COLUMN to_id     BYTEA;

ALTER TABLE report_queue ADD COLUMN task_key INTEGER;
UPDATE report_queue AS q SET task_key = k.task_key
FROM replay_tasks AS k WHERE k.task_id = q.task_id;
ALTER TABLE report_queue ALTER COLUMN task_key SET NOT NULL;
DROP INDEX report_queue_order;
ALTER TABLE report_queue DROP COLUMN task_id;
CREATE INDEX report_queue_order ON report_queue (task_key, upload_xid, client_time, report_id);
