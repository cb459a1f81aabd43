//! Leader: reports and aggregation jobs.
//!
//! Every row a report causes is written once. On upload a report gets one row in
//! `report_queue`, stamped with the uploading transaction's ID, and nothing else: the upload
//! path, which clients wait on, touches no random-key index. Job creation moves queued reports,
//! in upload order, into the new job's row, as arrays, by deleting them from the queue (a delete
//! writes no new row version and no index entry), and in the same statement admits their IDs,
//! in key order, to `claimed_report_ids` (replay protection, never updated): of two uploads of
//! one ID the first is claimed first, and the second is the replay. The job row is written once
//! per job; when the job ends, its arrays are cleared in the same update that ends its lease.
//!
//! Replicas share the work through locks that never wait: job creation takes a task's queue
//! for one job at a time with an advisory lock it only tries, and acquisition claims runnable
//! jobs with `FOR UPDATE SKIP LOCKED`, so two replicas running either at once take disjoint
//! rows. Reports inserted concurrently are simply left for the next pass.

use std::collections::{HashMap, HashSet};

use duet_messages::dap09::{AggregationJobId, Interval, ReportId, TaskId, Time};
use sqlx::PgConnection;

use super::notify;
use super::tasks::merge_batch_aggregations;
use super::{
    clamp_i64, col, col_array, col_u32, col_u64, is_unique_violation, lease_token, limit_i64,
    to_i64, PostgresDatastore, TxError,
};
use crate::{
    AcquiredAggregationJob, BatchAggregation, JobReport, Lease, MergeFn, NewReport, StoreError,
    Wakeup,
};

/// One statement (READ COMMITTED), whatever the batch size: the reports go in as four arrays
/// unnested into rows of `report_queue`. Replays of stored IDs are found by job creation; a repeat
/// within the batch is dropped here. The `ReportsStored` wake-up follows (coalesced with other
/// batches').
pub(super) async fn put_reports(
    store: &PostgresDatastore,
    reports: &[NewReport],
) -> Result<Vec<bool>, TxError> {
    if reports.is_empty() {
        return Ok(Vec::new());
    }
    // Only the first occurrence of a key in the batch is queued.
    let mut first: Vec<&NewReport> = Vec::with_capacity(reports.len());
    let mut keys: HashSet<(TaskId, ReportId)> = HashSet::with_capacity(reports.len());
    for report in reports {
        if keys.insert((report.task_id, report.report_id)) {
            first.push(report);
        }
    }
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
    sqlx::query(
        "-- put_reports\n\
         INSERT INTO report_queue (task_id, client_time, report_id, payload) \
         SELECT * FROM UNNEST($1::bytea[], $2::int8[], $3::bytea[], $4::bytea[])",
    )
    .bind(&task_ids)
    .bind(&times)
    .bind(&report_ids)
    .bind(&payloads)
    .execute(&store.pool)
    .await?;
    store.wakeups.reports_stored(&store.pool);
    // `remove`, so that only the first occurrence of a key is reported new.
    Ok(reports
        .iter()
        .map(|r| keys.remove(&(r.task_id, r.report_id)))
        .collect())
}

/// The queued reports a job claims, in upload order: up to `$2` of task `$1` (replay key `$5`),
/// deleted from the queue; none if another creator holds the task's job-creation lock (an
/// advisory lock held until the statement's transaction ends, taken without waiting). So a
/// task's jobs are created one statement after another, each claiming the oldest uploads left,
/// and of two uploads of one ID the first is claimed first: the second is the replay that job
/// creation drops.
macro_rules! claimed {
    () => {
        "WITH claimed AS ( \
           DELETE FROM report_queue WHERE ctid = ANY(ARRAY( \
             SELECT ctid FROM report_queue \
             WHERE task_id = $1 AND (SELECT pg_try_advisory_xact_lock(1685415284, $5)) \
             ORDER BY upload_xid LIMIT $2)) \
           RETURNING upload_xid, client_time, report_id, payload), "
    };
}

