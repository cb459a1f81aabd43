//! End to end: Duet's client uploads, Duet's Leader and Helper aggregate, Duet's collector
//! collects, for every VDAF.

mod common;

use std::sync::Arc;

use common::Harness;
use duet_client::{Client, ClientParameters};
use duet_collector::{Collector, CollectorParameters};
use duet_core::{Clock, RealClock, VdafInstance};
use duet_messages::dap09::{Duration, Interval, Query};

async fn run_vdaf(vdaf: VdafInstance, measurements: &[&str]) {
    let h = Harness::start().await;
    let (task, collector_key) = h.task(vdaf.clone(), measurements.len() as u64).await;
    let http = reqwest::Client::new();
    let client = Arc::new(
        Client::new(
            ClientParameters {
                task_id: task.id,
                leader_endpoint: task.leader_endpoint.clone(),
                helper_endpoint: task.helper_endpoint.clone(),
                time_precision: task.time_precision,
            },
            vdaf.clone(),
            http.clone(),
        )
        .await
        .expect("client"),
    );
    let parsed: Vec<_> = measurements
        .iter()
        .map(|m| vdaf.parse_measurement(m).expect("measurement"))
        .collect();
    let start = RealClock.now().round_down(task.time_precision);
    let mut uploads = tokio::task::JoinSet::new();
    for m in parsed.clone() {
        let client = Arc::clone(&client);
        uploads.spawn(async move { client.upload(&m).await });
    }
    while let Some(r) = uploads.join_next().await {
        r.expect("join").expect("upload");
    }
    let collector = Collector::new(
        CollectorParameters {
            task_id: task.id,
            leader_endpoint: task.leader_endpoint.clone(),
            auth_token: task.collector_auth_token.clone().expect("token"),
            hpke_keypair: collector_key,
        },
        vdaf.clone(),
        http,
    )
    .expect("collector");
    let query = Query::TimeInterval {
        batch_interval: Interval {
            start,
            duration: Duration(7200),
        },
    };
    let result = collector
        .collect(query, std::time::Duration::from_secs(60))
        .await
        .expect("collect");
    assert_eq!(result.report_count, measurements.len() as u64);
    assert_eq!(
        result.aggregate,
        vdaf.plaintext_aggregate(&parsed).expect("plaintext")
    );
    assert!(result.interval.start >= start && result.interval.start.0 < start.0 + 7200);
    // The reports' buckets: one hour, or two if an hour boundary passed during the test.
    assert!(
        matches!(result.interval.duration.0, 3600 | 7200),
        "{:?}",
        result.interval
    );
    // A second collection of the same batch, with the same aggregation parameter, is the same
    // query: it gets the same result (the Helper answers the same aggregate-share request again).
    let again = collector
        .collect(query, std::time::Duration::from_secs(60))
        .await
        .expect("collect again");
    assert_eq!(
        (again.report_count, &again.aggregate, again.interval),
        (result.report_count, &result.aggregate, result.interval)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count() {
    run_vdaf(
        VdafInstance::Prio3Count,
        &["1", "0", "1", "1", "0", "1", "1"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sum() {
    run_vdaf(
        VdafInstance::Prio3Sum { bits: 8 },
        &["0", "255", "17", "100", "3"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sum_vec() {
    run_vdaf(
        VdafInstance::Prio3SumVec {
            bits: 4,
            length: 3,
            chunk_length: 2,
        },
        &["1,2,3", "15,15,15", "0,0,7"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histogram() {
    run_vdaf(
        VdafInstance::Prio3Histogram {
            length: 5,
            chunk_length: 2,
        },
        &["0", "4", "4", "2", "1", "4"],
    )
    .await;
}
