//! Rows both roles keep: tasks, HPKE keypairs and batch aggregations.

use std::collections::BTreeMap;

use duet_core::hpke::{HpkeKeypair, HpkeKeypairSerde};
use duet_core::{AggregatorRole, Task, TaskParameters};
use duet_messages::dap09::{Interval, ReportIdChecksum, TaskId};
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Transaction};

use super::{clamp_i64, col, col_array, col_interval, col_u64, to_i64, PostgresDatastore, TxError};
use crate::{BatchAggregation, BatchSum, MergeFn, StoreError};

fn task_from_row(row: &PgRow) -> Result<Task, StoreError> {
    let json: String = col(row, "parameters")?;
    let parameters: TaskParameters = serde_json::from_str(&json)
        .map_err(|e| StoreError::Corrupt(format!("task parameters: {e}")))?;
    Task::from_parameters(&parameters)
        .map_err(|e| StoreError::Corrupt(format!("task parameters: {e}")))
}

/// READ COMMITTED: the insert either wins or waits for the conflicting row's writer to commit,
/// after which the comparison reads that committed row.
pub(super) async fn put_task(store: &PostgresDatastore, task: &Task) -> Result<(), TxError> {
    let parameters = task.to_parameters();
    let json = serde_json::to_string(&parameters)
        .map_err(|e| StoreError::Database(format!("serializing task parameters: {e}")))?;
    let mut tx = store.begin().await?;
    let inserted = sqlx::query(
        "-- put_task\n\
         INSERT INTO tasks (role, task_id, parameters) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(store.role_str())
    .bind(&task.id.0[..])
    .bind(&json)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        let row = sqlx::query(
            "-- put_task\nSELECT parameters FROM tasks WHERE role = $1 AND task_id = $2",
        )
        .bind(store.role_str())
        .bind(&task.id.0[..])
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(TxError::Raced("the conflicting task was deleted"))?;
        // Compare the validated forms, so that formatting differences in stored JSON don't matter.
        if task_from_row(&row)? != *task {
            return Err(StoreError::AlreadyExists.into());
        }
    }
    Ok(tx.commit().await?)
}

pub(super) async fn get_task(
    store: &PostgresDatastore,
    task_id: &TaskId,
) -> Result<Option<Task>, TxError> {
    Ok(
        sqlx::query("-- get_task\nSELECT parameters FROM tasks WHERE role = $1 AND task_id = $2")
            .bind(store.role_str())
            .bind(&task_id.0[..])
            .fetch_optional(&store.pool)
            .await?
            .map(|row| task_from_row(&row))
            .transpose()?,
    )
}

pub(super) async fn list_tasks(store: &PostgresDatastore) -> Result<Vec<Task>, TxError> {
    Ok(
        sqlx::query("-- list_tasks\nSELECT parameters FROM tasks WHERE role = $1 ORDER BY task_id")
            .bind(store.role_str())
            .fetch_all(&store.pool)
            .await?
            .iter()
            .map(task_from_row)
            .collect::<Result<_, _>>()?,
    )
}

