//! Leader: reports and aggregation jobs.
//!
//! Every row a report causes is written once. On upload a report gets one row in
//! `report_queue`, stamped with the uploading transaction's ID and naming its task by its key
//! (`replay_tasks`), and nothing else: the upload path, which clients wait on, touches no
//! random-key index (the queue's index is by task key in claim order, (upload transaction, time,
//! ID), so uploads append to it). The report stays in that row until its job ends. Job creation
//! claims the next queued reports in claim order after the task's claim cursor (in
//! `replay_tasks`), only those uploaded by transactions older than every transaction still
//! running, so that no upload commits behind the cursor; it admits their IDs,
//! in key order, to `claimed_report_ids` (replay protection in runs, never updated; see
//! [`job_creation`](super::job_creation) and [`runs`](super::runs)), moves the cursor
//! past them and inserts the job row, which names them as a range of the claim order: of two
//! uploads of one ID the first is claimed first, and the second is the replay, deleted from the
//! queue. The job row is written once per job; when the job ends, its reports are deleted from
//! the queue in the statement that ends its lease (a delete writes no new row version and no
//! index entry). Jobs created before schema version 6 carry their reports as arrays instead.
//!
//! Replicas share the work through locks that do not wait for each other's work: job creation
//! takes a task's queue for one job at a time with an advisory lock it only tries, and
//! acquisition claims runnable jobs with `FOR UPDATE SKIP LOCKED`, so two replicas running
//! either at once take disjoint rows. Reports inserted concurrently are simply left for the next
//! pass. (Job creation waits only while a replay run is being closed, and task deletion for the
//! task's job creators.)

use std::collections::{HashMap, HashSet};

use duet_messages::dap09::{AggregationJobId, ReportId, TaskId, Time};
use sqlx::PgConnection;

use super::notify;
use super::tasks::merge_batch_aggregations;
use super::{
    clamp_i64, col, col_array, col_u32, lease_token, limit_i64, to_i64, PostgresDatastore, TxError,
};
use crate::{
    AcquiredAggregationJob, BatchAggregation, JobReport, Lease, MergeFn, NewReport, StoreError,
    Wakeup,
};

/// One statement (READ COMMITTED), whatever the batch size: the reports go in as four arrays
/// unnested into rows of `report_queue` (a task's key is read, or created, once per process and
/// then cached). Replays of stored IDs are found by job creation; a repeat within the batch is
/// dropped here. The `ReportsStored` wake-up follows (coalesced with other batches'). The
/// statement runs on `pool`: the store's, or the one that commits without waiting for the flush.
pub(super) async fn put_reports(
    store: &PostgresDatastore,
    reports: &[NewReport],
    pool: &sqlx::PgPool,
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
    let mut task_keys = Vec::with_capacity(first.len());
    let mut report_ids = Vec::with_capacity(first.len());
    let mut times = Vec::with_capacity(first.len());
    let mut payloads = Vec::with_capacity(first.len());
    let mut last_task = None;
    for report in first {
        let key = match last_task {
            Some((task_id, key)) if task_id == report.task_id => key,
            _ => store.task_key(&report.task_id).await?,
        };
        last_task = Some((report.task_id, key));
        task_keys.push(key);
        report_ids.push(report.report_id.0);
        times.push(to_i64(report.time.0, "report time")?);
        payloads.push(&report.encoded[..]);
    }
    sqlx::query(
        "-- put_reports\n\
         INSERT INTO report_queue (task_key, client_time, report_id, payload) \
         SELECT * FROM UNNEST($1::int4[], $2::int8[], $3::bytea[], $4::bytea[])",
    )
    .bind(&task_keys)
    .bind(&times)
    .bind(&report_ids)
    .bind(&payloads)
    .execute(pool)
    .await?;
    store.wakeups.reports_stored(&store.pool);
    // `remove`, so that only the first occurrence of a key is reported new.
    Ok(reports
        .iter()
        .map(|r| keys.remove(&(r.task_id, r.report_id)))
        .collect())
}

