//! Leader: reports and aggregation jobs.
//!
//! A report is one row for its whole life: inserted on upload, assigned to a job (`job_id`), and
//! reduced to its ID once the job finishes or is abandoned (`payload` set to NULL). The job keeps
//! its lease; there is no per-report state row.
//!
//! Replicas share the work through row locks that never wait: job creation claims unassigned
//! reports, and acquisition claims runnable jobs, with `FOR UPDATE SKIP LOCKED`, so two replicas
//! running either at once take disjoint rows. A claimed row is re-checked against its latest
//! committed version before it is locked, so a report assigned (or a job leased) by a
//! transaction that committed after this one's snapshot is never taken twice.

use std::collections::{HashMap, HashSet};

use duet_messages::dap09::{AggregationJobId, Interval, ReportId, TaskId, Time};
use sqlx::PgConnection;

use super::notify;
use super::tasks::merge_batch_aggregations;
use super::{
    clamp_i64, col, col_array, col_u32, col_u64, lease_token, limit_i64, to_i64, PostgresDatastore,
    TxError,
};
use crate::{
    AcquiredAggregationJob, BatchAggregation, JobReport, Lease, MergeFn, NewReport, StoreError,
    Wakeup,
};

/// One statement (READ COMMITTED), whatever the batch size: the reports go in as four arrays
/// unnested into rows, and the primary key turns replays into no-ops that `RETURNING` leaves
/// out. If any report is new, the first returned row sends the `ReportsStored` wake-up (once).
pub(super) async fn put_reports(
    store: &PostgresDatastore,
    reports: &[NewReport],
) -> Result<Vec<bool>, TxError> {
    if reports.is_empty() {
        return Ok(Vec::new());
    }
    // Only the first occurrence of a key in the batch can be new; later ones are not sent. Rows
    // go in key order so that concurrent batches sharing keys queue instead of deadlocking.
    let mut first: Vec<&NewReport> = Vec::with_capacity(reports.len());
    let mut keys: HashSet<(TaskId, ReportId)> = HashSet::with_capacity(reports.len());
    for report in reports {
        if keys.insert((report.task_id, report.report_id)) {
            first.push(report);
        }
    }
    first.sort_by_key(|r| (r.task_id.0, r.report_id.0));
    let mut task_ids = Vec::with_capacity(first.len());
    let mut report_ids = Vec::with_capacity(first.len());
    let mut times = Vec::with_capacity(first.len());
    let mut payloads = Vec::with_capacity(first.len());
    for report in first {
        task_ids.push(report.task_id.0);
        report_ids.push(report.report_id.0);
        times.push(to_i64(report.time.0, "report time")?);
        payloads.push(&report.encoded[..]);
    }
    let rows = sqlx::query(
        "-- put_reports\n\
         WITH inserted AS ( \
           INSERT INTO reports (task_id, report_id, client_time, payload) \
           SELECT * FROM UNNEST($1::bytea[], $2::bytea[], $3::int8[], $4::bytea[]) \
           ON CONFLICT DO NOTHING RETURNING task_id, report_id) \
         SELECT task_id, report_id, \
           CASE WHEN row_number() OVER () = 1 THEN pg_notify($5, $6)::text END AS woke \
         FROM inserted",
    )
    .bind(&task_ids)
    .bind(&report_ids)
    .bind(&times)
    .bind(&payloads)
    .bind(notify::CHANNEL)
    .bind(notify::payload(Wakeup::ReportsStored))
    .fetch_all(&store.pool)
    .await?;
    let mut inserted: HashSet<(TaskId, ReportId)> = HashSet::with_capacity(rows.len());
    for row in &rows {
        inserted.insert((
            TaskId(col_array(row, "task_id")?),
            ReportId(col_array(row, "report_id")?),
        ));
    }
    // `remove`, so that only the first occurrence of a key is reported new.
    Ok(reports
        .iter()
        .map(|r| inserted.remove(&(r.task_id, r.report_id)))
        .collect())
}