/// One statement per role removing a task and everything under it ($1: role, $2: task ID); the
/// data-modifying CTEs run to completion whether or not their output is read. The Leader's claim
/// cursor moves past the deleted queue, so that job creation does not walk its deleted entries,
/// but, as in job creation, only past uploads older than every running transaction: an upload
/// still running may commit later, and must not fall behind the cursor (the task's key stays:
/// other processes may hold it).
const DELETE_LEADER_TASK: &str = "-- delete_task\n\
     WITH key AS (SELECT task_key FROM replay_tasks WHERE task_id = $2), \
          ids_gone AS (DELETE FROM claimed_report_ids \
            WHERE run = ANY(ARRAY(SELECT generate_series(0, \
                (SELECT open_run FROM leader_replay_state)))) \
              AND task_key = (SELECT task_key FROM key)), \
          queue_gone AS (DELETE FROM report_queue WHERE task_key = (SELECT task_key FROM key)), \
          queue_end AS (SELECT upload_xid, client_time, report_id FROM report_queue \
            WHERE task_key = (SELECT task_key FROM key) \
              AND upload_xid < pg_snapshot_xmin(pg_current_snapshot()) \
            ORDER BY upload_xid DESC, client_time DESC, report_id DESC LIMIT 1), \
          cursor_moved AS (UPDATE replay_tasks AS k \
            SET claimed_xid = e.upload_xid, claimed_time = e.client_time, \
              claimed_id = e.report_id \
            FROM queue_end AS e WHERE k.task_id = $2 \
              AND (e.upload_xid, e.client_time, e.report_id) \
                > (k.claimed_xid, k.claimed_time, k.claimed_id)), \
          jobs_gone AS (DELETE FROM aggregation_jobs WHERE task_id = $2), \
          collections_gone AS (DELETE FROM collection_jobs WHERE task_id = $2), \
          aggregations_gone AS (DELETE FROM batch_aggregations WHERE role = $1 AND task_id = $2) \
     DELETE FROM tasks WHERE role = $1 AND task_id = $2";
const DELETE_HELPER_TASK: &str = "-- delete_task\n\
     WITH jobs_gone AS (DELETE FROM helper_aggregation_jobs WHERE task_id = $2), \
          ids_gone AS (DELETE FROM helper_report_ids \
            WHERE run = ANY(ARRAY(SELECT generate_series(0, \
                (SELECT open_run FROM helper_replay_state)))) \
              AND task_key = (SELECT task_key FROM replay_tasks WHERE task_id = $2)), \
          shares_gone AS (DELETE FROM aggregate_share_jobs WHERE task_id = $2), \
          aggregations_gone AS (DELETE FROM batch_aggregations WHERE role = $1 AND task_id = $2) \
     DELETE FROM tasks WHERE role = $1 AND task_id = $2";

/// One statement, READ COMMITTED, in a transaction that on the Leader first waits for the
/// task's job creators (its job-creation lock, taken blocking).
pub(super) async fn delete_task(
    store: &PostgresDatastore,
    task_id: &TaskId,
) -> Result<bool, TxError> {
    let sql = match store.role {
        AggregatorRole::Leader => DELETE_LEADER_TASK,
        AggregatorRole::Helper => DELETE_HELPER_TASK,
    };
    let mut tx = store.begin().await?;
    if store.role == AggregatorRole::Leader {
        // Waits for a job creator of the task that holds this lock (from its claim to its
        // commit), so that its job does not commit after the deletion's snapshot and outlive
        // the task. Creators that come later, of processes still serving the task, are not
        // kept out (see `Datastore::delete_task`).
        sqlx::query(
            "-- delete_task\n\
             SELECT pg_advisory_xact_lock(1685415284, task_key) FROM replay_tasks \
             WHERE task_id = $1",
        )
        .bind(&task_id.0[..])
        .execute(&mut *tx)
        .await?;
    }
    let deleted = sqlx::query(sql)
        .bind(store.role_str())
        .bind(&task_id.0[..])
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(deleted > 0)
}

/// One statement, READ COMMITTED; the primary key decides between concurrent writers.
pub(super) async fn put_hpke_keypair(
    store: &PostgresDatastore,
    keypair: &HpkeKeypair,
) -> Result<(), TxError> {
    let json = serde_json::to_string(&keypair.to_serde())
        .map_err(|e| StoreError::Database(format!("serializing HPKE keypair: {e}")))?;
    let inserted = sqlx::query(
        "-- put_hpke_keypair\n\
         INSERT INTO hpke_keypairs (role, config_id, keypair) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(store.role_str())
    .bind(i32::from(keypair.config.id.0))
    .bind(&json)
    .execute(&store.pool)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(StoreError::AlreadyExists.into());
    }
    Ok(())
}

