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

/// A Helper that accepts connections and never answers: the Leader's request to it stays in
/// flight until the connections are dropped.
struct StalledHelper {
    url: url::Url,
    first_request: tokio::sync::oneshot::Receiver<()>,
    accepting: tokio::task::JoinHandle<()>,
}

impl StalledHelper {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = duet_core::task::parse_endpoint(&format!(
            "http://{}/helper/",
            listener.local_addr().expect("addr")
        ))
        .expect("url");
        let (tx, first_request) = tokio::sync::oneshot::channel();
        let accepting = tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
        });
        Self {
            url,
            first_request,
            accepting,
        }
    }

    /// Closes the listener and every held connection: the Leader's request fails and its job
    /// is released for a retry.
    async fn release(self) {
        self.accepting.abort();
        let _ = self.accepting.await;
    }
}

/// A job stuck on one task's unresponsive Helper holds one of the driver's slots, not all of
/// them: another task's jobs lease the free slot and are collected while it hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_job_does_not_hold_back_other_jobs() {
    let h = Harness::start_with(duet_aggregator::AggregatorConfig {
        polling_interval_ms: 200,
        max_concurrent_jobs: 2,
        max_aggregation_job_size: 1,
        ..duet_aggregator::AggregatorConfig::default()
    })
    .await;
    let vdaf = VdafInstance::Prio3Count;
    let http = reqwest::Client::new();
    let mut stalled = StalledHelper::start().await;
    let (stuck_task, _) = h.leader_task(vdaf.clone(), 1, &stalled.url).await;
    let (task, collector_key) = h.task(vdaf.clone(), 3).await;
    let client_for = |task_id| {
        // The stalled task's reports are sealed to the real Helper's key; they never reach it.
        Client::new(
            ClientParameters {
                task_id,
                leader_endpoint: task.leader_endpoint.clone(),
                helper_endpoint: task.helper_endpoint.clone(),
                time_precision: task.time_precision,
            },
            vdaf.clone(),
            http.clone(),
        )
    };
    let start = RealClock.now().round_down(task.time_precision);
    let one = vdaf.parse_measurement("1").expect("measurement");
    client_for(stuck_task.id)
        .await
        .expect("client")
        .upload(&one)
        .await
        .expect("upload");
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        &mut stalled.first_request,
    )
    .await
    .expect("the stuck job reached its Helper")
    .expect("signal");

    // Three more jobs, one report each, for the other task while the first one hangs.
    let client = client_for(task.id).await.expect("client");
    for _ in 0..3 {
        client.upload(&one).await.expect("upload");
    }
    let collector = Collector::new(
        CollectorParameters {
            task_id: task.id,
            leader_endpoint: task.leader_endpoint.clone(),
            auth_token: task.collector_auth_token.clone().expect("token"),
            hpke_keypair: collector_key,
        },
        vdaf.clone(),
        http.clone(),
    )
    .expect("collector");
    let query = Query::TimeInterval {
        batch_interval: Interval {
            start,
            duration: Duration(7200),
        },
    };
    // Well inside the Leader's 120 s timeout for Helper requests, which is what would free the
    // stuck job's slot otherwise.
    let result = collector
        .collect(query, std::time::Duration::from_secs(60))
        .await
        .expect("collected while the other job hangs");
    assert_eq!(result.report_count, 3);
    assert!(
        !stalled.accepting.is_finished(),
        "the stuck job's connection was held throughout"
    );
    stalled.release().await;
    h.stop().await;
}
