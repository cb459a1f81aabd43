//! Interoperability with the released Janus 0.7 client and collector: `janus_client` 0.7.145
//! uploads to Duet's Leader (which aggregates with Duet's Helper) and `janus_collector` 0.7.145
//! collects from it, for every VDAF Duet serves.
//!
//! Run with `RUST_LOG=debug cargo test -p duet-aggregator --test janus_interop -- --nocapture`
//! to see both sides' logs.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use duet_aggregator::server::{run, RoleConfig, Roles, RunningServer};
use duet_aggregator::AggregatorConfig;
use duet_core::task::parse_endpoint;
use duet_core::{
    AggregatorRole, AuthenticationToken, Clock, QueryTypeConfig, RealClock, Task, VdafInstance,
};
use duet_messages::dap09::{Duration, HpkeConfig, TaskId};
use duet_messages::Decode;
use duet_store::sqlite::SqliteDatastore;
use duet_store::Datastore;
use janus_collector::{Collector, ExponentialBackoff};
use janus_core::hpke::HpkeKeypair;
use janus_messages::{HpkeAeadId, HpkeConfigId, HpkeKdfId, HpkeKemId, Interval, Query, Time};
use prio::codec::Encode as _;
use prio::vdaf::prio3::Prio3;
use prio::vdaf::{Client as VdafClient, Collector as VdafCollector};

/// The task's time precision, in seconds.
const TIME_PRECISION: u64 = 3600;
/// How many measurements each VDAF run uploads.
const MEASUREMENTS: usize = 30;
/// Upper bound on one VDAF's whole run: server start, uploads, aggregation, collection.
const RUN_TIMEOUT: StdDuration = StdDuration::from_secs(60);
/// Upper bound on stopping the server and its background jobs.
const SHUTDOWN_TIMEOUT: StdDuration = StdDuration::from_secs(15);

/// Logs to the test's output when `RUST_LOG` is set.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Retries of single HTTP requests: short, so that a persistent server error surfaces as an error
/// rather than as the run timing out.
fn http_backoff() -> ExponentialBackoff {
    ExponentialBackoff {
        initial_interval: StdDuration::from_millis(100),
        max_interval: StdDuration::from_secs(1),
        multiplier: 2.0,
        max_elapsed_time: Some(StdDuration::from_secs(5)),
        ..ExponentialBackoff::default()
    }
}

/// Waits between collection-job polls (Janus defaults to 15 s and more).
fn poll_backoff() -> ExponentialBackoff {
    ExponentialBackoff {
        initial_interval: StdDuration::from_millis(200),
        max_interval: StdDuration::from_secs(1),
        multiplier: 1.5,
        max_elapsed_time: Some(StdDuration::from_secs(45)),
        ..ExponentialBackoff::default()
    }
}

/// A Leader and a Helper sharing one temporary SQLite file, on a loopback port.
struct Aggregators {
    server: RunningServer,
    leader_store: Arc<dyn Datastore>,
    helper_store: Arc<dyn Datastore>,
    leader_url: url::Url,
    helper_url: url::Url,
    _dir: tempfile::TempDir,
}

async fn start_aggregators() -> Aggregators {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("duet.sqlite");
    let store = SqliteDatastore::connect(path.to_str().expect("utf-8 path"))
        .await
        .expect("open database");
    let leader_store: Arc<dyn Datastore> = Arc::new(store.with_role(AggregatorRole::Leader));
    let helper_store: Arc<dyn Datastore> = Arc::new(store.with_role(AggregatorRole::Helper));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let roles = Roles {
        leader: Some(RoleConfig {
            store: Arc::clone(&leader_store),
            path_prefix: "/leader".into(),
        }),
        helper: Some(RoleConfig {
            store: Arc::clone(&helper_store),
            path_prefix: "/helper".into(),
        }),
    };
    let config = AggregatorConfig {
        polling_interval_ms: 200,
        ..AggregatorConfig::default()
    };
    let server = run(listener, roles, config, Arc::new(RealClock))
        .await
        .expect("start server");
    let addr = server.local_addr;
    Aggregators {
        leader_url: parse_endpoint(&format!("http://{addr}/leader/")).expect("url"),
        helper_url: parse_endpoint(&format!("http://{addr}/helper/")).expect("url"),
        server,
        leader_store,
        helper_store,
        _dir: dir,
    }
}