pub(super) async fn get_hpke_keypairs(
    store: &PostgresDatastore,
) -> Result<Vec<HpkeKeypair>, TxError> {
    let rows = sqlx::query(
        "-- get_hpke_keypairs\n\
         SELECT keypair FROM hpke_keypairs WHERE role = $1 ORDER BY config_id",
    )
    .bind(store.role_str())
    .fetch_all(&store.pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let json: String = col(row, "keypair")?;
            let serde: HpkeKeypairSerde = serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("HPKE keypair: {e}")))?;
            HpkeKeypair::from_serde(&serde)
                .map_err(|e| StoreError::Corrupt(format!("HPKE keypair: {e}")))
        })
        .collect::<Result<_, StoreError>>()?)
}

fn batch_aggregation_from_row(
    task_id: &TaskId,
    row: &PgRow,
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

/// The batch aggregations of role `$1` and task `$2` whose bucket lies in the interval from `$3`
/// to `$4` (its end, clamped), for parameter `$5`. `bucket_duration <= end - bucket_start` rather
/// than `bucket_start + bucket_duration <= end`: BIGINT arithmetic raises an error on overflow,
/// and this form cannot overflow.
pub(super) const BUCKETS_IN: &str = "role = $1 AND task_id = $2 AND bucket_start >= $3 \
     AND bucket_duration <= $4 - bucket_start AND aggregation_parameter = $5";

/// The batch aggregations in an interval, bound as [`BUCKETS_IN`] says, by bucket.
fn buckets_in_sql(caller: &str) -> String {
    format!(
        "-- {caller}\n\
         SELECT bucket_start, bucket_duration, aggregation_parameter, aggregate_share, \
           report_count, checksum \
         FROM batch_aggregations WHERE {BUCKETS_IN} ORDER BY bucket_start, bucket_duration"
    )
}

/// `sql` (a [`buckets_in_sql`]) bound for this store's role, `task_id`'s buckets in `interval`
/// and `aggregation_parameter`.
fn bind_buckets_in<'q>(
    store: &PostgresDatastore,
    sql: &'q str,
    task_id: &'q TaskId,
    interval: &Interval,
    aggregation_parameter: &'q [u8],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql)
        .bind(store.role_str())
        .bind(&task_id.0[..])
        .bind(clamp_i64(interval.start.0))
        .bind(clamp_i64(interval.end().0))
        .bind(aggregation_parameter)
}

/// Adds up the batch aggregations in an interval as they arrive (one attempt: a retry starts
/// over).
pub(super) async fn sum_batch_aggregations(
    store: &PostgresDatastore,
    task_id: &TaskId,
    interval: &Interval,
    aggregation_parameter: &[u8],
    merge: MergeFn<'_>,
) -> Result<BatchSum, TxError> {
    let sql = buckets_in_sql("sum_batch_aggregations");
    let mut rows =
        bind_buckets_in(store, &sql, task_id, interval, aggregation_parameter).fetch(&store.pool);
    let mut sum = BatchSum::default();
    while let Some(row) = std::future::poll_fn(|cx| rows.as_mut().poll_next(cx)).await {
        sum.add(batch_aggregation_from_row(task_id, &row?)?, merge)?;
    }
    Ok(sum)
}

pub(super) async fn get_batch_aggregations(
    store: &PostgresDatastore,
    task_id: &TaskId,
    interval: &Interval,
    aggregation_parameter: &[u8],
) -> Result<Vec<BatchAggregation>, TxError> {
    let sql = buckets_in_sql("get_batch_aggregations");
    let rows = bind_buckets_in(store, &sql, task_id, interval, aggregation_parameter)
        .fetch_all(&store.pool)
        .await?;
    Ok(rows
        .iter()
        .map(|row| batch_aggregation_from_row(task_id, row))
        .collect::<Result<_, _>>()?)
}