/// The job `$3` (created at `$4`) holding the reports of `$from`, and the statement's result:
/// how many reports it claimed and how many jobs it created (0 or 1). The arrays are built from
/// one sorted input, in (time, ID) order, rather than each sorting its own copy.
macro_rules! job_from {
    ($from:literal) => {
        concat!(
            "job AS ( \
               INSERT INTO aggregation_jobs (task_id, job_id, state, report_count, created_at, \
                 retry_at, report_ids, client_times, payloads) \
               SELECT $1, $3, 'active', COUNT(*), $4, $4, \
                 array_agg(report_id), array_agg(client_time), array_agg(payload) \
               FROM (SELECT report_id, client_time, payload FROM ",
            $from,
            " ORDER BY client_time, report_id) AS sorted HAVING COUNT(*) > 0 \
               RETURNING report_count) \
             SELECT (SELECT COUNT(*) FROM claimed) AS claimed, (SELECT COUNT(*) FROM job) AS jobs"
        )
    };
}

/// Claims the reports of a job and admits their IDs, expecting no replay: a plain insert into
/// `claimed_report_ids`, one unique-index probe per ID, which fails the statement on a replay.
const CREATE_JOB: &str = concat!(
    "-- create_aggregation_jobs\n",
    claimed!(),
    "ids AS ( \
       INSERT INTO claimed_report_ids (task_key, report_id, client_time) \
       SELECT $5, report_id, client_time FROM claimed ORDER BY report_id), ",
    job_from!("claimed")
);

/// Claims the reports of a job and drops the replays among them: of an ID claimed more than once
/// the first upload is kept, and an ID already in `claimed_report_ids` (claimed before, or by a
/// concurrent creator that has committed since) is dropped.
const CREATE_JOB_DROPPING_REPLAYS: &str = concat!(
    "-- create_aggregation_jobs\n",
    claimed!(),
    "once AS ( \
       SELECT DISTINCT ON (report_id) client_time, report_id, payload FROM claimed \
       ORDER BY report_id, upload_xid), \
     fresh AS ( \
       INSERT INTO claimed_report_ids (task_key, report_id, client_time) \
       SELECT $5, report_id, client_time FROM once ORDER BY report_id \
       ON CONFLICT DO NOTHING RETURNING report_id), \
     kept AS (SELECT once.* FROM once JOIN fresh USING (report_id)), ",
    job_from!("kept")
);

