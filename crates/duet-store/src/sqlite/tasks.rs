//! Rows both roles keep: tasks, HPKE keypairs and batch aggregations.

use duet_core::hpke::{HpkeKeypair, HpkeKeypairSerde};
use duet_core::{AggregatorRole, Task, TaskParameters};
use duet_messages::dap09::{Interval, ReportIdChecksum, TaskId};
use sqlx::sqlite::SqliteRow;

use super::{
    clamp_i64, col, col_array, col_interval, col_u64, db, to_i64, SqliteDatastore, SqliteQuery,
};
use crate::{BatchAggregation, BatchSum, MergeFn, StoreError};

fn task_from_row(row: &SqliteRow) -> Result<Task, StoreError> {
    let json: String = col(row, "parameters")?;
    let parameters: TaskParameters = serde_json::from_str(&json)
        .map_err(|e| StoreError::Corrupt(format!("task parameters: {e}")))?;
    Task::from_parameters(&parameters)
        .map_err(|e| StoreError::Corrupt(format!("task parameters: {e}")))
}

pub(super) async fn put_task(store: &SqliteDatastore, task: &Task) -> Result<(), StoreError> {
    let parameters = task.to_parameters();
    let json = serde_json::to_string(&parameters)
        .map_err(|e| StoreError::Database(format!("serializing task parameters: {e}")))?;
    let mut tx = store.begin_write().await?;
    let inserted = sqlx::query(
        "-- put_task\n\
         INSERT INTO tasks (role, task_id, parameters) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(store.role_str())
    .bind(&task.id.0[..])
    .bind(&json)
    .execute(&mut *tx)
    .await
    .map_err(db)?
    .rows_affected();
    if inserted == 0 {
        let row =
            sqlx::query("-- put_task\nSELECT parameters FROM tasks WHERE role = ? AND task_id = ?")
                .bind(store.role_str())
                .bind(&task.id.0[..])
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
        // Compare the validated forms, so that formatting differences in stored JSON don't matter.
        if task_from_row(&row)? != *task {
            return Err(StoreError::AlreadyExists);
        }
    }
    tx.commit().await.map_err(db)
}

pub(super) async fn get_task(
    store: &SqliteDatastore,
    task_id: &TaskId,
) -> Result<Option<Task>, StoreError> {
    sqlx::query("-- get_task\nSELECT parameters FROM tasks WHERE role = ? AND task_id = ?")
        .bind(store.role_str())
        .bind(&task_id.0[..])
        .fetch_optional(&store.pool)
        .await
        .map_err(db)?
        .map(|row| task_from_row(&row))
        .transpose()
}

pub(super) async fn list_tasks(store: &SqliteDatastore) -> Result<Vec<Task>, StoreError> {
    sqlx::query("-- list_tasks\nSELECT parameters FROM tasks WHERE role = ? ORDER BY task_id")
        .bind(store.role_str())
        .fetch_all(&store.pool)
        .await
        .map_err(db)?
        .iter()
        .map(task_from_row)
        .collect()
}

/// Statements that remove a task's rows from the tables of one role; each binds the task ID.
const DELETE_LEADER: &[&str] = &[
    // A finished job deletes its rows: the rest are the task's pending reports, the backlog
    // (`reports` has no index by task, which would cost every upload). `seq_floor` keeps their
    // highest `seq` from being issued again; see `delete_task`.
    "-- delete_task\nDELETE FROM reports WHERE task_id = ?",
    "-- delete_task\nDELETE FROM aggregation_jobs WHERE task_id = ?",
    "-- delete_task\nDELETE FROM collection_jobs WHERE task_id = ?",
];
const DELETE_HELPER: &[&str] = &[
    "-- delete_task\nDELETE FROM helper_aggregation_jobs WHERE task_id = ?",
    "-- delete_task\nDELETE FROM aggregate_share_jobs WHERE task_id = ?",
];

pub(super) async fn delete_task(
    store: &SqliteDatastore,
    task_id: &TaskId,
) -> Result<bool, StoreError> {
    let mut tx = store.begin_write().await?;
    if store.role == AggregatorRole::Leader {
        // The task's pending reports may hold the highest `seq` issued, above the claim cursor:
        // later uploads start above it (see `put_reports`).
        sqlx::query(
            "-- delete_task\n\
             UPDATE report_cursor \
             SET seq_floor = MAX(seq_floor, (SELECT COALESCE(MAX(seq), 0) FROM reports)) \
             WHERE id = 0",
        )
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    }
    let role_tables = match store.role {
        AggregatorRole::Leader => DELETE_LEADER,
        AggregatorRole::Helper => DELETE_HELPER,
    };
    for sql in role_tables {
        sqlx::query(sql)
            .bind(&task_id.0[..])
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    }
    // Every process drops the task's IDs from its copy of the log.
    let replay = store.replay.of(store.role);
    let generation = replay.delete_task(&mut tx, task_id).await?;
    sqlx::query("-- delete_task\nDELETE FROM batch_aggregations WHERE role = ? AND task_id = ?")
        .bind(store.role_str())
        .bind(&task_id.0[..])
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    let deleted = sqlx::query("-- delete_task\nDELETE FROM tasks WHERE role = ? AND task_id = ?")
        .bind(store.role_str())
        .bind(&task_id.0[..])
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
    tx.commit().await.map_err(db)?;
    replay.forget_task(generation);
    Ok(deleted > 0)
}

pub(super) async fn put_hpke_keypair(
    store: &SqliteDatastore,
    keypair: &HpkeKeypair,
) -> Result<(), StoreError> {
    let json = serde_json::to_string(&keypair.to_serde())
        .map_err(|e| StoreError::Database(format!("serializing HPKE keypair: {e}")))?;
    let mut tx = store.begin_write().await?;
    let inserted = sqlx::query(
        "-- put_hpke_keypair\n\
         INSERT INTO hpke_keypairs (role, config_id, keypair) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(store.role_str())
    .bind(i64::from(keypair.config.id.0))
    .bind(&json)
    .execute(&mut *tx)
    .await
    .map_err(db)?
    .rows_affected();
    if inserted == 0 {
        return Err(StoreError::AlreadyExists);
    }
    tx.commit().await.map_err(db)
}

pub(super) async fn get_hpke_keypairs(
    store: &SqliteDatastore,
) -> Result<Vec<HpkeKeypair>, StoreError> {
    let rows = sqlx::query(
        "-- get_hpke_keypairs\nSELECT keypair FROM hpke_keypairs WHERE role = ? ORDER BY config_id",
    )
    .bind(store.role_str())
    .fetch_all(&store.pool)
    .await
    .map_err(db)?;
    rows.iter()
        .map(|row| {
            let json: String = col(row, "keypair")?;
            let serde: HpkeKeypairSerde = serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("HPKE keypair: {e}")))?;
            HpkeKeypair::from_serde(&serde)
                .map_err(|e| StoreError::Corrupt(format!("HPKE keypair: {e}")))
        })
        .collect()
}

