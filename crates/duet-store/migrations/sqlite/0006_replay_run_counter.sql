-- Duet's SQLite schema, version 6: replay run numbers come from a counter that never goes down.
--
-- A process whose replay filter another process's merge left behind probes the IDs the filter
-- lacks only in the runs numbered above the highest one its snapshot listed. That holds only if a
-- run number is never used twice. Version 5 numbered a new run MAX(run) + 1, which a task
-- deletion that dropped the highest run could lower. `next_run` now hands the numbers out.

ALTER TABLE replay_logs ADD COLUMN next_run INTEGER NOT NULL DEFAULT 1;

UPDATE replay_logs SET next_run =
    (SELECT COALESCE(MAX(run), 0) + 1 FROM replay_runs WHERE replay_runs.name = replay_logs.name);
