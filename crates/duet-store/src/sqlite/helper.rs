//! Helper: aggregation jobs, the report IDs it has aggregated, and the aggregate shares it served.

use std::collections::HashSet;

use duet_messages::dap09::{
    AggregationJobId, HpkeCiphertext, Interval, ReportId, ReportIdChecksum, TaskId,
};
use duet_messages::{Decode, Encode};
use sqlx::sqlite::SqliteRow;
use sqlx::SqliteConnection;

use super::replay::Entry;
use super::tasks::{merge_batch_aggregations, BUCKETS_IN};
use super::{clamp_i64, col, col_array, col_interval, col_u64, db, to_i64, SqliteDatastore};
use crate::served::{check_share, merges_into_served};
use crate::{AggregateShareJob, BatchAggregation, HelperAggregationJob, MergeFn, StoreError};

/// A served batch's end, `batch_start + batch_duration` saturating at the largest INTEGER,
/// spelled as the index `aggregate_share_jobs_by_end` has it.
const SERVED_END: &str = "min(batch_start, 9223372036854775807 - batch_duration) + batch_duration";

/// The task `?1`'s served batches that overlap `[?2, ?3)`, as a `FROM` and `WHERE` clause: read
/// through the index on their end, so a read near the present skips the task's history. The
/// index is named: SQLite's planner would rather take the primary key's order, which starts at
/// the task's first batch.
fn served_overlapping() -> String {
    format!(
        "aggregate_share_jobs INDEXED BY aggregate_share_jobs_by_end \
         WHERE task_id = ?1 AND {SERVED_END} > ?2 AND batch_start < ?3"
    )
}

fn served_batches_sql() -> String {
    format!(
        "-- served_batches\n\
         SELECT DISTINCT batch_start, batch_duration FROM {} ORDER BY batch_start, batch_duration",
        served_overlapping()
    )
}

fn list_aggregate_share_jobs_sql() -> String {
    format!(
        "-- list_aggregate_share_jobs\n\
         SELECT batch_start, batch_duration, aggregation_parameter, report_count, checksum, \
           encrypted_aggregate_share \
         FROM {} ORDER BY batch_start, batch_duration, aggregation_parameter",
        served_overlapping()
    )
}

/// The batches whose aggregate shares the Helper served for a task that overlap `within`, in
/// order and once each. Read in a write transaction, no other write interleaves with it (see
/// `served`).
async fn served_batches(
    conn: &mut SqliteConnection,
    task_id: &TaskId,
    within: &Interval,
) -> Result<Vec<Interval>, StoreError> {
    if within.duration.0 == 0 {
        return Ok(Vec::new());
    }
    sqlx::query(&served_batches_sql())
        .bind(&task_id.0[..])
        .bind(clamp_i64(within.start.0))
        .bind(clamp_i64(within.end().0))
        .fetch_all(conn)
        .await
        .map_err(db)?
        .iter()
        .map(|row| col_interval(row, "batch_start", "batch_duration"))
        .collect()
}

pub(super) async fn get_helper_aggregation_job(
    store: &SqliteDatastore,
    task_id: &TaskId,
    id: &AggregationJobId,
) -> Result<Option<HelperAggregationJob>, StoreError> {
    let row = sqlx::query(
        "-- get_helper_aggregation_job\n\
         SELECT request_hash, step, response FROM helper_aggregation_jobs WHERE task_id = ? AND job_id = ?",
    )
    .bind(&task_id.0[..])
    .bind(&id.0[..])
    .fetch_optional(&store.pool)
    .await
    .map_err(db)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let step = u16::try_from(col_u64(&row, "step")?)
        .map_err(|_| StoreError::Corrupt("helper aggregation job step out of range".into()))?;
    Ok(Some(HelperAggregationJob {
        task_id: *task_id,
        id: *id,
        request_hash: col_array(&row, "request_hash")?,
        step,
        response: col(&row, "response")?,
    }))
}

