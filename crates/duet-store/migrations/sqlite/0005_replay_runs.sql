-- Duet's SQLite schema, version 5: the sorted replay tables hold runs, one per merge, compacted.
--
-- Each merge of a replay log inserted its report IDs, which are random, into `report_ids` or
-- `helper_report_ids`, one B-tree sorted by (task key, report ID): every merge rewrote about every
-- leaf page of the table, so the cost of a merge grew with the table. The tables are now keyed by
-- (run, task key, report ID). A merge appends its IDs, sorted, as a new run whose number is larger
-- than any before, which writes only new pages. `replay_runs` lists each table's runs, so that a
-- replay check probes each one.
--
-- Runs are compacted so that a check probes a bounded number of them: a run's level is the
-- number of times its ID count holds eight times a merge's (100,000), and once a level has eight
-- runs they are merged into one, of the next level, a slice of the key space per transaction.
-- Each ID is rewritten about once per level. `replay_logs` holds the compaction under way: the
-- run it writes (0 if none) and its next slice (from 1) of how many; the runs it moves name that
-- run in `into_run`.
--
-- The IDs already merged become run 0.

CREATE TABLE replay_runs (
    name     TEXT    NOT NULL CHECK (name IN ('leader', 'helper')),
    run      INTEGER NOT NULL,
    ids      INTEGER NOT NULL,           -- IDs written to the run (task deletions leave it)
    into_run INTEGER NOT NULL DEFAULT 0, -- the run a compaction under way moves it into
    PRIMARY KEY (name, run)
) WITHOUT ROWID;

INSERT INTO replay_runs (name, run, ids)
VALUES ('leader', 0, (SELECT COUNT(*) FROM report_ids)),
       ('helper', 0, (SELECT COUNT(*) FROM helper_report_ids));

ALTER TABLE replay_logs ADD COLUMN compact_run INTEGER NOT NULL DEFAULT 0;
ALTER TABLE replay_logs ADD COLUMN compact_slice INTEGER NOT NULL DEFAULT 0;
ALTER TABLE replay_logs ADD COLUMN compact_slices INTEGER NOT NULL DEFAULT 0;

CREATE TABLE report_ids_by_run (
    run       INTEGER NOT NULL,
    task_key  INTEGER NOT NULL,
    report_id BLOB    NOT NULL,
    PRIMARY KEY (run, task_key, report_id)
) WITHOUT ROWID;

INSERT INTO report_ids_by_run (run, task_key, report_id)
    SELECT 0, task_key, report_id FROM report_ids ORDER BY task_key, report_id;

DROP TABLE report_ids;
ALTER TABLE report_ids_by_run RENAME TO report_ids;

CREATE TABLE helper_report_ids_by_run (
    run       INTEGER NOT NULL,
    task_key  INTEGER NOT NULL,
    report_id BLOB    NOT NULL,
    PRIMARY KEY (run, task_key, report_id)
) WITHOUT ROWID;

INSERT INTO helper_report_ids_by_run (run, task_key, report_id)
    SELECT 0, task_key, report_id FROM helper_report_ids ORDER BY task_key, report_id;

DROP TABLE helper_report_ids;
ALTER TABLE helper_report_ids_by_run RENAME TO helper_report_ids;