/// The condition that row `q` of `report_queue` lies in the queue range of job `j` (a row of
/// `aggregation_jobs` or of its `RETURNING`): after `from_*`, up to and including `to_*`, in claim
/// order (upload transaction, time, ID), which is the order of `report_queue_order`. The bounds
/// on `upload_xid` alone follow from the others; they tell the planner that a range is narrow
/// (it estimates comparisons of rows as a third of the table each), so that it reads ranges
/// from the index rather than the whole queue.
macro_rules! in_range {
    () => {
        "q.upload_xid >= j.from_xid AND q.upload_xid <= j.to_xid \
         AND (q.upload_xid, q.client_time, q.report_id) > (j.from_xid, j.from_time, j.from_id) \
         AND (q.upload_xid, q.client_time, q.report_id) <= (j.to_xid, j.to_time, j.to_id)"
    };
}

/// An aggregation job's key: task ID and job ID.
type JobKey = ([u8; 32], [u8; 16]);

/// The reports of the jobs that name a range of the queue (those created before schema
/// version 6 carry arrays instead, read as they are leased), each job's range read from the index on its
/// own: a `LATERAL` subquery that `OFFSET 0` keeps from being merged into the join, so that
/// the range's bounds are the index scan's conditions. With a plain join, statistics taken
/// while the queue was nearly empty (an automatic analyze between two bursts of uploads) had
/// the planner take the queue for a one-row table and read all of the task's queue for every
/// acquisition, filtering it by range: about 1 s each at 100,000 queued Histogram(100)
/// reports, stalls of 6 to 50 s.
const ACQUIRE_QUEUED: &str = concat!(
    "-- acquire_aggregation_jobs\n\
     SELECT u.i, q.report_id, q.client_time, q.payload \
     FROM UNNEST($1::bytea[], $2::bytea[]) WITH ORDINALITY AS u(task_id, job_id, i) \
     JOIN aggregation_jobs AS j ON j.task_id = u.task_id AND j.job_id = u.job_id \
     JOIN replay_tasks AS k ON k.task_id = j.task_id \
     CROSS JOIN LATERAL ( \
       SELECT q.report_id, q.client_time, q.payload FROM report_queue AS q \
       WHERE q.task_key = k.task_key AND ",
    in_range!(),
    " OFFSET 0) AS q"
);

/// READ COMMITTED plus `FOR UPDATE SKIP LOCKED` on the jobs leased: a replica leasing at the same
/// time skips them, and one leasing after this commits sees the new lease. Three statements
/// whatever the number of jobs: pick, lease (reading the reports of jobs from before schema
/// version 6), and read the queue ranges of the others.
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
    // The reports of the jobs that name a range of the queue (jobs created before schema
    // version 6 carry arrays instead, read above).
    let queued = sqlx::query(ACQUIRE_QUEUED)
        .bind(&task_ids)
        .bind(&job_ids)
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
    for row in &queued {
        // The job's place in `order` (which the arrays bound above follow), from 1.
        let i: i64 = col(row, "i")?;
        let (_, reports) = usize::try_from(i - 1)
            .ok()
            .and_then(|i| order.get(i))
            .and_then(|key| leased_jobs.get_mut(key))
            .ok_or_else(|| StoreError::Database("a report of a job that was not leased".into()))?;
        reports.push(job_report(
            col(row, "report_id")?,
            col(row, "client_time")?,
            col(row, "payload")?,
        )?);
    }
    // In the order picked: the longest-waiting jobs first.
    let mut acquired = Vec::with_capacity(order.len());
    for key in order {
        let (lease, mut reports) = leased_jobs
            .remove(&key)
            .ok_or_else(|| StoreError::Database("a picked job was not leased".into()))?;
        // Job order: by time, then ID (a range is read in no particular order).
        reports.sort_unstable_by_key(|r| (r.time, r.report_id.0));
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
        .map(|((id, time), encoded)| job_report(id, time, encoded))
        .collect()
}

/// One stored report of a job.
fn job_report(id: Vec<u8>, time: i64, encoded: Vec<u8>) -> Result<JobReport, StoreError> {
    Ok(JobReport {
        report_id: ReportId(
            id.try_into()
                .map_err(|_| StoreError::Corrupt("a stored report ID is not 16 bytes".into()))?,
        ),
        time: Time(
            u64::try_from(time)
                .map_err(|_| StoreError::Corrupt("a stored report time is negative".into()))?,
        ),
        encoded,
    })
}