/// READ COMMITTED plus `FOR UPDATE SKIP LOCKED` on the reports a job takes: concurrent creators
/// skip each other's claimed reports (never waiting, so never deadlocking), and each claimed
/// report is re-checked to be still unassigned before it is taken. One statement per job
/// claims up to `max_job_size` reports and inserts the job row.
pub(super) async fn create_aggregation_jobs(
    store: &PostgresDatastore,
    max_job_size: usize,
    now: Time,
) -> Result<usize, TxError> {
    if max_job_size == 0 {
        return Ok(0);
    }
    let now = to_i64(now.0, "time")?;
    let job_size = limit_i64(max_job_size);
    let mut tx = store.begin().await?;
    // The tasks that have unassigned reports, read as a skip scan of `reports_unassigned` (one
    // index probe per task, not one row per pending report).
    let task_rows = sqlx::query(
        "-- create_aggregation_jobs\n\
         WITH RECURSIVE pending (task_id) AS ( \
           (SELECT task_id FROM reports WHERE job_id IS NULL ORDER BY task_id LIMIT 1) \
           UNION ALL \
           SELECT (SELECT r.task_id FROM reports r \
                   WHERE r.job_id IS NULL AND r.task_id > pending.task_id \
                   ORDER BY r.task_id LIMIT 1) \
           FROM pending WHERE pending.task_id IS NOT NULL) \
         SELECT task_id FROM pending WHERE task_id IS NOT NULL",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut created = 0;
    for task_row in task_rows {
        let task_id: Vec<u8> = col(&task_row, "task_id")?;
        loop {
            let job_id = AggregationJobId::random();
            // Oldest first, so that early buckets complete first.
            let job = sqlx::query(
                "-- create_aggregation_jobs\n\
                 WITH claimed AS ( \
                   SELECT report_id FROM reports \
                   WHERE task_id = $1 AND job_id IS NULL \
                   ORDER BY client_time, report_id LIMIT $2 \
                   FOR UPDATE SKIP LOCKED), \
                 assigned AS ( \
                   UPDATE reports SET job_id = $3 FROM claimed \
                   WHERE reports.task_id = $1 AND reports.report_id = claimed.report_id \
                     AND reports.job_id IS NULL \
                   RETURNING 1) \
                 INSERT INTO aggregation_jobs (task_id, job_id, state, report_count, created_at, \
                   retry_at) \
                 SELECT $1, $3, 'active', COUNT(*), $4, $4 FROM assigned HAVING COUNT(*) > 0 \
                 RETURNING report_count",
            )
            .bind(&task_id[..])
            .bind(job_size)
            .bind(&job_id.0[..])
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(job) = job else {
                break;
            };
            created += 1;
            if col_u64(&job, "report_count")? < max_job_size as u64 {
                break;
            }
        }
    }
    if created > 0 {
        notify::notify(
            &mut tx,
            "-- create_aggregation_jobs\nSELECT pg_notify($1, $2)",
            Wakeup::AggregationJobsCreated,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(created)
}

/// READ COMMITTED plus `FOR UPDATE SKIP LOCKED` on the jobs leased: a replica leasing at the same
/// time skips them, and one leasing after this commits sees the new lease. Three statements
/// whatever the number of jobs: pick, lease, read the jobs' reports.
pub(super) async fn acquire_aggregation_jobs(
    store: &PostgresDatastore,
    now: Time,
    lease_duration: u64,
    limit: usize,
) -> Result<Vec<AcquiredAggregationJob>, TxError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let expiry = Time(now.0.saturating_add(lease_duration));
    let now = to_i64(now.0, "time")?;
    let mut tx = store.begin().await?;
    let candidates = sqlx::query(
        "-- acquire_aggregation_jobs\n\
         SELECT task_id, job_id FROM aggregation_jobs \
         WHERE state = 'active' AND retry_at <= $1 AND lease_expiry <= $1 \
         ORDER BY retry_at, created_at LIMIT $2 \
         FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .bind(limit_i64(limit))
    .fetch_all(&mut *tx)
    .await?;
    if candidates.is_empty() {
        tx.commit().await?;
        return Ok(Vec::new());
    }
    let mut order = Vec::with_capacity(candidates.len());
    let mut task_ids = Vec::with_capacity(candidates.len());
    let mut job_ids = Vec::with_capacity(candidates.len());
    let mut tokens = Vec::with_capacity(candidates.len());
    for candidate in &candidates {
        let task_id: [u8; 32] = col_array(candidate, "task_id")?;
        let job_id: [u8; 16] = col_array(candidate, "job_id")?;
        order.push((task_id, job_id));
        task_ids.push(task_id);
        job_ids.push(job_id);
        tokens.push(lease_token());
    }
    let leased = sqlx::query(
        "-- acquire_aggregation_jobs\n\
         UPDATE aggregation_jobs AS j \
         SET lease_token = u.token, lease_expiry = $4, lease_attempts = j.lease_attempts + 1 \
         FROM UNNEST($1::bytea[], $2::bytea[], $3::bytea[]) AS u(task_id, job_id, token) \
         WHERE j.task_id = u.task_id AND j.job_id = u.job_id \
         RETURNING j.task_id, j.job_id, j.lease_token, j.lease_attempts",
    )
    .bind(&task_ids)
    .bind(&job_ids)
    .bind(&tokens)
    .bind(clamp_i64(expiry.0))
    .fetch_all(&mut *tx)
    .await?;
    let mut leases: HashMap<([u8; 32], [u8; 16]), Lease> = HashMap::with_capacity(leased.len());
    for row in &leased {
        leases.insert(
            (col_array(row, "task_id")?, col_array(row, "job_id")?),
            Lease {
                token: col_array(row, "lease_token")?,
                expiry,
                attempts: col_u32(row, "lease_attempts")?,
            },
        );
    }
    let report_rows = sqlx::query(
        "-- acquire_aggregation_jobs\n\
         SELECT task_id, job_id, report_id, client_time, payload FROM reports \
         WHERE (task_id, job_id) IN (SELECT * FROM UNNEST($1::bytea[], $2::bytea[])) \
           AND payload IS NOT NULL \
         ORDER BY task_id, job_id, client_time, report_id",
    )
    .bind(&task_ids)
    .bind(&job_ids)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut reports: HashMap<([u8; 32], [u8; 16]), Vec<JobReport>> = HashMap::new();
    for row in &report_rows {
        reports
            .entry((col_array(row, "task_id")?, col_array(row, "job_id")?))
            .or_default()
            .push(JobReport {
                report_id: ReportId(col_array(row, "report_id")?),
                time: Time(col_u64(row, "client_time")?),
                encoded: col(row, "payload")?,
            });
    }
    // In the order picked: the longest-waiting jobs first.
    let mut acquired = Vec::with_capacity(order.len());
    for key in order {
        let lease = leases
            .remove(&key)
            .ok_or_else(|| StoreError::Database("a picked job was not leased".into()))?;
        acquired.push(AcquiredAggregationJob {
            task_id: TaskId(key.0),
            job_id: AggregationJobId(key.1),
            reports: reports.remove(&key).unwrap_or_default(),
            lease,
        });
    }
    Ok(acquired)
}

/// Takes the job's row lock by updating it only if the lease is still ours; a concurrent
/// acquisition either skipped the row or already changed its token (then `LeaseLost`).
async fn end_lease(
    conn: &mut PgConnection,
    sql: &'static str,
    job: &AcquiredAggregationJob,
    retry_at: Option<i64>,
) -> Result<(), TxError> {
    let mut query = sqlx::query(sql)
        .bind(&job.task_id.0[..])
        .bind(&job.job_id.0[..])
        .bind(&job.lease.token[..]);
    if let Some(retry_at) = retry_at {
        query = query.bind(retry_at);
    }
    if query.execute(conn).await?.rows_affected() == 0 {
        return Err(StoreError::LeaseLost.into());
    }
    Ok(())
}

/// Drops the payloads of a job's reports: they count as aggregated from now on.
async fn drop_payloads(
    conn: &mut PgConnection,
    sql: &'static str,
    job: &AcquiredAggregationJob,
) -> Result<(), TxError> {
    sqlx::query(sql)
        .bind(&job.task_id.0[..])
        .bind(&job.job_id.0[..])
        .execute(conn)
        .await?;
    Ok(())
}

/// READ COMMITTED plus the job's row lock (held from the lease check to commit) and the merged
/// buckets' row locks. Sends the `CollectionWorkReady` wake-up.
pub(super) async fn finish_aggregation_job(
    store: &PostgresDatastore,
    job: &AcquiredAggregationJob,
    deltas: &[BatchAggregation],
    merge: MergeFn<'_>,
) -> Result<(), TxError> {
    let mut tx = store.begin().await?;
    end_lease(
        &mut tx,
        "-- finish_aggregation_job\n\
         UPDATE aggregation_jobs SET state = 'finished', lease_token = NULL, lease_expiry = 0 \
         WHERE task_id = $1 AND job_id = $2 AND state = 'active' AND lease_token = $3",
        job,
        None,
    )
    .await?;
    merge_batch_aggregations(store, &mut tx, deltas, merge).await?;
    drop_payloads(
        &mut tx,
        "-- finish_aggregation_job\n\
         UPDATE reports SET payload = NULL \
         WHERE task_id = $1 AND job_id = $2 AND payload IS NOT NULL",
        job,
    )
    .await?;
    notify::notify(
        &mut tx,
        "-- finish_aggregation_job\nSELECT pg_notify($1, $2)",
        Wakeup::CollectionWorkReady,
    )
    .await?;
    Ok(tx.commit().await?)
}

/// One statement, READ COMMITTED; the row lock it takes orders it with concurrent acquisitions.
pub(super) async fn release_aggregation_job(
    store: &PostgresDatastore,
    job: &AcquiredAggregationJob,
    retry_at: Time,
) -> Result<(), TxError> {
    let retry_at = to_i64(retry_at.0, "retry time")?;
    let mut conn = store.pool.acquire().await?;
    end_lease(
        &mut conn,
        "-- release_aggregation_job\n\
         UPDATE aggregation_jobs SET lease_token = NULL, lease_expiry = 0, retry_at = $4 \
         WHERE task_id = $1 AND job_id = $2 AND state = 'active' AND lease_token = $3",
        job,
        Some(retry_at),
    )
    .await
}

/// READ COMMITTED plus the job's row lock, as for finishing; sends the same wake-up.
pub(super) async fn abandon_aggregation_job(
    store: &PostgresDatastore,
    job: &AcquiredAggregationJob,
) -> Result<(), TxError> {
    let mut tx = store.begin().await?;
    end_lease(
        &mut tx,
        "-- abandon_aggregation_job\n\
         UPDATE aggregation_jobs SET state = 'abandoned', lease_token = NULL, lease_expiry = 0 \
         WHERE task_id = $1 AND job_id = $2 AND state = 'active' AND lease_token = $3",
        job,
        None,
    )
    .await?;
    drop_payloads(
        &mut tx,
        "-- abandon_aggregation_job\n\
         UPDATE reports SET payload = NULL \
         WHERE task_id = $1 AND job_id = $2 AND payload IS NOT NULL",
        job,
    )
    .await?;
    notify::notify(
        &mut tx,
        "-- abandon_aggregation_job\nSELECT pg_notify($1, $2)",
        Wakeup::CollectionWorkReady,
    )
    .await?;
    Ok(tx.commit().await?)
}

/// One statement over the partial index `reports_pending`: unassigned reports and reports of
/// unfinished jobs are exactly those that still have a payload.
pub(super) async fn count_unaggregated_reports(
    store: &PostgresDatastore,
    task_id: &TaskId,
    interval: &Interval,
) -> Result<u64, TxError> {
    let row = sqlx::query(
        "-- count_unaggregated_reports\n\
         SELECT COUNT(*) AS n FROM reports \
         WHERE task_id = $1 AND payload IS NOT NULL AND client_time >= $2 AND client_time < $3",
    )
    .bind(&task_id.0[..])
    .bind(clamp_i64(interval.start.0))
    .bind(clamp_i64(interval.end().0))
    .fetch_one(&store.pool)
    .await?;
    Ok(col_u64(&row, "n")?)
}