/// READ COMMITTED plus a per-task advisory lock, tried without waiting: a creator skips a task
/// whose job another creator is creating. Each job is one statement and its own transaction: it
/// deletes up to `max_job_size` reports from the queue, admits their IDs to `claimed_report_ids`
/// (in key order, so that consecutive inserts share the index's upper pages) and inserts the job
/// row holding them. Replays are rare, so a job's first attempt expects none; if one fails it
/// with a unique violation, the job runs again, dropping replays. The `AggregationJobsCreated`
/// wake-up follows the last job.
pub(super) async fn create_aggregation_jobs(
    store: &PostgresDatastore,
    max_job_size: usize,
    now: Time,
) -> Result<usize, TxError> {
    if max_job_size == 0 {
        return Ok(0);
    }
    let now = to_i64(now.0, "time")?;
    let mut conn = store.pool.acquire().await?;
    // The tasks that have queued reports, read as a skip scan of `report_queue_order` (one index
    // probe per task, not one row per queued report).
    let task_rows = sqlx::query(
        "-- create_aggregation_jobs\n\
         WITH RECURSIVE pending (task_id) AS ( \
           (SELECT task_id FROM report_queue ORDER BY task_id LIMIT 1) \
           UNION ALL \
           SELECT (SELECT q.task_id FROM report_queue q \
                   WHERE q.task_id > pending.task_id \
                   ORDER BY q.task_id LIMIT 1) \
           FROM pending WHERE pending.task_id IS NOT NULL) \
         SELECT task_id FROM pending WHERE task_id IS NOT NULL",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut created = 0;
    for task_row in task_rows {
        let task_id: [u8; 32] = col_array(&task_row, "task_id")?;
        let task_key = store.task_key(&TaskId(task_id)).await?;
        loop {
            let job_id = AggregationJobId::random();
            let job = |sql| {
                sqlx::query(sql)
                    .bind(&task_id[..])
                    .bind(limit_i64(max_job_size))
                    .bind(&job_id.0[..])
                    .bind(now)
                    .bind(task_key)
            };
            let row = match job(CREATE_JOB).fetch_one(&mut *conn).await {
                Err(e) if is_unique_violation(&e) => {
                    job(CREATE_JOB_DROPPING_REPLAYS)
                        .fetch_one(&mut *conn)
                        .await?
                }
                row => row?,
            };
            if col_u64(&row, "jobs")? > 0 {
                created += 1;
            }
            if col_u64(&row, "claimed")? < max_job_size as u64 {
                break;
            }
        }
    }
    if created > 0 {
        notify::notify(
            &mut conn,
            "-- create_aggregation_jobs\nSELECT pg_notify($1, $2)",
            Wakeup::AggregationJobsCreated,
        )
        .await?;
    }
    Ok(created)
}

/// An aggregation job's key: task ID and job ID.
type JobKey = ([u8; 32], [u8; 16]);

/// READ COMMITTED plus `FOR UPDATE SKIP LOCKED` on the jobs leased: a replica leasing at the same
/// time skips them, and one leasing after this commits sees the new lease. Two statements
/// whatever the number of jobs: pick, then lease and read the jobs' reports.
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
         RETURNING j.task_id, j.job_id, j.lease_token, j.lease_attempts, \
           j.report_ids, j.client_times, j.payloads",
    )
    .bind(&task_ids)
    .bind(&job_ids)
    .bind(&tokens)
    .bind(clamp_i64(expiry.0))
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut leased_jobs: HashMap<JobKey, (Lease, Vec<JobReport>)> =
        HashMap::with_capacity(leased.len());
    for row in &leased {
        let lease = Lease {
            token: col_array(row, "lease_token")?,
            expiry,
            attempts: col_u32(row, "lease_attempts")?,
        };
        leased_jobs.insert(
            (col_array(row, "task_id")?, col_array(row, "job_id")?),
            (lease, job_reports(row)?),
        );
    }
    // In the order picked: the longest-waiting jobs first.
    let mut acquired = Vec::with_capacity(order.len());
    for key in order {
        let (lease, reports) = leased_jobs
            .remove(&key)
            .ok_or_else(|| StoreError::Database("a picked job was not leased".into()))?;
        acquired.push(AcquiredAggregationJob {
            task_id: TaskId(key.0),
            job_id: AggregationJobId(key.1),
            reports,
            lease,
        });
    }
    Ok(acquired)
}

