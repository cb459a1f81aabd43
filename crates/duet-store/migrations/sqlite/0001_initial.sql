-- Duet's SQLite schema, version 1.
--
-- Write budget: one row per report on each side (the Leader's `reports`, the Helper's
-- `helper_report_ids`); everything else is per job or per batch bucket. Tables that grow with
-- history are only reached through their primary key or through partial indexes over the rows
-- that are still pending, so the hot paths never scan history.
--
-- Integers are SQLite's 64-bit signed INTEGER; identifiers are their raw bytes as BLOBs.
-- A `role` column ('leader' / 'helper') is part of the key of rows both roles keep, so one file
-- can serve a Leader and a Helper.

-- ---- Both roles ----

CREATE TABLE tasks (
    role       TEXT NOT NULL CHECK (role IN ('leader', 'helper')),
    task_id    BLOB NOT NULL,
    parameters TEXT NOT NULL, -- JSON of duet_core::TaskParameters
    PRIMARY KEY (role, task_id)
) WITHOUT ROWID;

CREATE TABLE hpke_keypairs (
    role      TEXT NOT NULL CHECK (role IN ('leader', 'helper')),
    config_id INTEGER NOT NULL,
    keypair   TEXT NOT NULL, -- JSON of duet_core::hpke::HpkeKeypairSerde
    PRIMARY KEY (role, config_id)
) WITHOUT ROWID;

-- Per-bucket aggregate shares, upserted once per job.
CREATE TABLE batch_aggregations (
    role                  TEXT NOT NULL CHECK (role IN ('leader', 'helper')),
    task_id               BLOB NOT NULL,
    bucket_start          INTEGER NOT NULL,
    bucket_duration       INTEGER NOT NULL,
    aggregation_parameter BLOB NOT NULL,
    aggregate_share       BLOB NOT NULL,
    report_count          INTEGER NOT NULL,
    checksum              BLOB NOT NULL,
    PRIMARY KEY (role, task_id, bucket_start, bucket_duration, aggregation_parameter)
) WITHOUT ROWID;

-- ---- Leader ----

-- One row per uploaded report, appended in upload order (`seq`). Its life: pending (payload
-- set) -> claimed by a job through the job's seq range (no write to the row) -> aggregated or
-- dropped (payload NULL; the row stays for replay protection).
CREATE TABLE reports (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused, so ranges stay meaningful
    task_id     BLOB NOT NULL,
    report_id   BLOB NOT NULL,
    client_time INTEGER NOT NULL,
    payload     BLOB               -- the encoded Report; NULL once its job finished or was abandoned
);

-- Replay protection.
CREATE UNIQUE INDEX reports_replay ON reports (task_id, report_id);
-- count_unaggregated_reports: reports not yet aggregated, by time.
CREATE INDEX reports_pending ON reports (task_id, client_time) WHERE payload IS NOT NULL;

-- Reports up to `claimed_seq` belong to aggregation jobs.
CREATE TABLE report_cursor (
    id          INTEGER PRIMARY KEY CHECK (id = 0),
    claimed_seq INTEGER NOT NULL
);
INSERT INTO report_cursor (id, claimed_seq) VALUES (0, 0);

CREATE TABLE aggregation_jobs (
    task_id        BLOB NOT NULL,
    job_id         BLOB NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('active', 'finished', 'abandoned')),
    report_count   INTEGER NOT NULL,
    first_seq      INTEGER NOT NULL, -- the job's reports: this task's reports in [first_seq, last_seq]
    last_seq       INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    retry_at       INTEGER NOT NULL,
    lease_token    BLOB,
    lease_expiry   INTEGER NOT NULL DEFAULT 0,
    lease_attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, job_id)
) WITHOUT ROWID;

CREATE INDEX aggregation_jobs_runnable ON aggregation_jobs (retry_at, created_at) WHERE state = 'active';

CREATE TABLE collection_jobs (
    task_id               BLOB NOT NULL,
    job_id                BLOB NOT NULL,
    batch_start           INTEGER NOT NULL,
    batch_duration        INTEGER NOT NULL,
    aggregation_parameter BLOB NOT NULL,
    state                 TEXT NOT NULL CHECK (state IN ('start', 'finished', 'abandoned', 'deleted')),
    collection            BLOB, -- the encoded Collection once finished (kept if later deleted)
    abandon_reason        TEXT,
    retry_at              INTEGER NOT NULL DEFAULT 0,
    lease_token           BLOB,
    lease_expiry          INTEGER NOT NULL DEFAULT 0,
    lease_attempts        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, job_id)
) WITHOUT ROWID;

CREATE INDEX collection_jobs_runnable ON collection_jobs (retry_at) WHERE state = 'start';

-- ---- Helper ----

CREATE TABLE helper_aggregation_jobs (
    task_id      BLOB NOT NULL,
    job_id       BLOB NOT NULL,
    request_hash BLOB NOT NULL,
    step         INTEGER NOT NULL,
    response     BLOB NOT NULL, -- the encoded AggregationJobResp
    PRIMARY KEY (task_id, job_id)
) WITHOUT ROWID;

-- The Helper's one row per report: replay protection.
CREATE TABLE helper_report_ids (
    task_id   BLOB NOT NULL,
    report_id BLOB NOT NULL,
    PRIMARY KEY (task_id, report_id)
) WITHOUT ROWID;

CREATE TABLE aggregate_share_jobs (
    task_id                   BLOB NOT NULL,
    batch_start               INTEGER NOT NULL,
    batch_duration            INTEGER NOT NULL,
    aggregation_parameter     BLOB NOT NULL,
    report_count              INTEGER NOT NULL,
    checksum                  BLOB NOT NULL,
    encrypted_aggregate_share BLOB NOT NULL, -- the encoded HpkeCiphertext
    PRIMARY KEY (task_id, batch_start, batch_duration, aggregation_parameter)
) WITHOUT ROWID;
