-- Duet's PostgreSQL schema, version 2: the Leader's reports move out of one row that was written
-- three times (inserted, assigned to a job, stripped of its payload) into rows that are written
-- once each.
--
-- * `report_ids`: one row per report ever stored, for replay protection. Inserted on upload and
--   never updated.
-- * `report_queue`: the reports no job has taken yet. Inserted on upload; a job takes its
--   reports by deleting them (a delete writes no new row version and no index entry).
-- * `aggregation_jobs` carries its reports as arrays while it is active, written once when the
--   job is created and cleared when it ends: per job, not per report.
--
-- Existing data moves over: every stored report ID, every unassigned report, and the reports of
-- every active job.

CREATE TABLE report_ids (
    task_id     BYTEA NOT NULL,
    report_id   BYTEA NOT NULL,
    client_time BIGINT NOT NULL, -- for expiry of old IDs
    PRIMARY KEY (task_id, report_id)
);

-- A queue: rows are inserted and deleted, never updated. Vacuum it after every 10,000 deletes
-- rather than after a fifth of the table, so that job creation does not walk long runs of dead
-- index entries.
CREATE TABLE report_queue (
    task_id     BYTEA NOT NULL,
    client_time BIGINT NOT NULL,
    report_id   BYTEA NOT NULL,
    payload     BYTEA NOT NULL -- the encoded Report
) WITH (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 100000
);

-- Job creation takes the oldest reports of a task first.
CREATE INDEX report_queue_order ON report_queue (task_id, client_time, report_id);

ALTER TABLE aggregation_jobs
    ADD COLUMN report_ids   BYTEA[],  -- in (client_time, report_id) order; NULL once ended
    ADD COLUMN client_times BIGINT[], -- likewise, one per report
    ADD COLUMN payloads     BYTEA[];  -- likewise, the encoded Reports
-- Ciphertexts do not compress: store the arrays out of line without trying.
ALTER TABLE aggregation_jobs ALTER COLUMN report_ids SET STORAGE EXTERNAL;
ALTER TABLE aggregation_jobs ALTER COLUMN client_times SET STORAGE EXTERNAL;
ALTER TABLE aggregation_jobs ALTER COLUMN payloads SET STORAGE EXTERNAL;

-- count_unaggregated_reports reads a task's active jobs without walking its finished ones.
CREATE INDEX aggregation_jobs_active ON aggregation_jobs (task_id) WHERE state = 'active';

INSERT INTO report_ids (task_id, report_id, client_time)
SELECT task_id, report_id, client_time FROM reports;

INSERT INTO report_queue (task_id, client_time, report_id, payload)
SELECT task_id, client_time, report_id, payload FROM reports
WHERE job_id IS NULL AND payload IS NOT NULL;

UPDATE aggregation_jobs AS j
SET report_ids = r.report_ids, client_times = r.client_times, payloads = r.payloads
FROM (
    SELECT task_id, job_id,
           array_agg(report_id ORDER BY client_time, report_id) AS report_ids,
           array_agg(client_time ORDER BY client_time, report_id) AS client_times,
           array_agg(payload ORDER BY client_time, report_id) AS payloads
    FROM reports
    WHERE job_id IS NOT NULL AND payload IS NOT NULL
    GROUP BY task_id, job_id
) AS r
WHERE j.task_id = r.task_id AND j.job_id = r.job_id AND j.state = 'active';

DROP TABLE reports;
