//! Leader: collection jobs.
//!
//! A job is one row; its state is the `state` column plus the state's data (`collection` for
//! finished jobs, `abandon_reason` for abandoned ones). Deleting a finished job keeps its
//! `collection`, so its batch still counts as collected. Every write is one statement at READ
//! COMMITTED except `put_collection_job` and `acquire_collection_jobs` (two each, in one
//! transaction; a new job also sends the `CollectionWorkReady` wake-up); a lease is checked by the same `UPDATE` that ends it, under the row's lock.

use std::collections::HashMap;

use duet_messages::dap09::{CollectionJobId, Interval, TaskId, Time};
use sqlx::postgres::PgRow;

use super::{
    clamp_i64, col, col_array, col_interval, col_u32, lease_token, limit_i64, notify, to_i64,
    PostgresDatastore, TxError,
};
use crate::{
    AcquiredCollectionJob, CollectionJob, CollectionJobBatch, CollectionJobState, Lease,
    StoreError, Wakeup,
};

/// The advisory lock, with the task key, that puts the creations of a task's collection jobs
/// one after another, so that each one's overlap check sees the jobs created before it.
const COLLECTION_JOBS_LOCK: i32 = 0x6475_6543; // "dueC"

/// Whether another job of the task (`$1`), not deleted or deleted after its batch was
/// collected, has a batch that overlaps the new job's (`$2`, from `$3` to `$4`, `$5` long)
/// without being the same. The end's test is written so that BIGINT arithmetic cannot overflow.
const OVERLAPS_ANOTHER: &str = "-- put_collection_job\n\
     SELECT EXISTS (SELECT 1 FROM collection_jobs \
       WHERE task_id = $1 AND job_id <> $2 AND (state <> 'deleted' OR collection IS NOT NULL) \
         AND batch_start > $3 - batch_duration AND batch_start < $4 \
         AND NOT (batch_start = $3 AND batch_duration = $5))";

/// The columns a [`CollectionJob`] is read from.
const JOB_COLUMNS: &str = "task_id, job_id, batch_start, batch_duration, aggregation_parameter, \
     state, collection, abandon_reason";

fn job_from_row(row: &PgRow) -> Result<CollectionJob, StoreError> {
    let state: String = col(row, "state")?;
    let state = CollectionJobState::from_columns(
        &state,
        col(row, "collection")?,
        col(row, "abandon_reason")?,
    )?;
    Ok(CollectionJob {
        task_id: TaskId(col_array(row, "task_id")?),
        id: CollectionJobId(col_array(row, "job_id")?),
        batch_interval: col_interval(row, "batch_start", "batch_duration")?,
        aggregation_parameter: col(row, "aggregation_parameter")?,
        state,
    })
}

pub(super) async fn put_collection_job(
    store: &PostgresDatastore,
    job: &CollectionJob,
) -> Result<(), TxError> {
    let (state, collection, reason) = job.state.to_columns();
    let batch_start = to_i64(job.batch_interval.start.0, "batch start")?;
    let batch_duration = to_i64(job.batch_interval.duration.0, "batch duration")?;
    let task_key = store.task_key(&job.task_id).await?;
    let mut tx = store.begin().await?;
    // A statement of its own, so that the overlap check's snapshot, taken after it, sees the
    // jobs of every creator that held the lock before.
    sqlx::query("-- put_collection_job\nSELECT pg_advisory_xact_lock($1, $2)")
        .bind(COLLECTION_JOBS_LOCK)
        .bind(task_key)
        .execute(&mut *tx)
        .await?;
    let inserted = sqlx::query(
        "-- put_collection_job\n\
         INSERT INTO collection_jobs (task_id, job_id, batch_start, batch_duration, \
           aggregation_parameter, state, collection, abandon_reason) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
    )
    .bind(&job.task_id.0[..])
    .bind(&job.id.0[..])
    .bind(batch_start)
    .bind(batch_duration)
    .bind(&job.aggregation_parameter[..])
    .bind(state)
    .bind(collection)
    .bind(reason)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        let existing = sqlx::query(
            "-- put_collection_job\n\
             SELECT batch_start, batch_duration, aggregation_parameter FROM collection_jobs \
             WHERE task_id = $1 AND job_id = $2",
        )
        .bind(&job.task_id.0[..])
        .bind(&job.id.0[..])
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(TxError::Raced("the conflicting collection job was deleted"))?;
        // The same request again (the collector retrying its PUT) is fine whatever state the job
        // reached since; only what the collector asked for must match.
        let same = col_interval(&existing, "batch_start", "batch_duration")? == job.batch_interval
            && col::<_, Vec<u8>>(&existing, "aggregation_parameter")? == job.aggregation_parameter;
        if !same {
            return Err(StoreError::AlreadyExists.into());
        }
    } else if sqlx::query_scalar::<_, bool>(OVERLAPS_ANOTHER)
        .bind(&job.task_id.0[..])
        .bind(&job.id.0[..])
        .bind(batch_start)
        .bind(clamp_i64(job.batch_interval.end().0))
        .bind(batch_duration)
        .fetch_one(&mut *tx)
        .await?
    {
        return Err(StoreError::BatchOverlap.into());
    } else if matches!(job.state, CollectionJobState::Start) {
        notify::notify(
            &mut tx,
            "-- put_collection_job\nSELECT pg_notify($1, $2)",
            Wakeup::CollectionWorkReady,
        )
        .await?;
    }
    Ok(tx.commit().await?)
}

