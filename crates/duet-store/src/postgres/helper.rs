//! Helper: aggregation jobs, the report IDs it has aggregated, and the aggregate shares it served.

use std::collections::HashSet;

use duet_messages::dap09::{
    AggregationJobId, HpkeCiphertext, Interval, ReportId, ReportIdChecksum, TaskId,
};
use duet_messages::{Decode, Encode};
use sqlx::postgres::PgRow;
use sqlx::PgConnection;

use super::runs;
use super::tasks::{merge_batch_aggregations, BUCKETS_IN};
use super::{
    clamp_i64, col, col_array, col_interval, col_u64, is_unique_violation, to_i64,
    PostgresDatastore, TxError,
};
use crate::served::{check_share, merges_into_served};
use crate::{AggregateShareJob, BatchAggregation, HelperAggregationJob, MergeFn, StoreError};

/// The advisory lock, with the task key, between the Helper's aggregation job writes into a
/// task's buckets (shared) and the recording of an aggregate share of the task (exclusive).
/// Each takes it in a statement of its own before its checks (see `served`), whose snapshots
/// then see what the other committed.
const BATCHES_LOCK: i32 = 0x6475_6542; // "dueB"

/// A served batch's end, `batch_start + batch_duration` saturating at the largest BIGINT (so it
/// cannot raise an overflow error), spelled as the index `aggregate_share_jobs_by_end` has it.
const SERVED_END: &str =
    "LEAST(batch_start, 9223372036854775807 - batch_duration) + batch_duration";

/// The rows of the task `$1`'s served batches that end after `$2`: through the index on their
/// end, so a read near the present skips the task's history. (A bound on their start too would
/// let the planner's generic plan, which guesses the same share of rows for either bound, take
/// the primary key instead, which starts at the task's first batch; so callers drop the rows that
/// start too late themselves.)
fn served_ending_after() -> String {
    format!("task_id = $1 AND {SERVED_END} > $2")
}

fn served_batches_sql() -> String {
    format!(
        "-- served_batches\n\
         SELECT batch_start, batch_duration FROM aggregate_share_jobs WHERE {}",
        served_ending_after()
    )
}

fn list_aggregate_share_jobs_sql() -> String {
    format!(
        "-- list_aggregate_share_jobs\n\
         SELECT {SHARE_JOB_COLUMNS} FROM aggregate_share_jobs WHERE {}",
        served_ending_after()
    )
}

/// The batches whose aggregate shares the Helper served for a task that overlap `within`, in
/// order and once each.
async fn served_batches(
    conn: &mut PgConnection,
    task_id: &TaskId,
    within: &Interval,
) -> Result<Vec<Interval>, TxError> {
    if within.duration.0 == 0 {
        return Ok(Vec::new());
    }
    let mut served = sqlx::query(&served_batches_sql())
        .bind(&task_id.0[..])
        .bind(clamp_i64(within.start.0))
        .fetch_all(conn)
        .await?
        .iter()
        .map(|row| col_interval(row, "batch_start", "batch_duration"))
        .filter(|i| i.as_ref().map_or(true, |i| i.overlaps(within)))
        .collect::<Result<Vec<_>, _>>()?;
    served.sort_unstable();
    served.dedup();
    Ok(served)
}

pub(super) async fn get_helper_aggregation_job(
    store: &PostgresDatastore,
    task_id: &TaskId,
    id: &AggregationJobId,
) -> Result<Option<HelperAggregationJob>, TxError> {
    let row = sqlx::query(
        "-- get_helper_aggregation_job\n\
         SELECT request_hash, step, response FROM helper_aggregation_jobs \
         WHERE task_id = $1 AND job_id = $2",
    )
    .bind(&task_id.0[..])
    .bind(&id.0[..])
    .fetch_optional(&store.pool)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let step: i32 = col(&row, "step")?;
    let step = u16::try_from(step)
        .map_err(|_| StoreError::Corrupt("helper aggregation job step out of range".into()))?;
    Ok(Some(HelperAggregationJob {
        task_id: *task_id,
        id: *id,
        request_hash: col_array(&row, "request_hash")?,
        step,
        response: col(&row, "response")?,
    }))
}