/// Ends job `$2` of task `$1` (task key `$4`) if its lease token is still `$3`: moves it to
/// `$state`, clears its arrays (jobs created before schema version 6) and deletes the reports of
/// its queue range. The range's bounds are values computed once (so the delete reads the range
/// from the index whatever the queue's statistics say; see [`acquire_aggregation_jobs`]), and
/// compare as nothing if no job was ended. The statement returns one row if the job was ended.
macro_rules! end_sql {
    ($name:literal, $state:literal) => {
        concat!(
            "-- ",
            $name,
            "\n\
             WITH ended AS ( \
               UPDATE aggregation_jobs SET state = '",
            $state,
            "', lease_token = NULL, \
                 lease_expiry = 0, report_ids = NULL, client_times = NULL, payloads = NULL \
               WHERE task_id = $1 AND job_id = $2 AND state = 'active' AND lease_token = $3 \
               RETURNING from_xid, from_time, from_id, to_xid, to_time, to_id), \
             gone AS ( \
               DELETE FROM report_queue AS q \
               WHERE q.task_key = $4 \
                 AND q.upload_xid >= (SELECT from_xid FROM ended) \
                 AND q.upload_xid <= (SELECT to_xid FROM ended) \
                 AND (q.upload_xid, q.client_time, q.report_id) > \
                   (SELECT from_xid, from_time, from_id FROM ended) \
                 AND (q.upload_xid, q.client_time, q.report_id) <= \
                   (SELECT to_xid, to_time, to_id FROM ended)) \
             SELECT 1 FROM ended"
        )
    };
}

