//! Leader: collection jobs.
//!
//! A job is one row; its state is the `state` column plus the state's data (`collection` for
//! finished jobs, `abandon_reason` for abandoned ones). Deleting a finished job keeps its
//! `collection`, so its batch still counts as collected.

use duet_messages::dap09::{CollectionJobId, Interval, TaskId, Time};
use sqlx::sqlite::SqliteRow;

use super::{
    clamp_i64, col, col_array, col_interval, col_u64, db, lease_token, to_i64, SqliteDatastore,
};
use crate::{
    AcquiredCollectionJob, CollectionJob, CollectionJobBatch, CollectionJobState, Lease, StoreError,
};

/// The columns a [`CollectionJob`] is read from.
const JOB_COLUMNS: &str =
    "task_id, job_id, batch_start, batch_duration, aggregation_parameter, state, collection, abandon_reason";

fn job_from_row(row: &SqliteRow) -> Result<CollectionJob, StoreError> {
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
    store: &SqliteDatastore,
    job: &CollectionJob,
) -> Result<(), StoreError> {
    let (state, collection, reason) = job.state.to_columns();
    let mut tx = store.begin_write().await?;
    let inserted = sqlx::query(
        "-- put_collection_job\n\
         INSERT INTO collection_jobs (task_id, job_id, batch_start, batch_duration, \
           aggregation_parameter, state, collection, abandon_reason) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(&job.task_id.0[..])
    .bind(&job.id.0[..])
    .bind(to_i64(job.batch_interval.start.0, "batch start")?)
    .bind(to_i64(job.batch_interval.duration.0, "batch duration")?)
    .bind(&job.aggregation_parameter[..])
    .bind(state)
    .bind(collection)
    .bind(reason)
    .execute(&mut *tx)
    .await
    .map_err(db)?
    .rows_affected();
    if inserted == 0 {
        let existing = sqlx::query(
            "-- put_collection_job\n\
             SELECT batch_start, batch_duration, aggregation_parameter FROM collection_jobs \
             WHERE task_id = ? AND job_id = ?",
        )
        .bind(&job.task_id.0[..])
        .bind(&job.id.0[..])
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        // The same request again (the collector retrying its PUT) is fine whatever state the job
        // reached since; only what the collector asked for must match.
        let same = col_interval(&existing, "batch_start", "batch_duration")? == job.batch_interval
            && col::<_, Vec<u8>>(&existing, "aggregation_parameter")? == job.aggregation_parameter;
        if !same {
            return Err(StoreError::AlreadyExists);
        }
    } else if overlaps_another(&mut tx, job).await? {
        return Err(StoreError::BatchOverlap);
    }
    tx.commit().await.map_err(db)
}

/// Whether another job of `job`'s task, not deleted or deleted after its batch was collected,
/// has a batch that overlaps `job`'s without being the same. Read in the write transaction
/// that inserted `job` (write transactions are serial), so of two overlapping jobs created at
/// once the second sees the first.
async fn overlaps_another(
    tx: &mut sqlx::SqliteConnection,
    job: &CollectionJob,
) -> Result<bool, StoreError> {
    let start = to_i64(job.batch_interval.start.0, "batch start")?;
    let duration = to_i64(job.batch_interval.duration.0, "batch duration")?;
    let row = sqlx::query(OVERLAPS_ANOTHER)
        .bind(&job.task_id.0[..])
        .bind(&job.id.0[..])
        .bind(start)
        .bind(clamp_i64(job.batch_interval.end().0))
        .bind(duration)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
    col(&row, "overlap")
}

/// See [`overlaps_another`]. The end's test is written so that integer arithmetic cannot
/// overflow.
const OVERLAPS_ANOTHER: &str = "-- put_collection_job\n\
     SELECT EXISTS (SELECT 1 FROM collection_jobs \
       WHERE task_id = ?1 AND job_id != ?2 AND (state != 'deleted' OR collection IS NOT NULL) \
         AND batch_start > ?3 - batch_duration AND batch_start < ?4 \
         AND NOT (batch_start = ?3 AND batch_duration = ?5)) AS overlap";

pub(super) async fn get_collection_job(
    store: &SqliteDatastore,
    task_id: &TaskId,
    id: &CollectionJobId,
) -> Result<Option<CollectionJob>, StoreError> {
    let sql = format!("-- get_collection_job\nSELECT {JOB_COLUMNS} FROM collection_jobs WHERE task_id = ? AND job_id = ?");
    sqlx::query(&sql)
        .bind(&task_id.0[..])
        .bind(&id.0[..])
        .fetch_optional(&store.pool)
        .await
        .map_err(db)?
        .map(|row| job_from_row(&row))
        .transpose()
}

pub(super) async fn collection_job_batches(
    store: &SqliteDatastore,
    task_id: &TaskId,
    overlapping: &Interval,
) -> Result<Vec<CollectionJobBatch>, StoreError> {
    if overlapping.duration.0 == 0 {
        return Ok(Vec::new());
    }
    // The end's test is written so that integer arithmetic cannot overflow.
    sqlx::query(
        "-- collection_job_batches\n\
         SELECT job_id, batch_start, batch_duration, aggregation_parameter FROM collection_jobs \
         WHERE task_id = ?1 AND state != 'deleted' \
           AND batch_start > ?2 - batch_duration AND batch_start < ?3 \
         ORDER BY batch_start, job_id",
    )
    .bind(&task_id.0[..])
    .bind(clamp_i64(overlapping.start.0))
    .bind(clamp_i64(overlapping.end().0))
    .fetch_all(&store.pool)
    .await
    .map_err(db)?
    .iter()
    .map(crate::rows::collection_job_batch)
    .collect()
}

pub(super) async fn delete_collection_job(
    store: &SqliteDatastore,
    task_id: &TaskId,
    id: &CollectionJobId,
) -> Result<bool, StoreError> {
    let mut tx = store.begin_write().await?;
    // A lease held on the job stays, so that its driver, if the Helper served the batch
    // meanwhile, can still record the batch as collected (see `finish_collection_job`).
    let updated = sqlx::query(
        "-- delete_collection_job\n\
         UPDATE collection_jobs SET state = 'deleted' \
         WHERE task_id = ? AND job_id = ?",
    )
    .bind(&task_id.0[..])
    .bind(&id.0[..])
    .execute(&mut *tx)
    .await
    .map_err(db)?
    .rows_affected();
    tx.commit().await.map_err(db)?;
    Ok(updated > 0)
}

pub(super) async fn acquire_collection_jobs(
    store: &SqliteDatastore,
    now: Time,
    lease_duration: u64,
    limit: usize,
) -> Result<Vec<AcquiredCollectionJob>, StoreError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let expiry = Time(now.0.saturating_add(lease_duration));
    let now = to_i64(now.0, "time")?;
    let mut tx = store.begin_write().await?;
    let sql = format!(
        "-- acquire_collection_jobs\n\
         SELECT {JOB_COLUMNS} FROM collection_jobs \
         WHERE state = 'start' AND retry_at <= ? AND lease_expiry <= ? \
         ORDER BY retry_at LIMIT ?"
    );
    let candidates = sqlx::query(&sql)
        .bind(now)
        .bind(now)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
    let mut acquired = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        let job = job_from_row(&candidate)?;
        let token = lease_token();
        let row = sqlx::query(
            "-- acquire_collection_jobs\n\
             UPDATE collection_jobs \
             SET lease_token = ?, lease_expiry = ?, lease_attempts = lease_attempts + 1 \
             WHERE task_id = ? AND job_id = ? RETURNING lease_attempts",
        )
        .bind(&token[..])
        .bind(clamp_i64(expiry.0))
        .bind(&job.task_id.0[..])
        .bind(&job.id.0[..])
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let attempts = u32::try_from(col_u64(&row, "lease_attempts")?)
            .map_err(|_| StoreError::Corrupt("lease_attempts out of range".into()))?;
        acquired.push(AcquiredCollectionJob {
            job,
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

pub(super) async fn release_collection_job(
    store: &SqliteDatastore,
    job: &AcquiredCollectionJob,
    retry_at: Time,
    attempt: bool,
) -> Result<(), StoreError> {
    let mut tx = store.begin_write().await?;
    let updated = sqlx::query(
        "-- release_collection_job\n\
         UPDATE collection_jobs SET lease_token = NULL, lease_expiry = 0, retry_at = ?, \
           lease_attempts = CASE WHEN ? THEN lease_attempts ELSE MAX(lease_attempts - 1, 0) END \
         WHERE task_id = ? AND job_id = ? AND state IN ('start', 'deleted') AND lease_token = ?",
    )
    .bind(to_i64(retry_at.0, "retry time")?)
    .bind(attempt)
    .bind(&job.job.task_id.0[..])
    .bind(&job.job.id.0[..])
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

pub(super) async fn finish_collection_job(
    store: &SqliteDatastore,
    job: &AcquiredCollectionJob,
    state: &CollectionJobState,
) -> Result<(), StoreError> {
    if !matches!(
        state,
        CollectionJobState::Finished(_) | CollectionJobState::Abandoned(_)
    ) {
        return Err(StoreError::Database(
            "finish_collection_job: the final state must be Finished or Abandoned".into(),
        ));
    }
    let (state, collection, reason) = state.to_columns();
    let mut tx = store.begin_write().await?;
    let updated = sqlx::query(
        "-- finish_collection_job\n\
         UPDATE collection_jobs \
         SET state = CASE state WHEN 'deleted' THEN state ELSE ? END, collection = ?, \
           abandon_reason = ?, lease_token = NULL, lease_expiry = 0 \
         WHERE task_id = ? AND job_id = ? AND state IN ('start', 'deleted') AND lease_token = ?",
    )
    .bind(state)
    .bind(collection)
    .bind(reason)
    .bind(&job.job.task_id.0[..])
    .bind(&job.job.id.0[..])
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

pub(super) async fn collected_intervals(
    store: &SqliteDatastore,
    task_id: &TaskId,
    within: &Interval,
) -> Result<Vec<Interval>, StoreError> {
    if within.duration.0 == 0 {
        return Ok(Vec::new());
    }
    // Finished jobs, and finished jobs deleted since: their batch was collected either way. The
    // end's test is written so that integer arithmetic cannot overflow.
    sqlx::query(
        "-- collected_intervals\n\
         SELECT DISTINCT batch_start, batch_duration FROM collection_jobs \
         WHERE task_id = ?1 AND collection IS NOT NULL \
           AND batch_start > ?2 - batch_duration AND batch_start < ?3 \
         ORDER BY batch_start, batch_duration",
    )
    .bind(&task_id.0[..])
    .bind(clamp_i64(within.start.0))
    .bind(clamp_i64(within.end().0))
    .fetch_all(&store.pool)
    .await
    .map_err(db)?
    .iter()
    .map(|row| col_interval(row, "batch_start", "batch_duration"))
    .collect()
}
