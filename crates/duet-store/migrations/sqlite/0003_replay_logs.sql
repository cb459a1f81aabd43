-- Duet's SQLite schema, version 3: recent report IDs go to a log before the sorted replay tables.
--
-- Inserting random report IDs into `report_ids` or `helper_report_ids` a few thousand at a time
-- writes about one page per ID once those tables are large. New IDs are now appended to a log
-- (an integer key, so appends fill pages in order) that each process also holds in memory, and
-- the log is merged into its sorted table, in key order, when it reaches a set size. A replay
-- check looks at the log's IDs, then probes the sorted table.
--
-- `replay_logs` numbers each log's generation: a merge empties the log and bumps it (so does
-- deleting a task), which tells every process on the file to reread the log.

CREATE TABLE report_id_log (
    id        INTEGER PRIMARY KEY,
    task_id   BLOB NOT NULL,
    report_id BLOB NOT NULL,
    seq       INTEGER NOT NULL -- the `reports` row of the first upload of this ID
);

CREATE TABLE helper_report_id_log (
    id        INTEGER PRIMARY KEY,
    task_id   BLOB NOT NULL,
    report_id BLOB NOT NULL
);

CREATE TABLE replay_logs (
    name       TEXT PRIMARY KEY CHECK (name IN ('leader', 'helper')),
    generation INTEGER NOT NULL
);

INSERT INTO replay_logs (name, generation) VALUES ('leader', 0), ('helper', 0);

-- Version 2 copied the IDs of reports not yet claimed into `report_ids`; they are admitted
-- when claimed now, like every other report (a replay among them keeps only its first upload).
DELETE FROM report_ids WHERE seq > (SELECT claimed_seq FROM report_cursor WHERE id = 0);