/// What the Janus collector got back.
struct Outcome<R> {
    report_count: u64,
    aggregate: R,
    interval_start: i64,
    interval_seconds: i64,
}

/// Provisions a task for `instance` on both aggregators, uploads `measurements` with
/// `janus_client`, collects with `janus_collector` and checks the result against `expected`.
async fn interop<V>(
    instance: VdafInstance,
    vdaf: V,
    measurements: Vec<V::Measurement>,
    expected: V::AggregateResult,
) where
    V: VdafClient<16> + VdafCollector<AggregationParam = ()>,
    V::AggregateResult: PartialEq + Debug,
{
    init_tracing();
    let aggregators = start_aggregators().await;
    let outcome = tokio::time::timeout(
        RUN_TIMEOUT,
        exercise(&aggregators, instance.clone(), vdaf, &measurements),
    )
    .await;
    let Aggregators { server, .. } = aggregators;
    match tokio::time::timeout(SHUTDOWN_TIMEOUT, server.shutdown()).await {
        Ok(r) => r.expect("shutdown"),
        Err(_) => panic!("{instance}: the server did not shut down within {SHUTDOWN_TIMEOUT:?}"),
    }
    let outcome = match outcome {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => panic!("{instance}: {e}"),
        Err(_) => panic!("{instance}: no result within {RUN_TIMEOUT:?}"),
    };
    assert_eq!(
        outcome.report_count,
        measurements.len() as u64,
        "{instance}: report count"
    );
    assert_eq!(outcome.aggregate, expected, "{instance}: aggregate");
    // The reports' buckets: one hour, or two if an hour boundary passed during the run.
    assert_eq!(
        outcome.interval_start % TIME_PRECISION as i64,
        0,
        "{instance}: interval start"
    );
    assert!(
        matches!(outcome.interval_seconds, 3600 | 7200),
        "{instance}: interval of {} s",
        outcome.interval_seconds
    );
}

