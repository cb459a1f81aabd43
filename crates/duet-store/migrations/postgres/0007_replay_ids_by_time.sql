-- Duet's PostgreSQL schema, version 7: the replay tables are keyed by report time.
--
-- Report IDs are random, so under a key of (task, report ID) every batch of new IDs went into
-- the replay tables' indexes at random places all over each task's history: as the history
-- grew, so did the pages each batch dirtied, the pages to read back into the buffer cache, and
-- (after every checkpoint) the full-page images in the write-ahead log. Keyed by (task, report
-- time, report ID), new IDs go next to each other among the IDs of the current times, and the
-- history's pages are never touched again.
--
-- Replays are now told apart by ID and time, which the DAP drafts allow: the time is part of
-- the additional authenticated data of both input shares, so a report replayed under another
-- time fails decryption on both aggregators.
--
-- * `claimed_report_ids` (the Leader's) already holds each report's time; only its primary key
--   changes.
-- * `helper_report_ids` gains the report's time. The Helper's IDs stored before this version
--   have none: they move to `helper_report_ids_untimed`, which nothing writes to again, and the
--   Helper checks an ID against it (by ID alone) as long as it holds any row.
--
-- A replica of an earlier version fails its Helper jobs (its inserts name no time) instead of
-- storing IDs where this version would not look for them.

ALTER TABLE claimed_report_ids DROP CONSTRAINT claimed_report_ids_pkey;
ALTER TABLE claimed_report_ids ADD PRIMARY KEY (task_key, client_time, report_id);

ALTER TABLE helper_report_ids RENAME TO helper_report_ids_untimed;
ALTER INDEX helper_report_ids_pkey RENAME TO helper_report_ids_untimed_pkey;
CREATE TABLE helper_report_ids (
    task_key    INTEGER NOT NULL,
    client_time BIGINT NOT NULL,
    report_id   BYTEA NOT NULL,
    PRIMARY KEY (task_key, client_time, report_id)
);
