-- Duet's PostgreSQL schema, version 4: queued reports stay in their row, uncompressed.
--
-- A row over about 2 kB (a Prio3Histogram(100) report is about 2.5 kB) went through the
-- default storage of `bytea`: a compression attempt, which a ciphertext never survives, and
-- then a move out of line into the TOAST table (one more row and index entry per report). Now a
-- row stays in line up to nearly a page, and a larger payload goes out of line without trying
-- to compress it.

ALTER TABLE report_queue ALTER COLUMN payload SET STORAGE EXTERNAL;
ALTER TABLE report_queue SET (toast_tuple_target = 8160);