pub(super) async fn seen_report_ids(
    store: &SqliteDatastore,
    task_id: &TaskId,
    ids: &[ReportId],
) -> Result<HashSet<ReportId>, StoreError> {
    let mut conn = store.pool.acquire().await.map_err(db)?;
    store.replay.helper.known(&mut conn, task_id, ids).await
}

pub(super) async fn put_helper_aggregation_job(
    store: &SqliteDatastore,
    job: &HelperAggregationJob,
    report_ids: &[ReportId],
    deltas: &[BatchAggregation],
    merge: MergeFn<'_>,
) -> Result<(), StoreError> {
    let mut tx = store.begin_write().await?;
    let inserted = sqlx::query(
        "-- put_helper_aggregation_job\n\
         INSERT INTO helper_aggregation_jobs \
           (task_id, job_id, request_hash, step, response, created_at) \
         VALUES (?, ?, ?, ?, ?, unixepoch()) ON CONFLICT DO NOTHING",
    )
    .bind(&job.task_id.0[..])
    .bind(&job.id.0[..])
    .bind(&job.request_hash[..])
    .bind(i64::from(job.step))
    .bind(&job.response[..])
    .execute(&mut *tx)
    .await
    .map_err(db)?
    .rows_affected();
    if inserted == 0 {
        tx.rollback().await.map_err(db)?;
        return Err(StoreError::Conflict);
    }
    let entries: Vec<Entry> = report_ids
        .iter()
        .map(|id| Entry {
            task_id: job.task_id,
            report_id: *id,
            seq: 0,
        })
        .collect();
    let mut intake = store.replay.helper.begin(&mut tx).await?;
    // Any report ID already taken in (by another job, or twice in this one) is a replay that a
    // concurrent request got in first, or that the caller did not look up (`seen_report_ids`,
    // which the Helper skips on its first attempt, or which did not know of it yet): the
    // caller must recompute.
    if intake.admit(&mut tx, &entries).await?.contains(&false) {
        tx.rollback().await.map_err(db)?;
        return Err(StoreError::Conflict);
    }
    if !deltas.is_empty()
        && merges_into_served(
            &served_batches(
                &mut tx,
                &job.task_id,
                &Interval::spanning(deltas.iter().map(|d| d.bucket)),
            )
            .await?,
            deltas,
        )
    {
        tx.rollback().await.map_err(db)?;
        return Err(StoreError::Conflict);
    }
    merge_batch_aggregations(store, &mut tx, deltas, merge).await?;
    let admitted = intake.finish(&mut tx).await?;
    tx.commit().await.map_err(db)?;
    admitted.remember();
    Ok(())
}

fn share_job_from_row(task_id: &TaskId, row: &SqliteRow) -> Result<AggregateShareJob, StoreError> {
    let encrypted: Vec<u8> = col(row, "encrypted_aggregate_share")?;
    Ok(AggregateShareJob {
        task_id: *task_id,
        batch_interval: col_interval(row, "batch_start", "batch_duration")?,
        aggregation_parameter: col(row, "aggregation_parameter")?,
        report_count: col_u64(row, "report_count")?,
        checksum: ReportIdChecksum(col_array(row, "checksum")?),
        encrypted_aggregate_share: HpkeCiphertext::get_decoded(&encrypted)
            .map_err(|e| StoreError::Corrupt(format!("stored HpkeCiphertext: {e}")))?,
    })
}

pub(super) async fn get_aggregate_share_job(
    store: &SqliteDatastore,
    task_id: &TaskId,
    batch_interval: &Interval,
    aggregation_parameter: &[u8],
) -> Result<Option<AggregateShareJob>, StoreError> {
    sqlx::query(
        "-- get_aggregate_share_job\n\
         SELECT batch_start, batch_duration, aggregation_parameter, report_count, checksum, \
           encrypted_aggregate_share \
         FROM aggregate_share_jobs \
         WHERE task_id = ? AND batch_start = ? AND batch_duration = ? AND aggregation_parameter = ?",
    )
    .bind(&task_id.0[..])
    .bind(to_i64(batch_interval.start.0, "batch start")?)
    .bind(to_i64(batch_interval.duration.0, "batch duration")?)
    .bind(aggregation_parameter)
    .fetch_optional(&store.pool)
    .await
    .map_err(db)?
    .map(|row| share_job_from_row(task_id, &row))
    .transpose()
}