/// `seen_report_ids`' statement: $1 the task key, $2 the IDs the filter may hold (probed in
/// every run), $3 the others (probed from run $4 on).
const SEEN_REPORT_IDS: &str = "-- seen_report_ids\n\
     WITH state AS (SELECT open_run FROM helper_replay_state) \
     SELECT u.id AS report_id FROM UNNEST($2::bytea[]) AS u(id) \
     CROSS JOIN LATERAL ( \
       SELECT 1 FROM helper_report_ids h \
       WHERE h.run = ANY(ARRAY(SELECT generate_series(0, (SELECT open_run FROM state)))) \
         AND h.task_key = $1 AND h.report_id = u.id LIMIT 1) AS seen \
     UNION ALL \
     SELECT u.id FROM UNNEST($3::bytea[]) AS u(id) \
     CROSS JOIN LATERAL ( \
       SELECT 1 FROM helper_report_ids h \
       WHERE h.run = ANY(ARRAY(SELECT generate_series($4, (SELECT open_run FROM state)))) \
         AND h.task_key = $1 AND h.report_id = u.id LIMIT 1) AS seen";

/// `put_helper_aggregation_job`'s statement for the report IDs: inserts $2 into the open run
/// for task key $1, and answers whether any of $3 (the IDs the filter may hold) is in a closed
/// run, or any of $4 (the others) in a run from $5 on.
const PUT_REPORT_IDS: &str = "-- put_helper_aggregation_job\n\
     WITH state AS (SELECT open_run FROM helper_replay_state), \
       ids AS (INSERT INTO helper_report_ids (run, task_key, report_id) \
         SELECT state.open_run, $1, u.id FROM state, UNNEST($2::bytea[]) AS u(id)) \
     SELECT (SELECT open_run FROM state) AS open_run, \
       EXISTS (SELECT 1 FROM UNNEST($3::bytea[]) AS u(id) CROSS JOIN LATERAL ( \
         SELECT 1 FROM helper_report_ids h \
         WHERE h.run = ANY(ARRAY(SELECT generate_series(0, \
             (SELECT open_run FROM state) - 1))) \
           AND h.task_key = $1 AND h.report_id = u.id LIMIT 1) AS seen) \
       OR ($5 < (SELECT open_run FROM state) \
         AND EXISTS (SELECT 1 FROM UNNEST($4::bytea[]) AS u(id) CROSS JOIN LATERAL ( \
           SELECT 1 FROM helper_report_ids h \
           WHERE h.run = ANY(ARRAY(SELECT generate_series($5, \
               (SELECT open_run FROM state) - 1))) \
             AND h.task_key = $1 AND h.report_id = u.id LIMIT 1) AS seen)) AS replayed";

/// One statement, whatever the number of IDs.
pub(super) async fn seen_report_ids(
    store: &PostgresDatastore,
    task_id: &TaskId,
    ids: &[ReportId],
) -> Result<HashSet<ReportId>, TxError> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<[u8; 16]> = ids.iter().map(|id| id.0).collect();
    let task_key = store.task_key(task_id).await?;
    // One primary-key probe per ID and run. With `task_id = $1 AND report_id = ANY($2)` the
    // planner may match only the task ID in the index and filter the task's every report ID
    // through the array, when its statistics predate the task's growth (one job took up to
    // 120 ms at 100,000 reports); a LATERAL subquery with a LIMIT is not flattened into a join,
    // so each probe keeps every column as its index condition. The IDs the filter lacks are
    // looked for only in the runs it does not cover, up to the open one (see `runs`).
    let triage = store.helper_runs.triage(&ids);
    let rows = sqlx::query(SEEN_REPORT_IDS)
        .bind(task_key)
        .bind(&triage.maybe)
        .bind(&triage.fresh)
        .bind(triage.covered)
        .fetch_all(&store.pool)
        .await?;
    let mut seen = HashSet::with_capacity(rows.len());
    for row in &rows {
        seen.insert(ReportId(col_array(row, "report_id")?));
    }
    Ok(seen)
}

