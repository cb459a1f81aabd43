-- Duet's PostgreSQL schema, version 9: the Helper finds the served batches near a time without
-- reading the task's whole history.
--
-- Each aggregation job and each aggregate share checks the batches served before, and read all of
-- them: about a millisecond per read after a year of hourly collections, twice per job. They now
-- read only the batches that end after the start of the times they check. A batch's end is
-- `batch_start + batch_duration`, saturating at the largest BIGINT (the queries spell the
-- expression exactly so, to use this index).

CREATE INDEX aggregate_share_jobs_by_end ON aggregate_share_jobs
    (task_id, (LEAST(batch_start, 9223372036854775807 - batch_duration) + batch_duration));