pub(super) async fn get_collection_job(
    store: &PostgresDatastore,
    task_id: &TaskId,
    id: &CollectionJobId,
) -> Result<Option<CollectionJob>, TxError> {
    let sql = format!(
        "-- get_collection_job\n\
         SELECT {JOB_COLUMNS} FROM collection_jobs WHERE task_id = $1 AND job_id = $2"
    );
    Ok(sqlx::query(&sql)
        .bind(&task_id.0[..])
        .bind(&id.0[..])
        .fetch_optional(&store.pool)
        .await?
        .map(|row| job_from_row(&row))
        .transpose()?)
}

pub(super) async fn collection_job_batches(
    store: &PostgresDatastore,
    task_id: &TaskId,
    overlapping: &Interval,
) -> Result<Vec<CollectionJobBatch>, TxError> {
    if overlapping.duration.0 == 0 {
        return Ok(Vec::new());
    }
    // The end's test is written so that BIGINT arithmetic cannot overflow.
    sqlx::query(
        "-- collection_job_batches\n\
         SELECT job_id, batch_start, batch_duration, aggregation_parameter FROM collection_jobs \
         WHERE task_id = $1 AND state != 'deleted' \
           AND batch_start > $2 - batch_duration AND batch_start < $3 \
         ORDER BY batch_start, job_id",
    )
    .bind(&task_id.0[..])
    .bind(clamp_i64(overlapping.start.0))
    .bind(clamp_i64(overlapping.end().0))
    .fetch_all(&store.pool)
    .await?
    .iter()
    .map(|row| Ok(crate::rows::collection_job_batch(row)?))
    .collect()
}

/// One statement, READ COMMITTED.
pub(super) async fn delete_collection_job(
    store: &PostgresDatastore,
    task_id: &TaskId,
    id: &CollectionJobId,
) -> Result<bool, TxError> {
    // A lease held on the job stays, so that its driver, if the Helper served the batch
    // meanwhile, can still record the batch as collected (see `finish_collection_job`).
    let updated = sqlx::query(
        "-- delete_collection_job\n\
         UPDATE collection_jobs SET state = 'deleted' \
         WHERE task_id = $1 AND job_id = $2",
    )
    .bind(&task_id.0[..])
    .bind(&id.0[..])
    .execute(&store.pool)
    .await?
    .rows_affected();
    Ok(updated > 0)
}