/// READ COMMITTED: the primary keys of the job and of the report IDs decide between concurrent
/// writers. An insert that meets an uncommitted duplicate waits for it; then the job's insert
/// does nothing (no row inserted: `Conflict`) and the IDs' insert fails with a unique violation
/// (`Conflict` too). Before merging, the task's batches lock is taken shared and the served
/// batches read: a bucket in one is `Conflict` too. The merged buckets are row-locked. The report IDs go in as one array, in
/// order, so that concurrent jobs sharing IDs queue rather than deadlock.
pub(super) async fn put_helper_aggregation_job(
    store: &PostgresDatastore,
    job: &HelperAggregationJob,
    report_ids: &[ReportId],
    deltas: &[BatchAggregation],
    merge: MergeFn<'_>,
) -> Result<(), TxError> {
    let task_key = store.task_key(&job.task_id).await?;
    let mut tx = store.begin().await?;
    let inserted = sqlx::query(
        "-- put_helper_aggregation_job\n\
         INSERT INTO helper_aggregation_jobs \
           (task_id, job_id, request_hash, step, response, created_at) \
         VALUES ($1, $2, $3, $4, $5, EXTRACT(EPOCH FROM now())::BIGINT) ON CONFLICT DO NOTHING",
    )
    .bind(&job.task_id.0[..])
    .bind(&job.id.0[..])
    .bind(&job.request_hash[..])
    .bind(i32::from(job.step))
    .bind(&job.response[..])
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        tx.rollback().await?;
        return Err(StoreError::Conflict.into());
    }
    let mut open_run = None;
    if !report_ids.is_empty() {
        let mut ids: Vec<[u8; 16]> = report_ids.iter().map(|id| id.0).collect();
        ids.sort_unstable();
        // Any report ID already stored (by another job, or twice in this one) is a replay that a
        // concurrent request got in first: the caller must recompute. The IDs go into the open
        // run with a plain insert, whose unique index finds one there with its own probe; the
        // closed runs are probed for the IDs the filter cannot rule out (see `runs`), and
        // the others only if runs have closed since the filter was loaded.
        // The shared lock, taken first, keeps the open run from closing until this commits.
        sqlx::query("-- put_helper_aggregation_job\nSELECT pg_advisory_xact_lock_shared($1)")
            .bind(runs::HELPER.lock)
            .execute(&mut *tx)
            .await?;
        let triage = store.helper_runs.triage(&ids);
        let checked = sqlx::query(PUT_REPORT_IDS)
            .bind(task_key)
            .bind(&ids)
            .bind(&triage.maybe)
            .bind(&triage.fresh)
            .bind(triage.covered)
            .fetch_one(&mut *tx)
            .await;
        let replayed = match checked {
            Ok(row) => {
                let run = col::<_, i32>(&row, "open_run")?;
                open_run = Some(run);
                // An open run behind the filter's: the database went back in time, and the
                // probe trusted a filter that no longer matches it. The next attempt probes
                // every closed run.
                let behind = run < triage.covered;
                store.helper_runs.check_open_run(&store.pool, run);
                col::<_, bool>(&row, "replayed")? || behind
            }
            Err(e) if is_unique_violation(&e) => true,
            Err(e) => return Err(e.into()),
        };
        if replayed {
            tx.rollback().await?;
            return Err(StoreError::Conflict.into());
        }
    }
    if !deltas.is_empty() {
        sqlx::query("-- put_helper_aggregation_job\nSELECT pg_advisory_xact_lock_shared($1, $2)")
            .bind(BATCHES_LOCK)
            .bind(task_key)
            .execute(&mut *tx)
            .await?;
        let served = served_batches(
            &mut tx,
            &job.task_id,
            &Interval::spanning(deltas.iter().map(|d| d.bucket)),
        )
        .await?;
        if merges_into_served(&served, deltas) {
            tx.rollback().await?;
            return Err(StoreError::Conflict.into());
        }
    }
    merge_batch_aggregations(store, &mut tx, deltas, merge).await?;
    tx.commit().await?;
    if let Some(open_run) = open_run {
        store
            .helper_runs
            .after_write(&store.pool, report_ids.len(), open_run);
    }
    Ok(())
}

