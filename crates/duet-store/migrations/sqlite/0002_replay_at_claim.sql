-- Duet's SQLite schema, version 2: the Leader's replay protection moves from the upload to the
-- job creator.
--
-- A unique index on random report IDs writes one B-tree page per upload (each ID lands on a
-- page of its own), and that page write was the largest single cost of an upload. Uploads now
-- append to `reports` with no index on the ID. When the job creator claims reports, it inserts
-- their IDs into `report_ids` in one sorted bulk statement; an ID already there (or repeated in
-- the same claim) keeps the row of its first upload, and the repeat is deleted before it joins
-- a job (DAP-09, "Upload Request": the Leader MUST ignore a report whose ID it has seen).
--
-- `reports` now holds only reports waiting for a job or in one: a finished or abandoned job
-- deletes its rows, since `report_ids` alone protects against replays.

CREATE TABLE report_ids (
    task_id   BLOB NOT NULL,
    report_id BLOB NOT NULL,
    seq       INTEGER NOT NULL, -- the `reports` row of the first upload of this ID
    PRIMARY KEY (task_id, report_id)
) WITHOUT ROWID;

INSERT INTO report_ids (task_id, report_id, seq)
    SELECT task_id, report_id, seq FROM reports ORDER BY task_id, report_id;
DELETE FROM reports WHERE payload IS NULL;
DROP INDEX reports_replay;
