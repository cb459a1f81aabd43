-- Duet's PostgreSQL schema, version 10: the Helper's aggregation jobs carry their age, so that
-- the ones no Leader will retry any more can be deleted.
--
-- A Helper keeps each job's request hash and response to answer a retried request the same way.
-- They were kept for good: tens of bytes per report, more than its report ID. A job
-- now records when it was stored (seconds since the epoch, by the database's clock), and jobs
-- older than the Helper's `helper_job_retention_s` are deleted. Jobs stored before this version
-- count from the upgrade.

ALTER TABLE helper_aggregation_jobs
    ADD COLUMN created_at BIGINT NOT NULL DEFAULT EXTRACT(EPOCH FROM now())::BIGINT;

CREATE INDEX helper_aggregation_jobs_by_age ON helper_aggregation_jobs (created_at);