fn share_job_from_row(task_id: &TaskId, row: &PgRow) -> Result<AggregateShareJob, StoreError> {
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

/// The columns an [`AggregateShareJob`] is read from.
const SHARE_JOB_COLUMNS: &str = "batch_start, batch_duration, aggregation_parameter, \
     report_count, checksum, encrypted_aggregate_share";

pub(super) async fn get_aggregate_share_job(
    store: &PostgresDatastore,
    task_id: &TaskId,
    batch_interval: &Interval,
    aggregation_parameter: &[u8],
) -> Result<Option<AggregateShareJob>, TxError> {
    let sql = format!(
        "-- get_aggregate_share_job\n\
         SELECT {SHARE_JOB_COLUMNS} FROM aggregate_share_jobs \
         WHERE task_id = $1 AND batch_start = $2 AND batch_duration = $3 \
           AND aggregation_parameter = $4"
    );
    Ok(sqlx::query(&sql)
        .bind(&task_id.0[..])
        .bind(to_i64(batch_interval.start.0, "batch start")?)
        .bind(to_i64(batch_interval.duration.0, "batch duration")?)
        .bind(aggregation_parameter)
        .fetch_optional(&store.pool)
        .await?
        .map(|row| share_job_from_row(task_id, &row))
        .transpose()?)
}

pub(super) async fn list_aggregate_share_jobs(
    store: &PostgresDatastore,
    task_id: &TaskId,
    overlapping: &Interval,
) -> Result<Vec<AggregateShareJob>, TxError> {
    if overlapping.duration.0 == 0 {
        return Ok(Vec::new());
    }
    let mut jobs = sqlx::query(&list_aggregate_share_jobs_sql())
        .bind(&task_id.0[..])
        .bind(clamp_i64(overlapping.start.0))
        .fetch_all(&store.pool)
        .await?
        .iter()
        .map(|row| share_job_from_row(task_id, row))
        .filter(|j| {
            j.as_ref()
                .map_or(true, |j| j.batch_interval.overlaps(overlapping))
        })
        .collect::<Result<Vec<_>, _>>()?;
    jobs.sort_unstable_by(|a, b| {
        (a.batch_interval, &a.aggregation_parameter)
            .cmp(&(b.batch_interval, &b.aggregation_parameter))
    });
    Ok(jobs)
}

/// READ COMMITTED, under the task's batches lock (exclusive): the served batches and the
/// batch's aggregations are read after it, so no concurrent share or job write is missed (see
/// `served`). The insert either wins or waits for the conflicting row's writer to commit, after
/// which the comparison reads that committed row.
pub(super) async fn put_aggregate_share_job(
    store: &PostgresDatastore,
    job: &AggregateShareJob,
) -> Result<(), TxError> {
    let batch_start = to_i64(job.batch_interval.start.0, "batch start")?;
    let batch_duration = to_i64(job.batch_interval.duration.0, "batch duration")?;
    let task_key = store.task_key(&job.task_id).await?;
    let mut tx = store.begin().await?;
    sqlx::query("-- put_aggregate_share_job\nSELECT pg_advisory_xact_lock($1, $2)")
        .bind(BATCHES_LOCK)
        .bind(task_key)
        .execute(&mut *tx)
        .await?;
    let served = served_batches(&mut tx, &job.task_id, &job.batch_interval).await?;
    // The reports of the rows `get_batch_aggregations` reads.
    let sql = format!(
        "-- put_aggregate_share_job\n\
         SELECT COALESCE(SUM(report_count), 0)::BIGINT FROM batch_aggregations \
         WHERE {BUCKETS_IN}"
    );
    let aggregated: i64 = sqlx::query_scalar(&sql)
        .bind(store.role_str())
        .bind(&job.task_id.0[..])
        .bind(batch_start)
        .bind(clamp_i64(job.batch_interval.end().0))
        .bind(&job.aggregation_parameter[..])
        .fetch_one(&mut *tx)
        .await?;
    let aggregated = u64::try_from(aggregated)
        .map_err(|_| StoreError::Corrupt("a negative report count".into()))?;
    if let Err(e) = check_share(&served, job, aggregated) {
        tx.rollback().await?;
        return Err(e.into());
    }
    let inserted = sqlx::query(
        "-- put_aggregate_share_job\n\
         INSERT INTO aggregate_share_jobs (task_id, batch_start, batch_duration, \
           aggregation_parameter, report_count, checksum, encrypted_aggregate_share) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(&job.task_id.0[..])
    .bind(batch_start)
    .bind(batch_duration)
    .bind(&job.aggregation_parameter[..])
    .bind(to_i64(job.report_count, "report count")?)
    .bind(&job.checksum.0[..])
    .bind(job.encrypted_aggregate_share.get_encoded())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        let sql = format!(
            "-- put_aggregate_share_job\n\
             SELECT {SHARE_JOB_COLUMNS} FROM aggregate_share_jobs \
             WHERE task_id = $1 AND batch_start = $2 AND batch_duration = $3 \
               AND aggregation_parameter = $4"
        );
        let row = sqlx::query(&sql)
            .bind(&job.task_id.0[..])
            .bind(batch_start)
            .bind(batch_duration)
            .bind(&job.aggregation_parameter[..])
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(TxError::Raced(
                "the conflicting aggregate share was deleted",
            ))?;
        if share_job_from_row(&job.task_id, &row)? != *job {
            return Err(StoreError::AlreadyExists.into());
        }
    }
    Ok(tx.commit().await?)
}

/// Deletes up to `limit` of the oldest aggregation jobs stored more than `older_than_s` seconds
/// ago by the database's clock; returns how many.
pub(super) async fn delete_old_helper_aggregation_jobs(
    store: &PostgresDatastore,
    older_than_s: u64,
    limit: usize,
) -> Result<u64, TxError> {
    Ok(sqlx::query(
        "-- delete_old_helper_aggregation_jobs\n\
         DELETE FROM helper_aggregation_jobs WHERE (task_id, job_id) IN ( \
           SELECT task_id, job_id FROM helper_aggregation_jobs \
           WHERE created_at < EXTRACT(EPOCH FROM now())::BIGINT - $1 \
           ORDER BY created_at LIMIT $2)",
    )
    .bind(clamp_i64(older_than_s))
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .execute(&store.pool)
    .await?
    .rows_affected())
}

pub(super) async fn collected_intervals(
    store: &PostgresDatastore,
    task_id: &TaskId,
    within: &Interval,
) -> Result<Vec<Interval>, TxError> {
    served_batches(&mut *store.pool.acquire().await?, task_id, within).await
}

#[cfg(test)]
mod plans {
    use sqlx::{Connection, PgConnection};

    use super::super::plan_checks;
    use super::*;
    use crate::conformance::postgres::with_fresh_database;

    /// The probes of the Helper's replay runs are index descents on the primary key, with the
    /// run array as an index condition: not a scan of a run, or of the table.
    #[tokio::test]
    async fn report_id_probes_descend_the_primary_key() {
        with_fresh_database("helper_probe_plans", |url| async move {
            let store = PostgresDatastore::connect(&url).await.expect("connect");
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            let ids = vec![[1u8; 16], [2; 16]];
            let statements = [(SEEN_REPORT_IDS, false), (PUT_REPORT_IDS, true)];
            for (sql, put) in statements {
                let explain = format!("EXPLAIN {sql}");
                let mut query = sqlx::query(&explain).bind(1i32).bind(&ids).bind(&ids);
                query = if put {
                    query.bind(&ids).bind(0i32)
                } else {
                    query.bind(0i32)
                };
                let rows = query.fetch_all(&mut conn).await.expect("EXPLAIN");
                let plan = plan_checks::lines(&rows);
                plan_checks::assert_index_scans(
                    &plan,
                    "on helper_report_ids h",
                    2,
                    "Index Cond: ((run = ANY",
                );
            }
            conn.close().await.expect("close");
            store.close().await;
        })
        .await;
    }

    /// The served batches near a time are read through the index on their end, whose expression
    /// the queries must spell exactly as the index does: not through the primary key's task
    /// prefix, which holds the task's whole history. Checked on the generic plan, whose guesses
    /// see no values.
    #[tokio::test]
    async fn served_batches_are_read_by_their_end() {
        with_fresh_database("served_by_end_plans", |url| async move {
            let store = PostgresDatastore::connect(&url).await.expect("connect");
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            for set in [
                "SET enable_seqscan = off",
                "SET plan_cache_mode = force_generic_plan",
            ] {
                sqlx::query(set).execute(&mut conn).await.expect("SET");
            }
            for (name, sql) in [
                ("served", served_batches_sql()),
                ("listed", list_aggregate_share_jobs_sql()),
            ] {
                sqlx::query(&format!("PREPARE {name} (BYTEA, BIGINT) AS {sql}"))
                    .execute(&mut conn)
                    .await
                    .expect("PREPARE");
                let plan =
                    plan_checks::explain(&mut conn, &format!("EXECUTE {name} ('\\x01', 100)"))
                        .await;
                plan_checks::assert_index_scans(
                    &plan,
                    "using aggregate_share_jobs_by_end",
                    1,
                    "Index Cond: ((task_id = $1) AND ((LEAST(",
                );
            }
            conn.close().await.expect("close");
            store.close().await;
        })
        .await;
    }
}
