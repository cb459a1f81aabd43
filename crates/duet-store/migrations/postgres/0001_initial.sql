-- Duet's PostgreSQL schema, version 1. The same tables as the SQLite schema, in PostgreSQL types.
--
-- Write budget: one row per report on each side (the Leader's `reports`, the Helper's
-- `helper_report_ids`); everything else is per job or per batch bucket. Tables that grow with
-- history are only reached through their primary key or through partial indexes over the rows
-- that are still pending, so the hot paths never scan history.
--
-- Times, durations and counts are BIGINT (the store refuses values past i64::MAX rather than
-- wrapping them); identifiers are their raw bytes as BYTEA. A `role` column ('leader' /
-- 'helper') is part of the key of rows both roles keep, so one database can serve a Leader and
-- a Helper.

-- ---- Both roles ----

CREATE TABLE tasks (
    role       TEXT NOT NULL CHECK (role IN ('leader', 'helper')),
    task_id    BYTEA NOT NULL,
    parameters TEXT NOT NULL, -- JSON of duet_core::TaskParameters
    PRIMARY KEY (role, task_id)
);

CREATE TABLE hpke_keypairs (
    role      TEXT NOT NULL CHECK (role IN ('leader', 'helper')),
    config_id INTEGER NOT NULL,
    keypair   TEXT NOT NULL, -- JSON of duet_core::hpke::HpkeKeypairSerde
    PRIMARY KEY (role, config_id)
);

-- Per-bucket aggregate shares, upserted once per job.
CREATE TABLE batch_aggregations (
    role                  TEXT NOT NULL CHECK (role IN ('leader', 'helper')),
    task_id               BYTEA NOT NULL,
    bucket_start          BIGINT NOT NULL,
    bucket_duration       BIGINT NOT NULL,
    aggregation_parameter BYTEA NOT NULL,
    aggregate_share       BYTEA NOT NULL,
    report_count          BIGINT NOT NULL,
    checksum              BYTEA NOT NULL,
    PRIMARY KEY (role, task_id, bucket_start, bucket_duration, aggregation_parameter)
);

-- ---- Leader ----

-- One row per uploaded report. Its life: unassigned (job_id NULL) -> in a job (job_id set) ->
-- aggregated or dropped (payload NULL; the row stays for replay protection).
CREATE TABLE reports (
    task_id     BYTEA NOT NULL,
    report_id   BYTEA NOT NULL,
    client_time BIGINT NOT NULL,
    payload     BYTEA,          -- the encoded Report; NULL once its job finished or was abandoned
    job_id      BYTEA,          -- its aggregation job; NULL while unassigned
    PRIMARY KEY (task_id, report_id)
);

-- Job creation: unassigned reports, oldest first (and the tasks that have any).
CREATE INDEX reports_unassigned ON reports (task_id, client_time, report_id) WHERE job_id IS NULL;
-- count_unaggregated_reports: reports not yet aggregated, by time.
CREATE INDEX reports_pending ON reports (task_id, client_time) WHERE payload IS NOT NULL;
-- A job's reports, while the job is unfinished.
CREATE INDEX reports_by_job ON reports (task_id, job_id) WHERE payload IS NOT NULL;

CREATE TABLE aggregation_jobs (
    task_id        BYTEA NOT NULL,
    job_id         BYTEA NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('active', 'finished', 'abandoned')),
    report_count   BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    retry_at       BIGINT NOT NULL,
    lease_token    BYTEA,
    lease_expiry   BIGINT NOT NULL DEFAULT 0,
    lease_attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, job_id)
);

CREATE INDEX aggregation_jobs_runnable ON aggregation_jobs (retry_at, created_at) WHERE state = 'active';

CREATE TABLE collection_jobs (
    task_id               BYTEA NOT NULL,
    job_id                BYTEA NOT NULL,
    batch_start           BIGINT NOT NULL,
    batch_duration        BIGINT NOT NULL,
    aggregation_parameter BYTEA NOT NULL,
    state                 TEXT NOT NULL CHECK (state IN ('start', 'finished', 'abandoned', 'deleted')),
    collection            BYTEA, -- the encoded Collection once finished (kept if later deleted)
    abandon_reason        TEXT,
    retry_at              BIGINT NOT NULL DEFAULT 0,
    lease_token           BYTEA,
    lease_expiry          BIGINT NOT NULL DEFAULT 0,
    lease_attempts        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, job_id)
);

CREATE INDEX collection_jobs_runnable ON collection_jobs (retry_at) WHERE state = 'start';

-- ---- Helper ----

CREATE TABLE helper_aggregation_jobs (
    task_id      BYTEA NOT NULL,
    job_id       BYTEA NOT NULL,
    request_hash BYTEA NOT NULL,
    step         INTEGER NOT NULL,
    response     BYTEA NOT NULL, -- the encoded AggregationJobResp
    PRIMARY KEY (task_id, job_id)
);

-- The Helper's one row per report: replay protection.
CREATE TABLE helper_report_ids (
    task_id   BYTEA NOT NULL,
    report_id BYTEA NOT NULL,
    PRIMARY KEY (task_id, report_id)
);

CREATE TABLE aggregate_share_jobs (
    task_id                   BYTEA NOT NULL,
    batch_start               BIGINT NOT NULL,
    batch_duration            BIGINT NOT NULL,
    aggregation_parameter     BYTEA NOT NULL,
    report_count              BIGINT NOT NULL,
    checksum                  BYTEA NOT NULL,
    encrypted_aggregate_share BYTEA NOT NULL, -- the encoded HpkeCiphertext
    PRIMARY KEY (task_id, batch_start, batch_duration, aggregation_parameter)
);
