-- Duet's PostgreSQL schema, version 5: the Leader finds replays when a job claims reports, not on
-- upload.
--
-- An upload now only queues its reports, so the path clients wait on touches no random-key
-- index. Job creation admits the IDs of the reports it claims to the replay table, and drops
-- those already there and repeats within the queue (keeping the first upload).
--
-- The replay table is renamed after what it now holds, the IDs of claimed reports; a replica of
-- an earlier version, which would record IDs on upload (and so have its reports taken for
-- replays), then fails its uploads instead. The IDs of the reports still queued leave it: job
-- creation admits them when it claims those reports.

ALTER TABLE report_ids RENAME TO claimed_report_ids;
ALTER INDEX report_ids_pkey RENAME TO claimed_report_ids_pkey;

DELETE FROM claimed_report_ids AS r
USING report_queue AS q
WHERE r.task_id = q.task_id AND r.report_id = q.report_id;