fn batch_aggregation_from_row(
    task_id: &TaskId,
    row: &SqliteRow,
) -> Result<BatchAggregation, StoreError> {
    Ok(BatchAggregation {
        task_id: *task_id,
        bucket: col_interval(row, "bucket_start", "bucket_duration")?,
        aggregation_parameter: col(row, "aggregation_parameter")?,
        aggregate_share: col(row, "aggregate_share")?,
        report_count: col_u64(row, "report_count")?,
        checksum: ReportIdChecksum(col_array(row, "checksum")?),
    })
}

/// The batch aggregations of a role and task whose bucket lies in an interval, for an
/// aggregation parameter; bound in that order: role, task, the interval's start and end,
/// parameter.
pub(super) const BUCKETS_IN: &str = "role = ? AND task_id = ? AND bucket_start >= ? \
     AND bucket_start + bucket_duration <= ? AND aggregation_parameter = ?";

/// The batch aggregations in an interval, bound as [`BUCKETS_IN`] says, by bucket.
fn buckets_in_sql(caller: &str) -> String {
    format!(
        "-- {caller}\n\
         SELECT bucket_start, bucket_duration, aggregation_parameter, aggregate_share, report_count, checksum \
         FROM batch_aggregations WHERE {BUCKETS_IN} ORDER BY bucket_start, bucket_duration"
    )
}

/// `sql` (a [`buckets_in_sql`]) bound for this store's role, `task_id`'s buckets in `interval`
/// and `aggregation_parameter`.
fn bind_buckets_in<'q>(
    store: &SqliteDatastore,
    sql: &'q str,
    task_id: &'q TaskId,
    interval: &Interval,
    aggregation_parameter: &'q [u8],
) -> SqliteQuery<'q> {
    sqlx::query(sql)
        .bind(store.role_str())
        .bind(&task_id.0[..])
        .bind(clamp_i64(interval.start.0))
        .bind(clamp_i64(interval.end().0))
        .bind(aggregation_parameter)
}

