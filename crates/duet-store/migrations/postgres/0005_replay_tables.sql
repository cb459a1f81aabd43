-- Duet's PostgreSQL schema, version 5: replay tables keyed by a per-task integer, and the
-- Leader's replays found when a job claims reports, not on upload.
--
-- * `replay_tasks`: a small integer key per task ID (both roles share it), created when a replay
--   table first needs it and never deleted. The replay tables' keys use it instead of the
--   32-byte task ID: their index entries are about half as large, compare faster and fill fewer
--   pages (so fewer full-page images in the WAL after each checkpoint).
-- * `claimed_report_ids` replaces `report_ids` and holds the IDs of the reports jobs have
--   claimed. An upload now only queues its reports, so the path clients wait on touches no
--   random-key index; job creation admits the IDs of the reports it claims and drops those
--   already there, and repeats within the queue, keeping the first upload. The IDs of the
--   reports still queued are not carried over: job creation admits them when it claims those
--   reports.
-- * `helper_report_ids` is rebuilt on the new key.
-- * The Helper's stored responses and the aggregate shares, like the queued payloads (version
--   4), are stored without a compression attempt: they hold ciphertexts, random report IDs and
--   secret shares, which do not compress.
-- * Queued reports carry the ID of the transaction that uploaded them (`upload_xid`, which
--   grows with each upload batch), and jobs claim them in that order rather than by time, so
--   that of two uploads of one ID the first is claimed first and the second is the replay.
--   Uploads append to the new index as they did to the old one.
--
-- A replica of an earlier version then fails its uploads and Helper jobs instead of recording IDs
-- where job creation would take its reports for replays.

CREATE TABLE replay_tasks (
    task_key INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id  BYTEA NOT NULL UNIQUE
);
INSERT INTO replay_tasks (task_id)
SELECT task_id FROM report_ids
UNION SELECT task_id FROM report_queue
UNION SELECT task_id FROM helper_report_ids;

CREATE TABLE claimed_report_ids (
    task_key    INTEGER NOT NULL,
    report_id   BYTEA NOT NULL,
    client_time BIGINT NOT NULL, -- for expiry of old IDs
    PRIMARY KEY (task_key, report_id)
);
INSERT INTO claimed_report_ids (task_key, report_id, client_time)
SELECT k.task_key, r.report_id, r.client_time
FROM report_ids AS r JOIN replay_tasks AS k USING (task_id)
WHERE NOT EXISTS (
    SELECT 1 FROM report_queue AS q WHERE q.task_id = r.task_id AND q.report_id = r.report_id
);
DROP TABLE report_ids;

ALTER TABLE helper_report_ids RENAME TO helper_report_ids_v4;
ALTER INDEX helper_report_ids_pkey RENAME TO helper_report_ids_v4_pkey;
CREATE TABLE helper_report_ids (
    task_key  INTEGER NOT NULL,
    report_id BYTEA NOT NULL,
    PRIMARY KEY (task_key, report_id)
);
INSERT INTO helper_report_ids (task_key, report_id)
SELECT k.task_key, h.report_id FROM helper_report_ids_v4 AS h JOIN replay_tasks AS k USING (task_id);
DROP TABLE helper_report_ids_v4;

ALTER TABLE report_queue ADD COLUMN upload_xid XID8 NOT NULL DEFAULT pg_current_xact_id();
DROP INDEX report_queue_order;
CREATE INDEX report_queue_order ON report_queue (task_id, upload_xid);

ALTER TABLE helper_aggregation_jobs ALTER COLUMN response SET STORAGE EXTERNAL;
ALTER TABLE batch_aggregations ALTER COLUMN aggregate_share SET STORAGE EXTERNAL;
