-- Duet's PostgreSQL schema, version 3: the queue's index drops the report ID.
--
-- Under `(task_id, client_time, report_id)` every upload inserted its index entry at a random
-- place among the reports of the same time (report IDs are random), dirtying a page of its own.
-- Under `(task_id, client_time)` entries of equal keys are ordered by their row's location, so
-- uploads of one time append to the end of that run. Job creation takes the oldest reports in
-- index order; a job still lists its reports in (client_time, report_id) order.

DROP INDEX report_queue_order;
CREATE INDEX report_queue_order ON report_queue (task_id, client_time);