/// A batch aggregation's key within a role: task, bucket start and duration, parameter.
type BucketKey = ([u8; 32], i64, i64, Vec<u8>);

/// What is to be written for one bucket.
struct BucketValue {
    share: Vec<u8>,
    count: u64,
    checksum: ReportIdChecksum,
}

/// Adds `delta` to `into`.
fn fold(
    into: &mut BucketValue,
    share: &[u8],
    count: u64,
    checksum: &ReportIdChecksum,
    merge: MergeFn<'_>,
) -> Result<(), StoreError> {
    into.share = merge(&into.share, share).map_err(StoreError::Merge)?;
    into.count = into
        .count
        .checked_add(count)
        .ok_or_else(|| StoreError::Merge("report count overflows".into()))?;
    into.checksum = into.checksum.combined_with(checksum);
    Ok(())
}

/// Column arrays for the `UNNEST` of a set of buckets (with their values when `values`).
#[derive(Default)]
struct BucketColumns {
    task_ids: Vec<[u8; 32]>,
    starts: Vec<i64>,
    durations: Vec<i64>,
    parameters: Vec<Vec<u8>>,
    shares: Vec<Vec<u8>>,
    counts: Vec<i64>,
    checksums: Vec<[u8; 32]>,
}

impl BucketColumns {
    fn of<'a>(
        buckets: impl Iterator<Item = (&'a BucketKey, &'a BucketValue)>,
    ) -> Result<BucketColumns, StoreError> {
        let mut columns = BucketColumns::default();
        for ((task_id, start, duration, parameter), value) in buckets {
            columns.task_ids.push(*task_id);
            columns.starts.push(*start);
            columns.durations.push(*duration);
            columns.parameters.push(parameter.clone());
            columns.shares.push(value.share.clone());
            columns.counts.push(to_i64(value.count, "report count")?);
            columns.checksums.push(value.checksum.0);
        }
        Ok(columns)
    }
}

/// How many times a merge re-reads buckets that a concurrent transaction inserted after this
/// one found them missing, before the whole transaction is re-run.
const MERGE_ROUNDS: usize = 3;

