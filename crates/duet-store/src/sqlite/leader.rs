//! Leader: reports and aggregation jobs.
//!
//! A report is one row for its whole life, appended in upload order (`seq`). A job claims a
//! contiguous `seq` range of one task's reports by advancing one cursor row, so claiming writes
//! nothing per report; finishing or abandoning the job reduces its reports to their IDs
//! (`payload` set to NULL) with one sequential range update. The job keeps its lease; there is
//! no per-report state row.
//!
//! Job statements reach `reports` through `seq` ranges of the primary key; the time-based count
//! names its partial index (`INDEXED BY`), so that a missing index is an error rather than a
//! scan of history.

use std::collections::{HashMap, HashSet};

use duet_messages::dap09::{AggregationJobId, Interval, ReportId, TaskId, Time};

use super::tasks::merge_batch_aggregations;
use super::{
    clamp_i64, col, col_array, col_u64, db, lease_token, to_i64, values_placeholders,
    SqliteDatastore, MAX_BIND_PARAMS,
};
use crate::{
    AcquiredAggregationJob, BatchAggregation, JobReport, Lease, MergeFn, NewReport, StoreError,
};

/// Columns bound per report in `put_reports`.
const REPORT_COLUMNS: usize = 4;

pub(super) async fn put_reports(
    store: &SqliteDatastore,
    reports: &[NewReport],
) -> Result<Vec<bool>, StoreError> {
    if reports.is_empty() {
        return Ok(Vec::new());
    }
    let times = reports
        .iter()
        .map(|r| to_i64(r.time.0, "report time"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut new = vec![false; reports.len()];
    let mut tx = store.begin_write().await?;
    let chunk_rows = MAX_BIND_PARAMS / REPORT_COLUMNS;
    for ((chunk, chunk_times), new) in reports
        .chunks(chunk_rows)
        .zip(times.chunks(chunk_rows))
        .zip(new.chunks_mut(chunk_rows))
    {
        let sql = format!(
            "-- put_reports\n\
             INSERT INTO reports (task_id, report_id, client_time, payload) VALUES {} \
             ON CONFLICT DO NOTHING",
            values_placeholders(chunk.len(), REPORT_COLUMNS)
        );
        let mut query = sqlx::query(&sql).persistent(chunk.len() == chunk_rows);
        for (report, time) in chunk.iter().zip(chunk_times) {
            query = query
                .bind(&report.task_id.0[..])
                .bind(&report.report_id.0[..])
                .bind(*time)
                .bind(&report.encoded[..]);
        }
        let done = query.execute(&mut *tx).await.map_err(db)?;
        let inserted = usize::try_from(done.rows_affected()).unwrap_or(usize::MAX);
        if inserted >= chunk.len() {
            // No conflicts (the usual case): every report is new.
            new.fill(true);
        } else if inserted > 0 {
            // Some were already stored, or repeated within the batch. The rows this statement
            // inserted took consecutive `seq` values (AUTOINCREMENT, under the write lock)
            // ending at the last insert rowid; the first occurrence of each of their keys is new.
            let last = done.last_insert_rowid();
            let rows = sqlx::query(
                "-- put_reports\n\
                 SELECT task_id, report_id FROM reports WHERE seq > ? AND seq <= ?",
            )
            .bind(last - i64::try_from(inserted).unwrap_or(i64::MAX))
            .bind(last)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
            let mut keys: HashSet<(TaskId, ReportId)> = HashSet::with_capacity(rows.len());
            for row in rows {
                keys.insert((
                    TaskId(col_array(&row, "task_id")?),
                    ReportId(col_array(&row, "report_id")?),
                ));
            }
            for (report, new) in chunk.iter().zip(new.iter_mut()) {
                *new = keys.remove(&(report.task_id, report.report_id));
            }
        }
    }
    tx.commit().await.map_err(db)?;
    Ok(new)
}

/// Reports read per statement when creating jobs.
const CLAIM_BATCH: i64 = 50_000;

pub(super) async fn create_aggregation_jobs(
    store: &SqliteDatastore,
    max_job_size: usize,
    now: Time,
) -> Result<usize, StoreError> {
    if max_job_size == 0 {
        return Ok(0);
    }
    let now = to_i64(now.0, "time")?;
    let mut tx = store.begin_write().await?;
    let row = sqlx::query(
        "-- create_aggregation_jobs\nSELECT claimed_seq FROM report_cursor WHERE id = 0",
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(db)?;
    let mut cursor: i64 = col(&row, "claimed_seq")?;
    let mut created = 0;
    loop {
        let rows = sqlx::query(
            "-- create_aggregation_jobs\n\
             SELECT seq, task_id FROM reports WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(cursor)
        .bind(CLAIM_BATCH)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let Some(last) = rows.last() else { break };
        let last_seq: i64 = col(last, "seq")?;
        // Group by task in upload order; each task's run is cut into jobs of at most
        // `max_job_size` reports, each job a seq range.
        let mut open: HashMap<Vec<u8>, (i64, i64, usize)> = HashMap::new();
        let mut jobs: Vec<(Vec<u8>, i64, i64, usize)> = Vec::new();
        for row in &rows {
            let seq: i64 = col(row, "seq")?;
            let task_id: Vec<u8> = col(row, "task_id")?;
            let entry = open.entry(task_id.clone()).or_insert((seq, seq, 0));
            entry.1 = seq;
            entry.2 += 1;
            if entry.2 == max_job_size {
                jobs.push((task_id.clone(), entry.0, entry.1, entry.2));
                open.remove(&task_id);
            }
        }
        jobs.extend(
            open.into_iter()
                .map(|(t, (first, last, n))| (t, first, last, n)),
        );
        for (task_id, first_seq, last_seq, count) in jobs {
            let job_id = AggregationJobId::random();
            sqlx::query(
                "-- create_aggregation_jobs\n\
                 INSERT INTO aggregation_jobs \
                 (task_id, job_id, state, report_count, first_seq, last_seq, created_at, retry_at) \
                 VALUES (?, ?, 'active', ?, ?, ?, ?, ?)",
            )
            .bind(&task_id[..])
            .bind(&job_id.0[..])
            .bind(clamp_i64(count as u64))
            .bind(first_seq)
            .bind(last_seq)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            created += 1;
        }
        cursor = last_seq;
        if (rows.len() as i64) < CLAIM_BATCH {
            break;
        }
    }
    sqlx::query(
        "-- create_aggregation_jobs\nUPDATE report_cursor SET claimed_seq = ? WHERE id = 0",
    )
    .bind(cursor)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(created)
}

pub(super) async fn acquire_aggregation_jobs(
    store: &SqliteDatastore,
    now: Time,
    lease_duration: u64,
    limit: usize,
) -> Result<Vec<AcquiredAggregationJob>, StoreError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let expiry = Time(now.0.saturating_add(lease_duration));
    let now = to_i64(now.0, "time")?;
    let mut tx = store.begin_write().await?;
    let candidates = sqlx::query(
        "-- acquire_aggregation_jobs\n\
         SELECT task_id, job_id, first_seq, last_seq FROM aggregation_jobs \
         WHERE state = 'active' AND retry_at <= ? AND lease_expiry <= ? \
         ORDER BY retry_at, created_at LIMIT ?",
    )
    .bind(now)
    .bind(now)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(&mut *tx)
    .await
    .map_err(db)?;
    let mut acquired = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        let task_id = TaskId(col_array(&candidate, "task_id")?);
        let job_id = AggregationJobId(col_array(&candidate, "job_id")?);
        let first_seq: i64 = col(&candidate, "first_seq")?;
        let last_seq: i64 = col(&candidate, "last_seq")?;
        let token = lease_token();
        let row = sqlx::query(
            "-- acquire_aggregation_jobs\n\
             UPDATE aggregation_jobs \
             SET lease_token = ?, lease_expiry = ?, lease_attempts = lease_attempts + 1 \
             WHERE task_id = ? AND job_id = ? RETURNING lease_attempts",
        )
        .bind(&token[..])
        .bind(clamp_i64(expiry.0))
        .bind(&task_id.0[..])
        .bind(&job_id.0[..])
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let attempts = u32::try_from(col_u64(&row, "lease_attempts")?)
            .map_err(|_| StoreError::Corrupt("lease_attempts out of range".into()))?;
        let reports = sqlx::query(
            "-- acquire_aggregation_jobs\n\
             SELECT report_id, client_time, payload FROM reports \
             WHERE seq BETWEEN ? AND ? AND task_id = ? AND payload IS NOT NULL ORDER BY seq",
        )
        .bind(first_seq)
        .bind(last_seq)
        .bind(&task_id.0[..])
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            Ok(JobReport {
                report_id: ReportId(col_array(row, "report_id")?),
                time: Time(col_u64(row, "client_time")?),
                encoded: col(row, "payload")?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        acquired.push(AcquiredAggregationJob {
            task_id,
            job_id,
            reports,
            lease: Lease {
                token,
                expiry,
                attempts,
            },
        });
    }
    tx.commit().await.map_err(db)?;
    Ok(acquired)
}

pub(super) async fn finish_aggregation_job(
    store: &SqliteDatastore,
    job: &AcquiredAggregationJob,
    deltas: &[BatchAggregation],
    merge: MergeFn<'_>,
) -> Result<(), StoreError> {
    let mut tx = store.begin_write().await?;
    let updated = sqlx::query(
        "-- finish_aggregation_job\n\
         UPDATE aggregation_jobs SET state = 'finished', lease_token = NULL, lease_expiry = 0 \
         WHERE task_id = ? AND job_id = ? AND state = 'active' AND lease_token = ? \
         RETURNING first_seq, last_seq",
    )
    .bind(&job.task_id.0[..])
    .bind(&job.job_id.0[..])
    .bind(&job.lease.token[..])
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    let Some(range) = updated else {
        tx.rollback().await.map_err(db)?;
        return Err(StoreError::LeaseLost);
    };
    let (first_seq, last_seq): (i64, i64) = (col(&range, "first_seq")?, col(&range, "last_seq")?);
    merge_batch_aggregations(store, &mut tx, deltas, merge).await?;
    sqlx::query(
        "-- finish_aggregation_job\n\
         UPDATE reports SET payload = NULL \
         WHERE seq BETWEEN ? AND ? AND task_id = ? AND payload IS NOT NULL",
    )
    .bind(first_seq)
    .bind(last_seq)
    .bind(&job.task_id.0[..])
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)
}

pub(super) async fn release_aggregation_job(
    store: &SqliteDatastore,
    job: &AcquiredAggregationJob,
    retry_at: Time,
) -> Result<(), StoreError> {
    let mut tx = store.begin_write().await?;
    let updated = sqlx::query(
        "-- release_aggregation_job\n\
         UPDATE aggregation_jobs SET lease_token = NULL, lease_expiry = 0, retry_at = ? \
         WHERE task_id = ? AND job_id = ? AND state = 'active' AND lease_token = ?",
    )
    .bind(to_i64(retry_at.0, "retry time")?)
    .bind(&job.task_id.0[..])
    .bind(&job.job_id.0[..])
    .bind(&job.lease.token[..])
    .execute(&mut *tx)
    .await
    .map_err(db)?
    .rows_affected();
    if updated == 0 {
        tx.rollback().await.map_err(db)?;
        return Err(StoreError::LeaseLost);
    }
    tx.commit().await.map_err(db)
}

pub(super) async fn abandon_aggregation_job(
    store: &SqliteDatastore,
    job: &AcquiredAggregationJob,
) -> Result<(), StoreError> {
    let mut tx = store.begin_write().await?;
    let updated = sqlx::query(
        "-- abandon_aggregation_job\n\
         UPDATE aggregation_jobs SET state = 'abandoned', lease_token = NULL, lease_expiry = 0 \
         WHERE task_id = ? AND job_id = ? AND state = 'active' AND lease_token = ? \
         RETURNING first_seq, last_seq",
    )
    .bind(&job.task_id.0[..])
    .bind(&job.job_id.0[..])
    .bind(&job.lease.token[..])
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    let Some(range) = updated else {
        tx.rollback().await.map_err(db)?;
        return Err(StoreError::LeaseLost);
    };
    let (first_seq, last_seq): (i64, i64) = (col(&range, "first_seq")?, col(&range, "last_seq")?);
    sqlx::query(
        "-- abandon_aggregation_job\n\
         UPDATE reports SET payload = NULL \
         WHERE seq BETWEEN ? AND ? AND task_id = ? AND payload IS NOT NULL",
    )
    .bind(first_seq)
    .bind(last_seq)
    .bind(&job.task_id.0[..])
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)
}

pub(super) async fn count_unaggregated_reports(
    store: &SqliteDatastore,
    task_id: &TaskId,
    interval: &Interval,
) -> Result<u64, StoreError> {
    // Unassigned reports and reports of unfinished jobs are exactly those that still have a
    // payload; the partial index `reports_pending` holds only them.
    let row = sqlx::query(
        "-- count_unaggregated_reports\n\
         SELECT COUNT(*) AS n FROM reports INDEXED BY reports_pending \
         WHERE task_id = ? AND payload IS NOT NULL AND client_time >= ? AND client_time < ?",
    )
    .bind(&task_id.0[..])
    .bind(clamp_i64(interval.start.0))
    .bind(clamp_i64(interval.end().0))
    .fetch_one(&store.pool)
    .await
    .map_err(db)?;
    col_u64(&row, "n")
}