/// READ COMMITTED plus `FOR UPDATE SKIP LOCKED` on the jobs leased, as for aggregation jobs.
pub(super) async fn acquire_collection_jobs(
    store: &PostgresDatastore,
    now: Time,
    lease_duration: u64,
    limit: usize,
) -> Result<Vec<AcquiredCollectionJob>, TxError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let expiry = Time(now.0.saturating_add(lease_duration));
    let now = to_i64(now.0, "time")?;
    let mut tx = store.begin().await?;
    let sql = format!(
        "-- acquire_collection_jobs\n\
         SELECT {JOB_COLUMNS} FROM collection_jobs \
         WHERE state = 'start' AND retry_at <= $1 AND lease_expiry <= $1 \
         ORDER BY retry_at LIMIT $2 \
         FOR UPDATE SKIP LOCKED"
    );
    let candidates = sqlx::query(&sql)
        .bind(now)
        .bind(limit_i64(limit))
        .fetch_all(&mut *tx)
        .await?;
    if candidates.is_empty() {
        tx.commit().await?;
        return Ok(Vec::new());
    }
    let jobs = candidates
        .iter()
        .map(job_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let task_ids: Vec<[u8; 32]> = jobs.iter().map(|j| j.task_id.0).collect();
    let job_ids: Vec<[u8; 16]> = jobs.iter().map(|j| j.id.0).collect();
    let tokens: Vec<[u8; 16]> = jobs.iter().map(|_| lease_token()).collect();
    let leased = sqlx::query(
        "-- acquire_collection_jobs\n\
         UPDATE collection_jobs AS j \
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
    tx.commit().await?;
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
    // In the order picked: the longest-waiting jobs first.
    let mut acquired = Vec::with_capacity(jobs.len());
    for job in jobs {
        let lease = leases
            .remove(&(job.task_id.0, job.id.0))
            .ok_or_else(|| StoreError::Database("a picked collection job was not leased".into()))?;
        acquired.push(AcquiredCollectionJob { job, lease });
    }
    Ok(acquired)
}

/// One statement, READ COMMITTED; the row lock it takes orders it with concurrent acquisitions.
pub(super) async fn release_collection_job(
    store: &PostgresDatastore,
    job: &AcquiredCollectionJob,
    retry_at: Time,
    attempt: bool,
) -> Result<(), TxError> {
    let updated = sqlx::query(
        "-- release_collection_job\n\
         UPDATE collection_jobs SET lease_token = NULL, lease_expiry = 0, retry_at = $1, \
           lease_attempts = CASE WHEN $5 THEN lease_attempts \
             ELSE GREATEST(lease_attempts - 1, 0) END \
         WHERE task_id = $2 AND job_id = $3 AND state IN ('start', 'deleted') AND lease_token = $4",
    )
    .bind(to_i64(retry_at.0, "retry time")?)
    .bind(&job.job.task_id.0[..])
    .bind(&job.job.id.0[..])
    .bind(&job.lease.token[..])
    .bind(attempt)
    .execute(&store.pool)
    .await?
    .rows_affected();
    if updated == 0 {
        return Err(StoreError::LeaseLost.into());
    }
    Ok(())
}

/// One statement, READ COMMITTED, as for releasing.
pub(super) async fn finish_collection_job(
    store: &PostgresDatastore,
    job: &AcquiredCollectionJob,
    state: &CollectionJobState,
) -> Result<(), TxError> {
    if !matches!(
        state,
        CollectionJobState::Finished(_) | CollectionJobState::Abandoned(_)
    ) {
        return Err(StoreError::Database(
            "finish_collection_job: the final state must be Finished or Abandoned".into(),
        )
        .into());
    }
    let (state, collection, reason) = state.to_columns();
    let updated = sqlx::query(
        "-- finish_collection_job\n\
         UPDATE collection_jobs \
         SET state = CASE state WHEN 'deleted' THEN state ELSE $1 END, collection = $2, \
           abandon_reason = $3, lease_token = NULL, lease_expiry = 0 \
         WHERE task_id = $4 AND job_id = $5 AND state IN ('start', 'deleted') \
           AND lease_token = $6",
    )
    .bind(state)
    .bind(collection)
    .bind(reason)
    .bind(&job.job.task_id.0[..])
    .bind(&job.job.id.0[..])
    .bind(&job.lease.token[..])
    .execute(&store.pool)
    .await?
    .rows_affected();
    if updated == 0 {
        return Err(StoreError::LeaseLost.into());
    }
    Ok(())
}

pub(super) async fn collected_intervals(
    store: &PostgresDatastore,
    task_id: &TaskId,
    within: &Interval,
) -> Result<Vec<Interval>, TxError> {
    if within.duration.0 == 0 {
        return Ok(Vec::new());
    }
    // Finished jobs, and finished jobs deleted since: their batch was collected either way. The
    // end's test is written so that BIGINT arithmetic cannot overflow.
    Ok(sqlx::query(
        "-- collected_intervals\n\
         SELECT DISTINCT batch_start, batch_duration FROM collection_jobs \
         WHERE task_id = $1 AND collection IS NOT NULL \
           AND batch_start > $2 - batch_duration AND batch_start < $3 \
         ORDER BY batch_start, batch_duration",
    )
    .bind(&task_id.0[..])
    .bind(clamp_i64(within.start.0))
    .bind(clamp_i64(within.end().0))
    .fetch_all(&store.pool)
    .await?
    .iter()
    .map(|row| col_interval(row, "batch_start", "batch_duration"))
    .collect::<Result<_, _>>()?)
}