/// `sql` with the job's task ID, job ID and lease token bound as `$1`–`$3`, for [`end_lease`].
fn lease_query<'q>(sql: &'static str, job: &'q AcquiredAggregationJob) -> PgQuery<'q> {
    sqlx::query(sql)
        .bind(&job.task_id.0[..])
        .bind(&job.job_id.0[..])
        .bind(&job.lease.token[..])
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Takes the job's row lock by updating it only if the lease is still ours; a concurrent
/// acquisition either skipped the row or already changed its token (then `LeaseLost`).
async fn end_lease(conn: &mut PgConnection, query: PgQuery<'_>) -> Result<(), TxError> {
    if query.execute(conn).await?.rows_affected() == 0 {
        return Err(StoreError::LeaseLost.into());
    }
    Ok(())
}

/// Ends a leased job for good, READ COMMITTED plus the job's row lock (held from the lease check
/// to commit): `end_sql` moves it to its final state and deletes its reports, `deltas` (if any)
/// are merged under the buckets' row locks, and the `CollectionWorkReady` wake-up is sent.
async fn end_job(
    store: &PostgresDatastore,
    job: &AcquiredAggregationJob,
    end_sql: &'static str,
    notify_sql: &'static str,
    deltas: Option<(&[BatchAggregation], MergeFn<'_>)>,
) -> Result<(), TxError> {
    let task_key = store.task_key(&job.task_id).await?;
    let mut tx = store.begin().await?;
    end_lease(&mut tx, lease_query(end_sql, job).bind(task_key)).await?;
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
        end_sql!("finish_aggregation_job", "finished"),
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
    let sql = "-- release_aggregation_job\n\
         UPDATE aggregation_jobs SET lease_token = NULL, lease_expiry = 0, retry_at = $4 \
         WHERE task_id = $1 AND job_id = $2 AND state = 'active' AND lease_token = $3";
    end_lease(&mut conn, lease_query(sql, job).bind(retry_at)).await
}

/// Marks the job abandoned: its reports count as aggregated (dropped).
pub(super) async fn abandon_aggregation_job(
    store: &PostgresDatastore,
    job: &AcquiredAggregationJob,
) -> Result<(), TxError> {
    end_job(
        store,
        job,
        end_sql!("abandon_aggregation_job", "abandoned"),
        "-- abandon_aggregation_job\nSELECT pg_notify($1, $2)",
        None,
    )
    .await
}

#[cfg(test)]
mod plans {
    use sqlx::{Connection, Row};

    use super::super::unaggregated::{COUNT_UNAGGREGATED, HAS_UNAGGREGATED};
    use super::*;
    use crate::conformance::postgres::with_fresh_database;

    /// The plan of `sql` with `binds` bound (each in an array if `arrays`), as text.
    async fn explain(conn: &mut PgConnection, sql: &str, binds: &[&[u8]], arrays: bool) -> String {
        let explain = format!("EXPLAIN {sql}");
        let mut query = sqlx::query(&explain);
        for bind in binds {
            query = if arrays {
                query.bind(vec![bind.to_vec()])
            } else {
                query.bind(bind.to_vec())
            };
        }
        let rows = query.fetch_all(&mut *conn).await.expect("EXPLAIN");
        rows.iter()
            .map(|row| row.get::<String, _>(0))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The line after the plan's scan of `report_queue`: its conditions.
    fn queue_scan_condition(plan: &str) -> &str {
        plan.lines()
            .skip_while(|line| !(line.contains("Scan") && line.contains("on report_queue")))
            .nth(1)
            .unwrap_or_default()
    }

    /// With statistics taken while the queue was empty and 20,000 reports queued since, a job's
    /// range is still read from the index, its bounds the scan's conditions, when the job is
    /// leased and when it ends; not the task's whole queue, filtered.
    #[tokio::test]
    async fn job_ranges_are_read_from_the_index_whatever_the_statistics() {
        with_fresh_database("job_range_plans", |url| async move {
            let store = PostgresDatastore::connect(&url).await.expect("connect");
            let task_id = TaskId::random();
            let key = store.task_key(&task_id).await.expect("task key");
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            for sql in [
                "ALTER TABLE report_queue SET (autovacuum_enabled = false)",
                "ANALYZE report_queue",
            ] {
                sqlx::query(sql).execute(&mut conn).await.expect(sql);
            }
            super::super::plan_checks::queue_reports(&mut conn, key).await;
            let job_id = AggregationJobId::random();
            sqlx::query(
                "INSERT INTO aggregation_jobs (task_id, job_id, state, report_count, created_at, \
                   retry_at, lease_token, from_xid, from_time, from_id, to_xid, to_time, to_id) \
                 SELECT $1, $2, 'active', 1000, 0, 0, '\\x01', x, 0, '\\x', x, 2000, '\\xff' \
                 FROM (SELECT min(upload_xid) AS x FROM report_queue) AS m",
            )
            .bind(&task_id.0[..])
            .bind(&job_id.0[..])
            .execute(&mut conn)
            .await
            .expect("job");
            let end =
                end_sql!("finish_aggregation_job", "finished").replace("$4", &key.to_string());
            let plans = [
                explain(&mut conn, ACQUIRE_QUEUED, &[&task_id.0, &job_id.0], true).await,
                explain(&mut conn, &end, &[&task_id.0, &job_id.0, &[1]], false).await,
            ];
            for plan in plans {
                let on_queue = queue_scan_condition(&plan);
                assert!(
                    on_queue.contains("Index Cond") && on_queue.contains("ROW(upload_xid"),
                    "{plan}"
                );
            }
            // The unaggregated reports of the task are read from the first active range on.
            for sql in [COUNT_UNAGGREGATED, HAS_UNAGGREGATED] {
                let explain = format!("EXPLAIN {sql}");
                let rows = sqlx::query(&explain)
                    .bind(&task_id.0[..])
                    .bind(0i64)
                    .bind(i64::MAX)
                    .fetch_all(&mut conn)
                    .await
                    .expect("EXPLAIN");
                let plan: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
                let plan = plan.join("\n");
                let on_queue = queue_scan_condition(&plan);
                assert!(
                    on_queue.contains("Index Cond") && on_queue.contains("upload_xid >="),
                    "{plan}"
                );
            }
            conn.close().await.expect("close");
            store.close().await;
        })
        .await;
    }
}
