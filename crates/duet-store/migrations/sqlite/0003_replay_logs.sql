-- Duet's SQLite schema, version 3: recent report IDs go to a log before the sorted replay tables.
--
-- Inserting random report IDs into `report_ids` or `helper_report_ids` a few thousand at a time
-- writes about one page per ID once those tables are large. New IDs are now appended to a log
-- (an increasing key, so appends fill pages in order) that each process also holds in memory,
-- and the log is merged into its sorted table, in key order, once enough IDs have been logged;
-- a merge is spread over several transactions, each moving the IDs of one slice of the key
-- space. A replay check looks at the log's IDs, then probes the sorted table.
--
-- `replay_logs` holds each log's merge progress and its generation: the end of a merge bumps
-- it (so does deleting a task), which tells every process on the file to reread the log. Log
-- keys are AUTOINCREMENT, never reused, so a process can read just the rows above the last one
-- it read.

CREATE TABLE report_id_log (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id   BLOB NOT NULL,
    report_id BLOB NOT NULL,
    seq       INTEGER NOT NULL -- the `reports` row of the first upload of this ID
);

CREATE TABLE helper_report_id_log (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id   BLOB NOT NULL,
    report_id BLOB NOT NULL
);

CREATE TABLE replay_logs (
    name        TEXT PRIMARY KEY CHECK (name IN ('leader', 'helper')),
    generation  INTEGER NOT NULL,
    merge_slice INTEGER NOT NULL, -- the next slice a merge under way moves, from 1; 0 if none
    merge_mark  INTEGER NOT NULL  -- the log's last key when the last merge started
);

INSERT INTO replay_logs (name, generation, merge_slice, merge_mark)
VALUES ('leader', 0, 0, 0), ('helper', 0, 0, 0);

-- Version 2 copied the IDs of reports not yet claimed into `report_ids`; they are admitted
-- when claimed now, like every other report (a replay among them keeps only its first upload).
DELETE FROM report_ids WHERE seq > (SELECT claimed_seq FROM report_cursor WHERE id = 0);
