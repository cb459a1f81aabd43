-- Duet's PostgreSQL schema, version 7: the Helper's report IDs in runs.
--
-- Under a key of (task, report ID), each new random ID went into one unique B-tree at a random
-- leaf among all of the history's: a descent, a dirtied page and, after each checkpoint, a whole
-- page in the write-ahead log, all of which grew with the history. Now `helper_report_ids` is
-- keyed by (run, task, report ID). New IDs go into the open run (`helper_replay_state.open_run`),
-- which stays small: a process closes it, by opening the next, once it knows of about 100,000
-- IDs in it. A closed run only loses IDs (task deletion). An ID must be in no closed run either:
-- each process keeps a filter of the closed runs, and probes them only for the IDs the filter
-- cannot rule out. Writers hold an advisory lock shared and closing takes it exclusive, so that
-- no ID can commit into two runs.
--
-- The IDs stored so far become run 0, closed. `run` has no default, so a replica of an earlier
-- version fails its Helper jobs instead of writing IDs where this version's checks would miss
-- them.

ALTER TABLE helper_report_ids ADD COLUMN run INTEGER NOT NULL DEFAULT 0;
ALTER TABLE helper_report_ids ALTER COLUMN run DROP DEFAULT;
ALTER TABLE helper_report_ids DROP CONSTRAINT helper_report_ids_pkey;
ALTER TABLE helper_report_ids ADD PRIMARY KEY (run, task_key, report_id);

CREATE TABLE helper_replay_state (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    open_run  INTEGER NOT NULL
);
INSERT INTO helper_replay_state (open_run) VALUES (1);
