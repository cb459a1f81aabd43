-- Duet's SQLite schema, version 4: the sorted replay tables key report IDs by a small integer per
-- task instead of the 32-byte task ID.
--
-- `report_ids` and `helper_report_ids` grow with every report ever taken in, and each merge of
-- the log rewrites most of their leaf pages; a row of (task ID, report ID, seq) took about 60
-- bytes, a row of (task key, report ID) about 22, so the tables span about a third of the
-- pages. `seq` was never read back and is gone from the sorted table (the Leader's log keeps it).
--
-- `replay_tasks` maps a task ID to its key. A merge adds the keys of the tasks it moves; rows are
-- never deleted, so a key never changes meaning, and a task deleted and created again keeps its
-- key (its IDs were deleted with it).

CREATE TABLE replay_tasks (
    task_key INTEGER PRIMARY KEY,
    task_id  BLOB NOT NULL UNIQUE
);

INSERT INTO replay_tasks (task_id)
    SELECT task_id FROM report_ids
    UNION SELECT task_id FROM helper_report_ids
    UNION SELECT task_id FROM report_id_log
    UNION SELECT task_id FROM helper_report_id_log;

CREATE TABLE report_ids_by_key (
    task_key  INTEGER NOT NULL,
    report_id BLOB NOT NULL,
    PRIMARY KEY (task_key, report_id)
) WITHOUT ROWID;

INSERT INTO report_ids_by_key (task_key, report_id)
    SELECT k.task_key, r.report_id FROM report_ids AS r JOIN replay_tasks AS k USING (task_id)
    ORDER BY 1, 2;

DROP TABLE report_ids;
ALTER TABLE report_ids_by_key RENAME TO report_ids;

CREATE TABLE helper_report_ids_by_key (
    task_key  INTEGER NOT NULL,
    report_id BLOB NOT NULL,
    PRIMARY KEY (task_key, report_id)
) WITHOUT ROWID;

INSERT INTO helper_report_ids_by_key (task_key, report_id)
    SELECT k.task_key, r.report_id FROM helper_report_ids AS r JOIN replay_tasks AS k USING (task_id)
    ORDER BY 1, 2;

DROP TABLE helper_report_ids;
ALTER TABLE helper_report_ids_by_key RENAME TO helper_report_ids;
