-- Duet's PostgreSQL schema, version 8: the Leader's claimed report IDs in runs, as the Helper's
-- are since version 7.
--
-- Under a key of (task, report ID), each job's random IDs went into one unique B-tree at random
-- leaves among all of the history's, a cost that grew with it. Now `claimed_report_ids` is
-- keyed by (run, task, report ID). Job creation inserts the IDs it claims into the open run
-- (`leader_replay_state.open_run`), which a process closes, by opening the next, once it knows
-- of about 100,000 IDs in it; it probes the closed runs only for the IDs its filter cannot rule
-- out. Job creators hold an advisory lock shared and closing takes it exclusive, so that no ID
-- can commit into two runs.
--
-- The IDs stored so far become run 0, closed. `run` has no default, so a replica of an earlier
-- version fails its job creation instead of writing IDs where this version's checks would miss
-- them.

ALTER TABLE claimed_report_ids ADD COLUMN run INTEGER NOT NULL DEFAULT 0;
ALTER TABLE claimed_report_ids ALTER COLUMN run DROP DEFAULT;
ALTER TABLE claimed_report_ids DROP CONSTRAINT claimed_report_ids_pkey;
ALTER TABLE claimed_report_ids ADD PRIMARY KEY (run, task_key, report_id);

CREATE TABLE leader_replay_state (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    open_run  INTEGER NOT NULL
);
INSERT INTO leader_replay_state (open_run) VALUES (1);