pub(super) async fn get_batch_aggregations(
    store: &SqliteDatastore,
    task_id: &TaskId,
    interval: &Interval,
    aggregation_parameter: &[u8],
) -> Result<Vec<BatchAggregation>, StoreError> {
    let sql = buckets_in_sql("get_batch_aggregations");
    let rows = bind_buckets_in(store, &sql, task_id, interval, aggregation_parameter)
        .fetch_all(&store.pool)
        .await
        .map_err(db)?;
    rows.iter()
        .map(|row| batch_aggregation_from_row(task_id, row))
        .collect()
}

pub(super) async fn sum_batch_aggregations(
    store: &SqliteDatastore,
    task_id: &TaskId,
    interval: &Interval,
    aggregation_parameter: &[u8],
    merge: MergeFn<'_>,
) -> Result<BatchSum, StoreError> {
    let sql = buckets_in_sql("sum_batch_aggregations");
    let mut rows =
        bind_buckets_in(store, &sql, task_id, interval, aggregation_parameter).fetch(&store.pool);
    let mut sum = BatchSum::default();
    while let Some(row) = std::future::poll_fn(|cx| rows.as_mut().poll_next(cx)).await {
        sum.add(
            batch_aggregation_from_row(task_id, &row.map_err(db)?)?,
            merge,
        )?;
    }
    Ok(sum)
}

/// Folds `deltas` into the role's batch aggregations inside `tx`: a bucket without a row gets the
/// delta as is; otherwise shares are merged with `merge`, counts added and checksums XORed.
pub(super) async fn merge_batch_aggregations(
    store: &SqliteDatastore,
    tx: &mut super::WriteTx,
    deltas: &[BatchAggregation],
    merge: MergeFn<'_>,
) -> Result<(), StoreError> {
    for delta in deltas {
        let bucket_start = to_i64(delta.bucket.start.0, "bucket start")?;
        let bucket_duration = to_i64(delta.bucket.duration.0, "bucket duration")?;
        let existing = sqlx::query(
            "-- merge_batch_aggregations\n\
             SELECT aggregate_share, report_count, checksum FROM batch_aggregations \
             WHERE role = ? AND task_id = ? AND bucket_start = ? AND bucket_duration = ? \
               AND aggregation_parameter = ?",
        )
        .bind(store.role_str())
        .bind(&delta.task_id.0[..])
        .bind(bucket_start)
        .bind(bucket_duration)
        .bind(&delta.aggregation_parameter[..])
        .fetch_optional(&mut **tx)
        .await
        .map_err(db)?;
        let (share, count, checksum) = match existing {
            None => (
                delta.aggregate_share.clone(),
                delta.report_count,
                delta.checksum,
            ),
            Some(row) => {
                let stored_share: Vec<u8> = col(&row, "aggregate_share")?;
                let stored_count = col_u64(&row, "report_count")?;
                let stored_checksum = ReportIdChecksum(col_array(&row, "checksum")?);
                let share =
                    merge(&stored_share, &delta.aggregate_share).map_err(StoreError::Merge)?;
                let count = stored_count
                    .checked_add(delta.report_count)
                    .ok_or_else(|| StoreError::Merge("report count overflows".into()))?;
                (share, count, stored_checksum.combined_with(&delta.checksum))
            }
        };
        sqlx::query(
            "-- merge_batch_aggregations\n\
             INSERT INTO batch_aggregations (role, task_id, bucket_start, bucket_duration, \
               aggregation_parameter, aggregate_share, report_count, checksum) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (role, task_id, bucket_start, bucket_duration, aggregation_parameter) \
             DO UPDATE SET aggregate_share = excluded.aggregate_share, \
               report_count = excluded.report_count, checksum = excluded.checksum",
        )
        .bind(store.role_str())
        .bind(&delta.task_id.0[..])
        .bind(bucket_start)
        .bind(bucket_duration)
        .bind(&delta.aggregation_parameter[..])
        .bind(share)
        .bind(to_i64(count, "report count")?)
        .bind(&checksum.0[..])
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    }
    Ok(())
}
