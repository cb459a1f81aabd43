//! A Helper deletes the aggregation jobs past `helper_job_retention_s`, and only those.

use std::sync::Arc;

use duet_aggregator::helper::Helper;
use duet_aggregator::AggregatorConfig;
use duet_core::{AggregatorRole, RealClock};
use duet_messages::dap09::{AggregationJobId, TaskId};
use duet_store::sqlite::SqliteDatastore;
use duet_store::{Datastore, HelperAggregationJob};

#[tokio::test]
async fn jobs_past_their_retention_are_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("helper.sqlite");
    let store: Arc<dyn Datastore> = Arc::new(
        SqliteDatastore::connect(&path.to_string_lossy())
            .await
            .expect("connect")
            .with_role(AggregatorRole::Helper),
    );
    let job = HelperAggregationJob {
        task_id: TaskId::random(),
        id: AggregationJobId::random(),
        request_hash: [1; 32],
        step: 0,
        response: vec![2; 40],
    };
    store
        .put_helper_aggregation_job(&job, &[], &[], &|a, _| Ok(a.to_vec()))
        .await
        .expect("put");
    let helper = |retention: u64| {
        Helper::new(
            Arc::clone(&store),
            Arc::new(RealClock),
            AggregatorConfig {
                helper_job_retention_s: retention,
                ..AggregatorConfig::default()
            },
        )
    };
    let keeping = helper(AggregatorConfig::default().helper_job_retention_s)
        .await
        .expect("helper");
    assert_eq!(keeping.delete_old_jobs().await.expect("delete"), 0);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let strict = helper(0).await.expect("helper");
    assert_eq!(strict.delete_old_jobs().await.expect("delete"), 1);
    assert_eq!(
        store
            .get_helper_aggregation_job(&job.task_id, &job.id)
            .await
            .expect("get"),
        None
    );
    store.close().await;
}