async fn exercise<V>(
    aggregators: &Aggregators,
    instance: VdafInstance,
    vdaf: V,
    measurements: &[V::Measurement],
) -> Result<Outcome<V::AggregateResult>, String>
where
    V: VdafClient<16> + VdafCollector<AggregationParam = ()>,
{
    // The collector's credentials, made on the Janus side and given to Duet in wire form.
    let collector_keypair = HpkeKeypair::generate(
        HpkeConfigId::from(1),
        HpkeKemId::X25519HkdfSha256,
        HpkeKdfId::HkdfSha256,
        HpkeAeadId::Aes128Gcm,
    )
    .map_err(|e| format!("HPKE keypair: {e}"))?;
    let config_bytes = collector_keypair
        .config()
        .get_encoded()
        .map_err(|e| format!("encode HPKE config: {e}"))?;
    let collector_hpke_config = HpkeConfig::get_decoded(&config_bytes)
        .map_err(|e| format!("Duet cannot decode Janus's HPKE config: {e}"))?;
    // Janus's random token is a bearer token, sent as `Authorization: Bearer …`.
    let collector_token: janus_collector::AuthenticationToken = rand::random();
    let duet_collector_token = match &collector_token {
        janus_collector::AuthenticationToken::Bearer(t) => {
            AuthenticationToken::Bearer(t.as_str().to_string())
        }
        janus_collector::AuthenticationToken::DapAuth(t) => {
            AuthenticationToken::DapAuth(t.as_str().to_string())
        }
        other => return Err(format!("unexpected Janus token kind {other:?}")),
    };

    let task = Task {
        id: TaskId::random(),
        leader_endpoint: aggregators.leader_url.clone(),
        helper_endpoint: aggregators.helper_url.clone(),
        query_type: QueryTypeConfig::TimeInterval,
        vdaf: instance,
        vdaf_verify_key: rand::random(),
        max_batch_query_count: 1,
        task_expiration: None,
        report_expiry_age: None,
        min_batch_size: measurements.len() as u64,
        time_precision: Duration(TIME_PRECISION),
        tolerable_clock_skew: Duration(60),
        collector_hpke_config,
        aggregator_auth_token: AuthenticationToken::random(),
        collector_auth_token: Some(duet_collector_token),
    };
    aggregators
        .leader_store
        .put_task(&task)
        .await
        .map_err(|e| format!("Leader task: {e}"))?;
    let mut helper_task = task.clone();
    helper_task.collector_auth_token = None;
    aggregators
        .helper_store
        .put_task(&helper_task)
        .await
        .map_err(|e| format!("Helper task: {e}"))?;
    let task_id = janus_messages::TaskId::from(task.id.0);

    // Janus's client stamps reports with the system clock, as `RealClock` reads it.
    let start = RealClock.now().round_down(task.time_precision).0;

    // Upload. The client fetches both aggregators' HPKE configs itself.
    let client = janus_client::Client::builder(
        task_id,
        aggregators.leader_url.clone(),
        aggregators.helper_url.clone(),
        janus_messages::Duration::from_seconds(TIME_PRECISION),
        vdaf.clone(),
    )
    .with_backoff(http_backoff())
    .build()
    .await
    .map_err(|e| format!("janus_client setup (HPKE config fetch): {e}"))?;
    for (i, m) in measurements.iter().enumerate() {
        client
            .upload(m)
            .await
            .map_err(|e| format!("janus_client upload #{i}: {e}"))?;
        tracing::debug!(report = i, "janus_client uploaded a report");
    }

    // Collect.
    let collector = Collector::builder(
        task_id,
        aggregators.leader_url.clone(),
        collector_token,
        collector_keypair,
        vdaf,
    )
    .with_http_request_backoff(http_backoff())
    .with_collect_poll_backoff(poll_backoff())
    .build()
    .map_err(|e| format!("janus_collector setup: {e}"))?;
    let interval = Interval::new(
        Time::from_seconds_since_epoch(start),
        janus_messages::Duration::from_seconds(2 * TIME_PRECISION),
    )
    .map_err(|e| format!("interval: {e}"))?;
    tracing::debug!("janus_client uploaded every report; collecting");
    let collection = collector
        .collect(Query::new_time_interval(interval), &())
        .await
        .map_err(|e| format!("janus_collector: {e}"))?;
    let (interval_start, interval_duration) = collection.interval();
    Ok(Outcome {
        report_count: collection.report_count(),
        interval_start: interval_start.timestamp(),
        interval_seconds: interval_duration.num_seconds(),
        aggregate: collection.aggregate_result().clone(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn janus_prio3_count() {
    let measurements: Vec<bool> = (0..MEASUREMENTS).map(|i| i % 3 != 1).collect();
    let expected = measurements.iter().filter(|&&m| m).count() as u64;
    interop(
        VdafInstance::Prio3Count,
        Prio3::new_count(2).expect("vdaf"),
        measurements,
        expected,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn janus_prio3_sum() {
    let bits = 8;
    let measurements: Vec<u128> = (0..MEASUREMENTS as u128)
        .map(|i| (i * 37 + 11) % 256)
        .collect();
    let expected: u128 = measurements.iter().sum();
    interop(
        VdafInstance::Prio3Sum { bits },
        Prio3::new_sum(2, bits).expect("vdaf"),
        measurements,
        expected,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn janus_prio3_sum_vec() {
    let (bits, length, chunk_length) = (4, 5, 3);
    let measurements: Vec<Vec<u128>> = (0..MEASUREMENTS as u128)
        .map(|i| (0..length as u128).map(|j| (i * 7 + j * 3) % 16).collect())
        .collect();
    let expected: Vec<u128> = (0..length)
        .map(|j| measurements.iter().map(|m| m[j]).sum())
        .collect();
    interop(
        VdafInstance::Prio3SumVec {
            bits,
            length,
            chunk_length,
        },
        Prio3::new_sum_vec(2, bits, length, chunk_length).expect("vdaf"),
        measurements,
        expected,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn janus_prio3_histogram() {
    let (length, chunk_length) = (6, 2);
    let measurements: Vec<usize> = (0..MEASUREMENTS).map(|i| (i * i + 1) % length).collect();
    let mut expected = vec![0u128; length];
    for &m in &measurements {
        expected[m] += 1;
    }
    interop(
        VdafInstance::Prio3Histogram {
            length,
            chunk_length,
        },
        Prio3::new_histogram(2, length, chunk_length).expect("vdaf"),
        measurements,
        expected,
    )
    .await;
}