/// The reports an active job row carries, from its three parallel arrays.
fn job_reports(row: &sqlx::postgres::PgRow) -> Result<Vec<JobReport>, StoreError> {
    let report_ids: Option<Vec<Vec<u8>>> = col(row, "report_ids")?;
    let times: Option<Vec<i64>> = col(row, "client_times")?;
    let payloads: Option<Vec<Vec<u8>>> = col(row, "payloads")?;
    let (report_ids, times, payloads) = (
        report_ids.unwrap_or_default(),
        times.unwrap_or_default(),
        payloads.unwrap_or_default(),
    );
    if report_ids.len() != times.len() || report_ids.len() != payloads.len() {
        return Err(StoreError::Corrupt(
            "an aggregation job's report arrays differ in length".into(),
        ));
    }
    report_ids
        .into_iter()
        .zip(times)
        .zip(payloads)
        .map(|((id, time), encoded)| {
            Ok(JobReport {
                report_id: ReportId(id.try_into().map_err(|_| {
                    StoreError::Corrupt("a stored report ID is not 16 bytes".into())
                })?),
                time: Time(
                    u64::try_from(time).map_err(|_| {
                        StoreError::Corrupt("a stored report time is negative".into())
                    })?,
                ),
                encoded,
            })
        })
        .collect()
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

/// Ends a leased job for good, READ COMMITTED plus the job's row lock (held from the lease check
/// to commit): `end_sql` moves it to its final state and clears its reports, `deltas` (if any)
/// are merged under the buckets' row locks, and the `CollectionWorkReady` wake-up is sent.
async fn end_job(
    store: &PostgresDatastore,
    job: &AcquiredAggregationJob,
    end_sql: &'static str,
    notify_sql: &'static str,
    deltas: Option<(&[BatchAggregation], MergeFn<'_>)>,
) -> Result<(), TxError> {
    let mut tx = store.begin().await?;
    end_lease(&mut tx, end_sql, job, None).await?;
    if let Some((deltas, merge)) = deltas {
        merge_batch_aggregations(store, &mut tx, deltas, merge).await?;
    }
    notify::notify(&mut tx, notify_sql, Wakeup::CollectionWorkReady).await?;
    Ok(tx.commit().await?)
}

/// Marks the job finished and merges its `deltas`.
pub(super) async fn finish_aggregation_job(
    store: &PostgresDatastore,
    job: &AcquiredAggregationJob,
    deltas: &[BatchAggregation],
    merge: MergeFn<'_>,
) -> Result<(), TxError> {
    end_job(
        store,
        job,
        "-- finish_aggregation_job\n\
         UPDATE aggregation_jobs SET state = 'finished', lease_token = NULL, lease_expiry = 0, \
           report_ids = NULL, client_times = NULL, payloads = NULL \
         WHERE task_id = $1 AND job_id = $2 AND state = 'active' AND lease_token = $3",
        "-- finish_aggregation_job\nSELECT pg_notify($1, $2)",
        Some((deltas, merge)),
    )
    .await
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

/// Marks the job abandoned: its reports count as aggregated (dropped).
pub(super) async fn abandon_aggregation_job(
    store: &PostgresDatastore,
    job: &AcquiredAggregationJob,
) -> Result<(), TxError> {
    end_job(
        store,
        job,
        "-- abandon_aggregation_job\n\
         UPDATE aggregation_jobs SET state = 'abandoned', lease_token = NULL, lease_expiry = 0, \
           report_ids = NULL, client_times = NULL, payloads = NULL \
         WHERE task_id = $1 AND job_id = $2 AND state = 'active' AND lease_token = $3",
        "-- abandon_aggregation_job\nSELECT pg_notify($1, $2)",
        None,
    )
    .await
}

/// One statement: the task's queued reports in the interval (its queue, through
/// `report_queue_order`, filtered by time: a queue holds what the next job creations will claim)
/// plus those its active jobs hold (through `aggregation_jobs_active`).
pub(super) async fn count_unaggregated_reports(
    store: &PostgresDatastore,
    task_id: &TaskId,
    interval: &Interval,
) -> Result<u64, TxError> {
    let row = sqlx::query(
        "-- count_unaggregated_reports\n\
         SELECT (SELECT COUNT(*) FROM report_queue \
                 WHERE task_id = $1 AND client_time >= $2 AND client_time < $3) \
              + (SELECT COUNT(*) FROM aggregation_jobs AS j, UNNEST(j.client_times) AS t \
                 WHERE j.task_id = $1 AND j.state = 'active' AND t >= $2 AND t < $3) AS n",
    )
    .bind(&task_id.0[..])
    .bind(clamp_i64(interval.start.0))
    .bind(clamp_i64(interval.end().0))
    .fetch_one(&store.pool)
    .await?;
    Ok(col_u64(&row, "n")?)
}
