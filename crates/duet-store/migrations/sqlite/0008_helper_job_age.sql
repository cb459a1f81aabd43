-- Duet's SQLite schema, version 8: the Helper's aggregation jobs carry their age, so that the ones
-- no Leader will retry any more can be deleted.
--
-- A Helper keeps each job's request hash and response to answer a retried request the same way.
-- They were kept for good: tens of bytes per report, more than its report ID. A job now records
-- when it was stored (seconds since the epoch), and jobs older than the Helper's
-- `helper_job_retention_s` are deleted.
--
-- Jobs stored before this version keep `created_at` 0 and count from the upgrade, which
-- `helper_jobs_aged_since` records: setting the column on every row would rewrite each one, its
-- response included, in the migration's one transaction.

ALTER TABLE helper_aggregation_jobs ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;

CREATE INDEX helper_aggregation_jobs_by_age ON helper_aggregation_jobs (created_at);

CREATE TABLE helper_jobs_aged_since (
    upgraded_at INTEGER NOT NULL
);

INSERT INTO helper_jobs_aged_since (upgraded_at) VALUES (unixepoch());