/// Folds `deltas` into the role's batch aggregations inside `tx` (READ COMMITTED plus row
/// locks): existing buckets are locked (`FOR UPDATE`, in key order so that concurrent mergers
/// queue rather than deadlock) and merged in memory; missing ones are inserted, and a bucket
/// that a concurrent transaction inserted meanwhile (the insert waits for it, then does
/// nothing) is read again, locked, on the next round. Three or four statements per call, not
/// per bucket.
pub(super) async fn merge_batch_aggregations(
    store: &PostgresDatastore,
    tx: &mut Transaction<'static, Postgres>,
    deltas: &[BatchAggregation],
    merge: MergeFn<'_>,
) -> Result<(), TxError> {
    // Deltas for the same bucket are summed first, as if merged one after the other.
    let mut pending: BTreeMap<BucketKey, BucketValue> = BTreeMap::new();
    for delta in deltas {
        let key = (
            delta.task_id.0,
            to_i64(delta.bucket.start.0, "bucket start")?,
            to_i64(delta.bucket.duration.0, "bucket duration")?,
            delta.aggregation_parameter.clone(),
        );
        match pending.get_mut(&key) {
            Some(value) => fold(
                value,
                &delta.aggregate_share,
                delta.report_count,
                &delta.checksum,
                merge,
            )?,
            None => {
                pending.insert(
                    key,
                    BucketValue {
                        share: delta.aggregate_share.clone(),
                        count: delta.report_count,
                        checksum: delta.checksum,
                    },
                );
            }
        }
    }
    let mut updates: BTreeMap<BucketKey, BucketValue> = BTreeMap::new();
    for _ in 0..MERGE_ROUNDS {
        if pending.is_empty() {
            break;
        }
        let keys = BucketColumns::of(pending.iter())?;
        let existing = sqlx::query(
            "-- merge_batch_aggregations\n\
             SELECT task_id, bucket_start, bucket_duration, aggregation_parameter, \
               aggregate_share, report_count, checksum \
             FROM batch_aggregations \
             WHERE role = $1 AND (task_id, bucket_start, bucket_duration, aggregation_parameter) \
               IN (SELECT * FROM UNNEST($2::bytea[], $3::int8[], $4::int8[], $5::bytea[])) \
             ORDER BY task_id, bucket_start, bucket_duration, aggregation_parameter \
             FOR UPDATE",
        )
        .bind(store.role_str())
        .bind(&keys.task_ids)
        .bind(&keys.starts)
        .bind(&keys.durations)
        .bind(&keys.parameters)
        .fetch_all(&mut **tx)
        .await?;
        for row in &existing {
            let key: BucketKey = (
                col_array(row, "task_id")?,
                col(row, "bucket_start")?,
                col(row, "bucket_duration")?,
                col(row, "aggregation_parameter")?,
            );
            let Some(delta) = pending.remove(&key) else {
                continue;
            };
            let mut value = BucketValue {
                share: col(row, "aggregate_share")?,
                count: col_u64(row, "report_count")?,
                checksum: ReportIdChecksum(col_array(row, "checksum")?),
            };
            fold(
                &mut value,
                &delta.share,
                delta.count,
                &delta.checksum,
                merge,
            )?;
            updates.insert(key, value);
        }
        if pending.is_empty() {
            break;
        }
        let new = BucketColumns::of(pending.iter())?;
        let inserted = sqlx::query(
            "-- merge_batch_aggregations\n\
             INSERT INTO batch_aggregations (role, task_id, bucket_start, bucket_duration, \
               aggregation_parameter, aggregate_share, report_count, checksum) \
             SELECT $1, * FROM UNNEST($2::bytea[], $3::int8[], $4::int8[], $5::bytea[], \
               $6::bytea[], $7::int8[], $8::bytea[]) \
             ON CONFLICT DO NOTHING \
             RETURNING task_id, bucket_start, bucket_duration, aggregation_parameter",
        )
        .bind(store.role_str())
        .bind(&new.task_ids)
        .bind(&new.starts)
        .bind(&new.durations)
        .bind(&new.parameters)
        .bind(&new.shares)
        .bind(&new.counts)
        .bind(&new.checksums)
        .fetch_all(&mut **tx)
        .await?;
        for row in &inserted {
            let key: BucketKey = (
                col_array(row, "task_id")?,
                col(row, "bucket_start")?,
                col(row, "bucket_duration")?,
                col(row, "aggregation_parameter")?,
            );
            pending.remove(&key);
        }
    }
    if !pending.is_empty() {
        return Err(TxError::Raced(
            "batch aggregations kept appearing and disappearing",
        ));
    }
    if updates.is_empty() {
        return Ok(());
    }
    let merged = BucketColumns::of(updates.iter())?;
    sqlx::query(
        "-- merge_batch_aggregations\n\
         UPDATE batch_aggregations AS b \
         SET aggregate_share = u.aggregate_share, report_count = u.report_count, \
           checksum = u.checksum \
         FROM UNNEST($2::bytea[], $3::int8[], $4::int8[], $5::bytea[], $6::bytea[], \
           $7::int8[], $8::bytea[]) \
           AS u(task_id, bucket_start, bucket_duration, aggregation_parameter, aggregate_share, \
             report_count, checksum) \
         WHERE b.role = $1 AND b.task_id = u.task_id AND b.bucket_start = u.bucket_start \
           AND b.bucket_duration = u.bucket_duration \
           AND b.aggregation_parameter = u.aggregation_parameter",
    )
    .bind(store.role_str())
    .bind(&merged.task_ids)
    .bind(&merged.starts)
    .bind(&merged.durations)
    .bind(&merged.parameters)
    .bind(&merged.shares)
    .bind(&merged.counts)
    .bind(&merged.checksums)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
