//! Leader: which reports of a task are not yet aggregated, for a collection deciding whether its
//! batch is complete.

use duet_messages::dap09::{Interval, TaskId};

use super::{clamp_i64, col, col_u64, PostgresDatastore, TxError};

/// The task's unaggregated reports with a timestamp in `[$2, $3)`, in two parts: its queued
/// reports (through `report_queue_order`, filtered by time: a queue holds the reports of its
/// active jobs and what the next job creations will claim), and the ones its active jobs from
/// before schema version 6 hold (through `aggregation_jobs_active`). `$1` is the task ID.
///
/// The queue is read from the start of the first active job's range, or from the claim cursor
/// if that comes first: every report before both was in a job that has ended, and was deleted
/// with it. The index entries of deleted reports stay until the queue is vacuumed; at thousands
/// of reports a second that can be a million entries, which a scan from the task's first entry
/// would walk (pruning their heap pages) on every check. Both bounds are computed once, before
/// the scan, so that they are its index conditions whatever the statistics.
macro_rules! queued_unaggregated {
    () => {
        "FROM report_queue \
         WHERE task_key = (SELECT task_key FROM replay_tasks WHERE task_id = $1) \
           AND upload_xid >= (SELECT LEAST(k.claimed_xid, ( \
               SELECT a.from_xid FROM aggregation_jobs AS a \
               WHERE a.task_id = $1 AND a.state = 'active' AND a.from_xid IS NOT NULL \
               ORDER BY a.from_xid LIMIT 1)) \
             FROM replay_tasks AS k WHERE k.task_id = $1) \
           AND client_time >= $2 AND client_time < $3"
    };
}
macro_rules! held_unaggregated {
    () => {
        "FROM aggregation_jobs AS j, UNNEST(j.client_times) AS t \
         WHERE j.task_id = $1 AND j.state = 'active' AND t >= $2 AND t < $3"
    };
}

/// Counts both parts (`queued_unaggregated!` and `held_unaggregated!`).
pub(super) const COUNT_UNAGGREGATED: &str = concat!(
    "-- count_unaggregated_reports\n\
     SELECT (SELECT COUNT(*) ",
    queued_unaggregated!(),
    ") + (SELECT COUNT(*) ",
    held_unaggregated!(),
    ") AS n"
);

/// Whether either part (`queued_unaggregated!` or `held_unaggregated!`) has a report.
pub(super) const HAS_UNAGGREGATED: &str = concat!(
    "-- has_unaggregated_reports\n\
     SELECT EXISTS (SELECT 1 ",
    queued_unaggregated!(),
    ") OR EXISTS (SELECT 1 ",
    held_unaggregated!(),
    ") AS found"
);

/// Runs one statement over the task's unaggregated reports in `interval`.
async fn unaggregated_row(
    store: &PostgresDatastore,
    sql: &'static str,
    task_id: &TaskId,
    interval: &Interval,
) -> Result<sqlx::postgres::PgRow, TxError> {
    Ok(sqlx::query(sql)
        .bind(&task_id.0[..])
        .bind(clamp_i64(interval.start.0))
        .bind(clamp_i64(interval.end().0))
        .fetch_one(&store.pool)
        .await?)
}

/// One statement: both parts (`queued_unaggregated!` and `held_unaggregated!`), counted.
pub(super) async fn count_unaggregated_reports(
    store: &PostgresDatastore,
    task_id: &TaskId,
    interval: &Interval,
) -> Result<u64, TxError> {
    let row = unaggregated_row(store, COUNT_UNAGGREGATED, task_id, interval).await?;
    Ok(col_u64(&row, "n")?)
}

/// [`count_unaggregated_reports`]'s question, answered at the first such report.
pub(super) async fn has_unaggregated_reports(
    store: &PostgresDatastore,
    task_id: &TaskId,
    interval: &Interval,
) -> Result<bool, TxError> {
    let row = unaggregated_row(store, HAS_UNAGGREGATED, task_id, interval).await?;
    Ok(col(&row, "found")?)
}
