//! The Helper's served batches on PostgreSQL: recording an aggregate share and writing an
//! aggregation job into its buckets take the task's batches lock before they check, so each
//! sees what the other committed while it waited: no share of an overlapping batch is
//! recorded, and no job merges into a served batch.
//!
//! Like `postgres.rs`, these tests need `DATABASE_URL` and pass with a note without it.

mod common;

use common::{interval, PRECISION, T0};
use duet_core::AggregatorRole;
use duet_messages::dap09::{
    AggregationJobId, HpkeCiphertext, HpkeConfigId, Interval, ReportId, ReportIdChecksum, TaskId,
};
use duet_store::conformance::postgres::with_fresh_database;
use duet_store::postgres::PostgresDatastore;
use duet_store::{
    AggregateShareJob, BatchAggregation, Datastore, HelperAggregationJob, StoreError,
};
use sqlx::{Connection, PgConnection};

/// The task's batches lock, as the store takes it ("dueB").
const BATCHES_LOCK: i32 = 0x6475_6542;

fn job(task_id: TaskId) -> HelperAggregationJob {
    HelperAggregationJob {
        task_id,
        id: AggregationJobId::random(),
        request_hash: [0; 32],
        step: 0,
        response: Vec::new(),
    }
}

fn no_merge(_: &[u8], _: &[u8]) -> Result<Vec<u8>, String> {
    Err("each bucket is written once in these tests".into())
}

fn share_job(task_id: TaskId, batch: Interval) -> AggregateShareJob {
    AggregateShareJob {
        task_id,
        batch_interval: batch,
        aggregation_parameter: Vec::new(),
        report_count: 0,
        checksum: ReportIdChecksum([0; 32]),
        encrypted_aggregate_share: HpkeCiphertext {
            config_id: HpkeConfigId(1),
            encapsulated_key: vec![1; 32],
            payload: vec![1; 24],
        },
    }
}

/// A Helper's handle on a fresh database, with a task whose key is stored, and a connection
/// that holds the task's batches lock while it records a served share of `served`, uncommitted.
async fn recording(url: &str, served: Interval) -> (PostgresDatastore, TaskId, PgConnection) {
    let store = PostgresDatastore::connect(url)
        .await
        .expect("connect")
        .with_role(AggregatorRole::Helper);
    let task_id = TaskId::random();
    // A job without reports or buckets stores the task's key.
    store
        .put_helper_aggregation_job(&job(task_id), &[], &[], &no_merge)
        .await
        .expect("put");
    let mut other = PgConnection::connect(url).await.expect("connect");
    sqlx::query("BEGIN")
        .execute(&mut other)
        .await
        .expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock($1, task_key) FROM replay_tasks WHERE task_id = $2")
        .bind(BATCHES_LOCK)
        .bind(&task_id.0[..])
        .execute(&mut other)
        .await
        .expect("lock");
    sqlx::query(
        "INSERT INTO aggregate_share_jobs (task_id, batch_start, batch_duration, \
           aggregation_parameter, report_count, checksum, encrypted_aggregate_share) \
         VALUES ($1, $2, $3, '', 0, $4, $5)",
    )
    .bind(&task_id.0[..])
    .bind(served.start.0 as i64)
    .bind(served.duration.0 as i64)
    .bind(&[0u8; 32][..])
    .bind(&[1u8; 8][..])
    .execute(&mut other)
    .await
    .expect("insert");
    (store, task_id, other)
}

/// Two collections of overlapping batches at once: the second share's recording waits for the
/// first's, then refuses its batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_of_an_overlapping_batch_is_refused_after_the_wait() {
    with_fresh_database(
        "a_share_of_an_overlapping_batch_is_refused",
        |url| async move {
            let (store, task_id, other) = recording(&url, interval(T0, 2 * PRECISION)).await;
            let second = {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .put_aggregate_share_job(&share_job(task_id, interval(T0, PRECISION)))
                        .await
                })
            };
            common::waiting_on_lock(&url, "put_aggregate_share_job").await;
            common::end_transaction(other, "COMMIT").await;
            assert!(matches!(
                second.await.expect("recording"),
                Err(StoreError::BatchOverlap)
            ));
            store.close().await;
        },
    )
    .await;
}

/// A job that read the collected batches before a share of its bucket was served: its write
/// waits for the share's recording, then merges nothing and answers `Conflict`, so that its
/// reports are prepared again (and found `batch_collected`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_does_not_merge_into_a_batch_served_while_it_waited() {
    with_fresh_database(
        "a_job_does_not_merge_into_a_served_batch",
        |url| async move {
            let batch = interval(T0, PRECISION);
            let (store, task_id, other) = recording(&url, batch).await;
            let ids = vec![ReportId::random()];
            let delta = BatchAggregation {
                task_id,
                bucket: batch,
                aggregation_parameter: Vec::new(),
                aggregate_share: vec![1; 8],
                report_count: 1,
                checksum: ReportIdChecksum([0; 32]),
            };
            let write = {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .put_helper_aggregation_job(&job(task_id), &ids, &[delta], &no_merge)
                        .await
                })
            };
            common::waiting_on_lock(&url, "put_helper_aggregation_job").await;
            common::end_transaction(other, "COMMIT").await;
            assert!(matches!(
                write.await.expect("write"),
                Err(StoreError::Conflict)
            ));
            assert!(store
                .get_batch_aggregations(&task_id, &batch, &[])
                .await
                .expect("get")
                .is_empty());
            store.close().await;
        },
    )
    .await;
}