pub(super) async fn list_aggregate_share_jobs(
    store: &SqliteDatastore,
    task_id: &TaskId,
    overlapping: &Interval,
) -> Result<Vec<AggregateShareJob>, StoreError> {
    if overlapping.duration.0 == 0 {
        return Ok(Vec::new());
    }
    sqlx::query(&list_aggregate_share_jobs_sql())
        .bind(&task_id.0[..])
        .bind(clamp_i64(overlapping.start.0))
        .bind(clamp_i64(overlapping.end().0))
        .fetch_all(&store.pool)
        .await
        .map_err(db)?
        .iter()
        .map(|row| share_job_from_row(task_id, row))
        .collect()
}

pub(super) async fn put_aggregate_share_job(
    store: &SqliteDatastore,
    job: &AggregateShareJob,
) -> Result<(), StoreError> {
    let mut tx = store.begin_write().await?;
    let served = served_batches(&mut tx, &job.task_id, &job.batch_interval).await?;
    // The reports of the rows `get_batch_aggregations` reads.
    let sql = format!(
        "-- put_aggregate_share_job\n\
         SELECT COALESCE(SUM(report_count), 0) FROM batch_aggregations WHERE {BUCKETS_IN}"
    );
    let aggregated: i64 = sqlx::query_scalar(&sql)
        .bind(store.role_str())
        .bind(&job.task_id.0[..])
        .bind(clamp_i64(job.batch_interval.start.0))
        .bind(clamp_i64(job.batch_interval.end().0))
        .bind(&job.aggregation_parameter[..])
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
    let aggregated = u64::try_from(aggregated)
        .map_err(|_| StoreError::Corrupt("a negative report count".into()))?;
    if let Err(e) = check_share(&served, job, aggregated) {
        tx.rollback().await.map_err(db)?;
        return Err(e);
    }
    let inserted = sqlx::query(
        "-- put_aggregate_share_job\n\
         INSERT INTO aggregate_share_jobs (task_id, batch_start, batch_duration, aggregation_parameter, \
           report_count, checksum, encrypted_aggregate_share) \
         VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(&job.task_id.0[..])
    .bind(to_i64(job.batch_interval.start.0, "batch start")?)
    .bind(to_i64(job.batch_interval.duration.0, "batch duration")?)
    .bind(&job.aggregation_parameter[..])
    .bind(to_i64(job.report_count, "report count")?)
    .bind(&job.checksum.0[..])
    .bind(job.encrypted_aggregate_share.get_encoded())
    .execute(&mut *tx)
    .await
    .map_err(db)?
    .rows_affected();
    if inserted == 0 {
        let row = sqlx::query(
            "-- put_aggregate_share_job\n\
             SELECT batch_start, batch_duration, aggregation_parameter, report_count, checksum, \
               encrypted_aggregate_share \
             FROM aggregate_share_jobs \
             WHERE task_id = ? AND batch_start = ? AND batch_duration = ? AND aggregation_parameter = ?",
        )
        .bind(&job.task_id.0[..])
        .bind(to_i64(job.batch_interval.start.0, "batch start")?)
        .bind(to_i64(job.batch_interval.duration.0, "batch duration")?)
        .bind(&job.aggregation_parameter[..])
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        if share_job_from_row(&job.task_id, &row)? != *job {
            return Err(StoreError::AlreadyExists);
        }
    }
    tx.commit().await.map_err(db)
}

/// Deletes up to `limit` of the oldest aggregation jobs stored more than `older_than_s` seconds
/// ago; returns how many. Jobs stored before schema version 8 (`created_at` 0) count from the
/// upgrade (`helper_jobs_aged_since`).
pub(super) async fn delete_old_helper_aggregation_jobs(
    store: &SqliteDatastore,
    older_than_s: u64,
    limit: usize,
) -> Result<u64, StoreError> {
    let older_than = clamp_i64(older_than_s);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut tx = store.begin_write().await?;
    let upgrade_aged: bool = sqlx::query_scalar(
        "-- delete_old_helper_aggregation_jobs\n\
         SELECT EXISTS (SELECT 1 FROM helper_jobs_aged_since WHERE upgraded_at < unixepoch() - ?)",
    )
    .bind(older_than)
    .fetch_one(&mut *tx)
    .await
    .map_err(db)?;
    // The pre-upgrade jobs first, once they are old enough; then the others, by age.
    let lowest = if upgrade_aged { 0 } else { 1 };
    let deleted = sqlx::query(
        "-- delete_old_helper_aggregation_jobs\n\
         DELETE FROM helper_aggregation_jobs WHERE (task_id, job_id) IN ( \
           SELECT task_id, job_id FROM helper_aggregation_jobs \
           WHERE created_at >= ? AND created_at < unixepoch() - ? ORDER BY created_at LIMIT ?)",
    )
    .bind(lowest)
    .bind(older_than)
    .bind(limit)
    .execute(&mut *tx)
    .await
    .map_err(db)?
    .rows_affected();
    tx.commit().await.map_err(db)?;
    Ok(deleted)
}

pub(super) async fn collected_intervals(
    store: &SqliteDatastore,
    task_id: &TaskId,
    within: &Interval,
) -> Result<Vec<Interval>, StoreError> {
    served_batches(
        &mut *store.pool.acquire().await.map_err(db)?,
        task_id,
        within,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jobs stored before schema version 8 (`created_at` 0) count from the upgrade: kept while it
    /// is younger than the retention, deleted after.
    #[tokio::test]
    async fn jobs_from_before_the_upgrade_count_from_it() {
        let store = SqliteDatastore::connect("sqlite::memory:")
            .await
            .expect("connect");
        sqlx::query(
            "INSERT INTO helper_aggregation_jobs (task_id, job_id, request_hash, step, response) \
             VALUES (x'01', x'02', x'03', 0, x'04')",
        )
        .execute(&store.pool)
        .await
        .expect("a job of before the upgrade");
        let upgraded = |ago: i64| {
            sqlx::query("UPDATE helper_jobs_aged_since SET upgraded_at = unixepoch() - ?")
                .bind(ago)
                .execute(&store.pool)
        };
        upgraded(100).await.expect("update");
        assert_eq!(
            delete_old_helper_aggregation_jobs(&store, 200, 10)
                .await
                .expect("delete"),
            0
        );
        assert_eq!(
            delete_old_helper_aggregation_jobs(&store, 50, 10)
                .await
                .expect("delete"),
            1
        );
        store.close().await;
    }

    /// The served batches near a time are read through the index on their end, whose expression
    /// the queries must spell exactly as the index does: not through the primary key's task
    /// prefix, which holds the task's whole history.
    #[tokio::test]
    async fn served_batches_are_read_by_their_end() {
        let store = SqliteDatastore::connect("sqlite::memory:")
            .await
            .expect("connect");
        for sql in [served_batches_sql(), list_aggregate_share_jobs_sql()] {
            let rows = sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
                .bind(&[1u8; 32][..])
                .bind(100i64)
                .bind(200i64)
                .fetch_all(&store.pool)
                .await
                .expect("EXPLAIN QUERY PLAN");
            let plan: Vec<String> = rows
                .iter()
                .map(|row| col::<_, String>(row, "detail").expect("detail"))
                .collect();
            assert!(
                plan.iter().any(|line| line
                    .contains("INDEX aggregate_share_jobs_by_end (task_id=? AND <expr>>?)")),
                "{plan:?}"
            );
        }
        store.close().await;
    }
}
