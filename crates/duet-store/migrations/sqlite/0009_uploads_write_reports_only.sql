-- Duet's SQLite schema, version 9: an upload writes `reports` alone.
--
-- An upload batch wrote about eight pages to the log: `reports`' own, about three of the
-- partial index `reports_pending` (appends to an index split its last leaves three ways), the
-- row of `sqlite_sequence` that AUTOINCREMENT keeps, and page 1. Both extras go:
--
-- * `seq` no longer comes from AUTOINCREMENT. An upload takes its first `seq` above both the
--   table's highest row and a floor kept in `report_cursor`: `claimed_seq` covers every report a
--   job or a replay deletion removes (they are all claimed), and `seq_floor` the highest `seq` a
--   task deletion removed. So `seq` still never goes back, and the floor is written only when a
--   task is deleted.
-- * `reports_pending` (reports by task and time, for the collection's "is every report in this
--   interval aggregated?") goes. A job records the times of its reports (`min_time` and
--   `max_time`, set when the job creator claims them), so that question looks only at the rows
--   of the task's active jobs whose times meet the interval (found through
--   `aggregation_jobs_active_times`, one entry per job), and at the reports not yet claimed.
--   Jobs created before this version get the widest times.

CREATE TABLE reports_by_rowid (
    seq         INTEGER PRIMARY KEY, -- above every `seq` issued before (see `put_reports`)
    task_id     BLOB NOT NULL,
    report_id   BLOB NOT NULL,
    client_time INTEGER NOT NULL,
    payload     BLOB NOT NULL       -- the encoded Report
);

INSERT INTO reports_by_rowid (seq, task_id, report_id, client_time, payload)
    SELECT seq, task_id, report_id, client_time, payload FROM reports
    WHERE payload IS NOT NULL ORDER BY seq;

ALTER TABLE report_cursor ADD COLUMN seq_floor INTEGER NOT NULL DEFAULT 0;

UPDATE report_cursor
SET seq_floor = COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'reports'), 0)
WHERE id = 0;

DROP TABLE reports;
ALTER TABLE reports_by_rowid RENAME TO reports;

ALTER TABLE aggregation_jobs ADD COLUMN min_time INTEGER NOT NULL DEFAULT 0;
ALTER TABLE aggregation_jobs ADD COLUMN max_time INTEGER NOT NULL DEFAULT 9223372036854775807;

CREATE INDEX aggregation_jobs_active_times ON aggregation_jobs (task_id, max_time)
    WHERE state = 'active';
