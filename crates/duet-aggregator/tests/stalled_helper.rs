//! Helpers that misbehave, through a proxy in front of the real one. One that stops answering
//! for one task holds back that task's work only: the Leader's aggregation and collection drivers
//! go on with the other tasks' jobs meanwhile. A request it fails once (503, `unrecognizedTask`,
//! `batchMismatch`) is retried when the job's backoff ends, not at the next poll, however long the
//! job waited for its batch before; a lasting `batchMismatch` fails the collection, and a
//! `finished` answer to an initialization aborts the job. A Leader's requests to the Helper do
//! not depend on its clock.
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use common::Harness;
use duet_aggregator::AggregatorConfig;
use duet_client::{Client, ClientParameters};
use duet_collector::{Collector, CollectorParameters};
use duet_core::hpke::HpkeKeypair;
use duet_core::task::parse_endpoint;
use duet_core::{Clock, RealClock, Task, VdafInstance};
use duet_messages::dap09::{
    AggregationJobResp, Duration, Interval, PrepareStepResult, Query, Time,
};
use duet_messages::problem::DapProblemType;
use duet_messages::{Decode, Encode};
use tokio::sync::{mpsc, watch};

/// What a [`StallingHelper`] does with the requests on its path.
#[derive(Clone, Copy)]
enum Stall {
    /// Holds them without answering until it stops.
    Hold,
    /// Answers the first one with 503 at once, and forwards the others.
    FailOnce,
    /// Answers the first one with a `batchMismatch` problem document (400), as a Helper that
    /// aggregated a report the Leader has not yet merged does, and forwards the others.
    MismatchOnce,
    /// Answers every one with a `batchMismatch` problem document, as a Helper whose aggregate
    /// differs for good does.
    MismatchAlways,
    /// Answers the first one with an `unrecognizedTask` problem document (404), as a Helper
    /// not yet given the task does, and forwards the others.
    UnknownTaskOnce,
    /// Forwards them, and answers `finished` for every report the real Helper answered.
    FinishAll,
    /// Answers the first two with 429 (busy), as a Leader whose upload queue is full does, and
    /// forwards the others.
    BusyTwice,
    /// Answers the first this many with 503, as a Helper that is down for a while does, and
    /// forwards the others.
    FailTimes(usize),
}

/// A Helper endpoint on its own port that forwards requests to the real Helper, except the
/// ones whose path contains `stall_on`, which it treats as its [`Stall`] says. Each held request
/// is announced on `held` and counted in `holding` while it is outstanding (until it is
/// answered, or the Leader gives up on it and closes the connection).
struct StallingHelper {
    url: url::Url,
    held: mpsc::UnboundedReceiver<()>,
    holding: Arc<AtomicUsize>,
    stopped: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

/// A Helper's problem document of type `problem`.
fn problem(status: StatusCode, problem: DapProblemType) -> axum::response::Response {
    let body = format!(r#"{{"type":"{}","title":"refused"}}"#, problem.type_uri());
    (status, [("content-type", "application/problem+json")], body).into_response()
}

/// Counts one held request for as long as it lives.
struct Held(Arc<AtomicUsize>);

impl Held {
    fn new(holding: &Arc<AtomicUsize>) -> Self {
        holding.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(holding))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl StallingHelper {
    async fn start(helper: &url::Url, stall_on: &'static str) -> Self {
        Self::start_with(helper, stall_on, Stall::Hold).await
    }

    async fn start_with(helper: &url::Url, stall_on: &'static str, stall: Stall) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = parse_endpoint(&format!(
            "http://{}/helper/",
            listener.local_addr().expect("addr")
        ))
        .expect("url");
        let (held_tx, held) = mpsc::unbounded_channel();
        let helper = helper.clone();
        let http = reqwest::Client::new();
        let (stopped, stop_rx) = watch::channel(false);
        let holding = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&holding);
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy = Arc::new(AtomicUsize::new(0));
        let forward = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (helper, http, held_tx) = (helper.clone(), http.clone(), held_tx.clone());
            let mut stop_rx = stop_rx.clone();
            let counter = Arc::clone(&counter);
            let failed = Arc::clone(&failed);
            let busy = Arc::clone(&busy);
            async move {
                let path = uri.path().trim_start_matches("/helper/");
                // A job's DELETE is announced too.
                if method == Method::DELETE
                    && path.contains(stall_on)
                    && matches!(stall, Stall::FinishAll)
                {
                    let _ = held_tx.send(());
                }
                if path.contains(stall_on) {
                    match stall {
                        Stall::Hold => {
                            let _held = Held::new(&counter);
                            let _ = held_tx.send(());
                            let _ = stop_rx.wait_for(|stop| *stop).await;
                            return StatusCode::SERVICE_UNAVAILABLE.into_response();
                        }
                        Stall::FailOnce if !failed.swap(true, Ordering::SeqCst) => {
                            let _ = held_tx.send(());
                            return StatusCode::SERVICE_UNAVAILABLE.into_response();
                        }
                        Stall::MismatchAlways => {
                            let _ = held_tx.send(());
                            return problem(StatusCode::BAD_REQUEST, DapProblemType::BatchMismatch);
                        }
                        Stall::MismatchOnce if !failed.swap(true, Ordering::SeqCst) => {
                            let _ = held_tx.send(());
                            return problem(StatusCode::BAD_REQUEST, DapProblemType::BatchMismatch);
                        }
                        Stall::UnknownTaskOnce if !failed.swap(true, Ordering::SeqCst) => {
                            let _ = held_tx.send(());
                            return problem(
                                StatusCode::NOT_FOUND,
                                DapProblemType::UnrecognizedTask,
                            );
                        }
                        Stall::BusyTwice if busy.fetch_add(1, Ordering::SeqCst) < 2 => {
                            let _ = held_tx.send(());
                            return StatusCode::TOO_MANY_REQUESTS.into_response();
                        }
                        Stall::FailTimes(n) if busy.fetch_add(1, Ordering::SeqCst) < n => {
                            let _ = held_tx.send(());
                            return StatusCode::SERVICE_UNAVAILABLE.into_response();
                        }
                        Stall::FailOnce
                        | Stall::MismatchOnce
                        | Stall::UnknownTaskOnce
                        | Stall::FinishAll
                        | Stall::BusyTwice
                        | Stall::FailTimes(_) => {}
                    }
                }
                let url = helper.join(path).expect("path");
                let mut req = http.request(method, url).body(body);
                for name in ["content-type", "dap-auth-token", "authorization"] {
                    if let Some(v) = headers.get(name) {
                        req = req.header(name, v);
                    }
                }
                let resp = req.send().await.expect("the real Helper answers");
                let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
                let content_type = resp
                    .headers()
                    .get("content-type")
                    .map(|v| v.to_str().expect("ascii").to_string())
                    .unwrap_or_default();
                let mut body = resp.bytes().await.expect("body");
                if matches!(stall, Stall::FinishAll)
                    && path.contains(stall_on)
                    && status.is_success()
                {
                    let mut answer = AggregationJobResp::get_decoded(&body).expect("answer");
                    for r in &mut answer.prepare_resps {
                        r.result = PrepareStepResult::Finished;
                    }
                    body = answer.get_encoded().into();
                }
                (status, [("content-type", content_type)], body).into_response()
            }
        };
        let app = axum::Router::new().fallback(forward);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            held,
            holding,
            stopped,
            server,
        }
    }

    /// Waits until a request is being held.
    async fn wait_held(&mut self) {
        tokio::time::timeout(std::time::Duration::from_secs(30), self.held.recv())
            .await
            .expect("a request reached the stalled path")
            .expect("signal");
    }

    /// How many held requests are still outstanding.
    fn holding(&self) -> usize {
        self.holding.load(Ordering::SeqCst)
    }

    /// Answers the held requests with 503 and closes the listener: the Leader releases their
    /// jobs for a retry, which finds no server.
    async fn stop(self) {
        let _ = self.stopped.send(true);
        self.server.abort();
        let _ = self.server.await;
    }
}

fn client(task: &Task, vdaf: &VdafInstance) -> impl std::future::Future<Output = Client> {
    let params = ClientParameters {
        task_id: task.id,
        leader_endpoint: task.leader_endpoint.clone(),
        helper_endpoint: task.helper_endpoint.clone(),
        time_precision: task.time_precision,
    };
    let vdaf = vdaf.clone();
    async move {
        Client::new(params, vdaf, reqwest::Client::new())
            .await
            .expect("client")
    }
}

fn collector(task: &Task, key: HpkeKeypair, vdaf: &VdafInstance) -> Collector {
    Collector::new(
        CollectorParameters {
            task_id: task.id,
            leader_endpoint: task.leader_endpoint.clone(),
            auth_token: task.collector_auth_token.clone().expect("token"),
            hpke_keypair: key,
        },
        vdaf.clone(),
        reqwest::Client::new(),
    )
    .expect("collector")
}

fn two_hours_from(start: Time) -> Query {
    Query::TimeInterval {
        batch_interval: Interval {
            start,
            duration: Duration(7200),
        },
    }
}

/// Uploads `n` measurements of 1 for `task` through one client.
async fn upload_ones(task: &Task, vdaf: &VdafInstance, n: usize) {
    let one = vdaf.parse_measurement("1").expect("measurement");
    let client = client(task, vdaf).await;
    for _ in 0..n {
        client.upload(&one).await.expect("upload");
    }
}

/// The Leader's aggregation jobs by outcome.
#[derive(Debug)]
struct JobOutcomes {
    finished: u64,
    retried: u64,
    abandoned: u64,
}

/// The Leader's aggregation-job outcomes once one is counted, read from `/metrics` every 100 ms
/// (`None` after 30 s without one).
async fn first_job_outcomes(h: &Harness) -> Option<JobOutcomes> {
    let metrics = h.leader_url.join("/metrics").expect("url");
    let http = reqwest::Client::new();
    for _ in 0..300 {
        let text = http
            .get(metrics.clone())
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let count = |outcome: &str| {
            let name = format!("duet_aggregation_jobs_total{{outcome=\"{outcome}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&name))
                .map_or(0, |v| v.trim().parse().expect("a count"))
        };
        let outcomes = JobOutcomes {
            finished: count("finished"),
            retried: count("retried"),
            abandoned: count("abandoned"),
        };
        if outcomes.finished + outcomes.retried + outcomes.abandoned > 0 {
            return Some(outcomes);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    None
}

/// How long a collection may take here: well inside the Leader's 120 s timeout for Helper
/// requests, which is what would free a stalled job otherwise.
const COLLECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Two Prio3Count tasks: a stuck one, whose Helper requests go through a stalling Helper that
/// holds those on `stall_on` and which has one report uploaded, and another one of
/// `min_batch_size` on the real Helper.
struct Stalled {
    stalling: StallingHelper,
    stuck_task: Task,
    stuck_key: HpkeKeypair,
    task: Task,
    collector_key: HpkeKeypair,
    /// The start of the current time bucket, where both tasks' reports fall.
    start: Time,
}

impl Stalled {
    async fn upload(h: &Harness, stall_on: &'static str, min_batch_size: u64) -> Self {
        let vdaf = VdafInstance::Prio3Count;
        let stalling = StallingHelper::start(&h.helper_url, stall_on).await;
        let (stuck_task, stuck_key) = h.task_via(vdaf.clone(), 1, &stalling.url).await;
        let (task, collector_key) = h.task(vdaf.clone(), min_batch_size).await;
        let start = RealClock.now().round_down(task.time_precision);
        upload_ones(&stuck_task, &vdaf, 1).await;
        Self {
            stalling,
            stuck_task,
            stuck_key,
            task,
            collector_key,
            start,
        }
    }
}

/// While the stalling Helper holds one request: uploads `n` Prio3Count reports for `task` and
/// collects them, checking that the held request was still outstanding when they were
/// collected; then stops the stalling Helper and the server.
async fn collect_while_held(
    h: Harness,
    stalling: StallingHelper,
    task: &Task,
    collector_key: HpkeKeypair,
    start: Time,
    n: u64,
) {
    let vdaf = VdafInstance::Prio3Count;
    upload_ones(task, &vdaf, n as usize).await;
    let result = collector(task, collector_key, &vdaf)
        .collect(two_hours_from(start), COLLECT_TIMEOUT)
        .await
        .expect("collected while the other task's request hangs");
    assert_eq!(result.report_count, n);
    assert_eq!(
        stalling.holding(),
        1,
        "the stuck task's request is still outstanding"
    );
    stalling.stop().await;
    h.stop().await;
}

/// A job stuck on one task's unresponsive Helper holds one of the aggregation driver's slots,
/// not all of them: another task's jobs lease the free slot and are collected while it hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_aggregation_job_does_not_hold_back_other_jobs() {
    let h = Harness::start_with(AggregatorConfig {
        polling_interval_ms: 200,
        max_concurrent_jobs: 2,
        max_aggregation_job_size: 1,
        ..AggregatorConfig::default()
    })
    .await;
    let mut s = Stalled::upload(&h, "aggregation_jobs", 3).await;
    s.stalling.wait_held().await;

    // Three more jobs, one report each, for the other task while the first one hangs.
    collect_while_held(h, s.stalling, &s.task, s.collector_key, s.start, 3).await;
}

/// A collection whose Helper does not answer the aggregate-share request does not hold back
/// another task's collection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_collection_does_not_hold_back_other_collections() {
    let h = Harness::start().await;
    // The stuck task's report is aggregated through the forwarding Helper; its aggregate-share
    // request is held.
    let mut s = Stalled::upload(&h, "aggregate_shares", 2).await;
    let stuck_collector = collector(&s.stuck_task, s.stuck_key, &VdafInstance::Prio3Count);
    stuck_collector
        .start_collection(two_hours_from(s.start))
        .await
        .expect("start the stuck collection");
    s.stalling.wait_held().await;

    collect_while_held(h, s.stalling, &s.task, s.collector_key, s.start, 2).await;
}

/// A Leader that never polls (a ten-minute interval), so that only wake-ups and the retry
/// timers drive its jobs, and a task whose Helper fails the first request on `fail_on` as
/// `stall` says; returns the collected result of two Prio3Count reports, each a 1.
async fn collect_after_one_failure(fail_on: &'static str, stall: Stall) -> u64 {
    let h = Harness::start_with(AggregatorConfig {
        polling_interval_ms: 600_000,
        ..AggregatorConfig::default()
    })
    .await;
    let vdaf = VdafInstance::Prio3Count;
    let mut flaky = StallingHelper::start_with(&h.helper_url, fail_on, stall).await;
    let (task, collector_key) = h.task_via(vdaf.clone(), 2, &flaky.url).await;
    let start = RealClock.now().round_down(task.time_precision);
    upload_ones(&task, &vdaf, 2).await;
    let result = collector(&task, collector_key, &vdaf)
        .collect(two_hours_from(start), COLLECT_TIMEOUT)
        .await
        .expect("collected once the failed request was retried");
    flaky.wait_held().await;
    flaky.stop().await;
    h.stop().await;
    assert_eq!(result.report_count, 2);
    result.report_count
}

/// An aggregation job whose Helper request failed is leased again when its backoff ends: the
/// driver does not wait for its next poll, which here never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_aggregation_job_is_retried_when_its_backoff_ends() {
    assert_eq!(
        collect_after_one_failure("aggregation_jobs", Stall::FailOnce).await,
        2
    );
}

/// Likewise a collection job whose aggregate-share request failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_collection_job_is_retried_when_its_backoff_ends() {
    assert_eq!(
        collect_after_one_failure("aggregate_shares", Stall::FailOnce).await,
        2
    );
}

/// An aggregation job whose Helper does not know the task yet (provisioned on the Leader first)
/// is retried once the Helper has it, not abandoned with its reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_refused_for_an_unknown_task_is_retried() {
    assert_eq!(
        collect_after_one_failure("aggregation_jobs", Stall::UnknownTaskOnce).await,
        2
    );
}

/// A collection whose aggregate-share request the Helper refuses with `batchMismatch` (it has
/// aggregated a report this Leader's job has not merged yet) is tried again, not abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_mismatch_is_retried() {
    assert_eq!(
        collect_after_one_failure("aggregate_shares", Stall::MismatchOnce).await,
        2
    );
}

/// A collection job leased many times while its batch is too small (every 20 ms here, more than
/// `max_job_attempts` times) has made no attempt yet: the Helper's failure of its first
/// aggregate-share request is retried, not taken for its last attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_that_waited_for_its_batch_survives_a_failure() {
    let h = Harness::start_with(AggregatorConfig {
        polling_interval_ms: 20,
        max_job_attempts: 2,
        ..AggregatorConfig::default()
    })
    .await;
    let vdaf = VdafInstance::Prio3Count;
    let mut flaky =
        StallingHelper::start_with(&h.helper_url, "aggregate_shares", Stall::FailOnce).await;
    let (task, collector_key) = h.task_via(vdaf.clone(), 2, &flaky.url).await;
    let start = RealClock.now().round_down(task.time_precision);
    let collector = collector(&task, collector_key, &vdaf);
    let query = two_hours_from(start);
    let job = collector.start_collection(query).await.expect("start");
    // About 25 leases of the job, each finding no report.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    upload_ones(&task, &vdaf, 2).await;
    let result = collector
        .poll_until_ready(&job, &query, COLLECT_TIMEOUT)
        .await
        .expect("collected once the failed request was retried");
    flaky.wait_held().await;
    flaky.stop().await;
    h.stop().await;
    assert_eq!(result.report_count, 2);
}

/// A Leader's request for a job does not depend on its clock, which may differ between the
/// replicas that attempt the job (and the Helper refuses a retried job whose request differs
/// from the one it stored): a report that a replica whose clock is behind would call too early
/// is still sent, and the Helper judges it by its own clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_clock_is_behind_drops_no_report() {
    let now = RealClock.now();
    let clock = Arc::new(duet_core::MockClock::new(now));
    let leader = Harness::start_with_clock(
        AggregatorConfig {
            // Time to set the clock back between the uploads and the job.
            job_creation_delay_ms: 2_000,
            polling_interval_ms: 600_000,
            ..AggregatorConfig::default()
        },
        Arc::clone(&clock) as Arc<dyn Clock>,
    )
    .await;
    let helper = Harness::start().await;
    let vdaf = VdafInstance::Prio3Count;
    let (task, collector_key) = leader
        .leader_task(vdaf.clone(), 2, &helper.helper_url)
        .await;
    helper.helper_task(&task).await;
    upload_ones(&task, &vdaf, 2).await;
    clock.set(Time(now.0 - 7_200));
    let start = now.round_down(task.time_precision);
    let result = collector(&task, collector_key, &vdaf)
        .collect(two_hours_from(start), std::time::Duration::from_secs(20))
        .await
        .expect("both reports aggregated");
    leader.stop().await;
    helper.stop().await;
    assert_eq!(result.report_count, 2);
}

/// Reports outlast a Helper that is down for a long while: an aggregation job whose Helper
/// answered 503 twenty times (twice the attempts jobs had before delays grew to ten minutes),
/// over hours of the Leader's clock (run fast here), is still retried, and its reports are
/// collected. (`retry_delay_s`'s own test checks the delays.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_outlast_a_helper_down_for_hours() {
    let now = RealClock.now();
    let clock = Arc::new(duet_core::MockClock::new(now));
    let h = Harness::start_with_clock(
        AggregatorConfig {
            polling_interval_ms: 20,
            // Far longer than any attempt takes on the fast clock, however busy the machine.
            lease_duration_s: 1_000_000,
            ..AggregatorConfig::default()
        },
        Arc::clone(&clock) as Arc<dyn Clock>,
    )
    .await;
    let vdaf = VdafInstance::Prio3Count;
    let failures = 20;
    let mut down = StallingHelper::start_with(
        &h.helper_url,
        "aggregation_jobs",
        Stall::FailTimes(failures),
    )
    .await;
    let (task, collector_key) = h.task_via(vdaf.clone(), 2, &down.url).await;
    let start = now.round_down(task.time_precision);
    upload_ones(&task, &vdaf, 2).await;
    // The Leader's clock runs 100 s per 20 ms, so that each retry comes due in a moment.
    let ticking = {
        let clock = Arc::clone(&clock);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                clock.advance(Duration(100));
            }
        })
    };
    let result = collector(&task, collector_key, &vdaf)
        .collect(two_hours_from(start), COLLECT_TIMEOUT)
        .await
        .expect("collected once the Helper was back");
    ticking.abort();
    down.wait_held().await;
    down.stop().await;
    h.stop().await;
    assert_eq!(result.report_count, 2);
}

/// A `batchMismatch` that another attempt does not settle is final: the collection fails with it
/// after one retry, not after all of the job's attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lasting_batch_mismatch_fails_the_collection() {
    let h = Harness::start_with(AggregatorConfig {
        polling_interval_ms: 600_000,
        ..AggregatorConfig::default()
    })
    .await;
    let vdaf = VdafInstance::Prio3Count;
    let mut refusing =
        StallingHelper::start_with(&h.helper_url, "aggregate_shares", Stall::MismatchAlways).await;
    let (task, collector_key) = h.task_via(vdaf.clone(), 1, &refusing.url).await;
    let start = RealClock.now().round_down(task.time_precision);
    upload_ones(&task, &vdaf, 1).await;
    let failed = collector(&task, collector_key, &vdaf)
        .collect(two_hours_from(start), std::time::Duration::from_secs(20))
        .await;
    refusing.wait_held().await;
    refusing.stop().await;
    h.stop().await;
    match failed {
        Err(duet_collector::CollectorError::Problem { problem_type, .. }) => {
            assert_eq!(problem_type, Some(DapProblemType::BatchMismatch));
        }
        other => panic!("expected batchMismatch, got {other:?}"),
    }
}

/// A Helper that answers an aggregation job's initialization with `finished` (which Prio3's
/// Helper never may) has the job aborted (DAP-09 §4.5.1.1), not its reports dropped one by one
/// while the job counts as finished; the Leader then sends the Helper the job's DELETE
/// (§4.5.2), so that it can clean up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_helper_answers_finished_is_aborted() {
    let h = Harness::start().await;
    let vdaf = VdafInstance::Prio3Count;
    let mut broken =
        StallingHelper::start_with(&h.helper_url, "aggregation_jobs", Stall::FinishAll).await;
    let (task, _) = h.task_via(vdaf.clone(), 1, &broken.url).await;
    upload_ones(&task, &vdaf, 1).await;
    let ended = first_job_outcomes(&h).await;
    let deleted = tokio::time::timeout(std::time::Duration::from_secs(10), broken.held.recv())
        .await
        .is_ok();
    assert!(deleted, "no DELETE of the abandoned job reached the Helper");
    broken.stop().await;
    h.stop().await;
    assert_eq!(
        ended.map(|o| (o.finished, o.abandoned)),
        Some((0, 1)),
        "the job was aborted, not finished"
    );
}

/// A Helper URL that redirects elsewhere: the Leader follows no redirect, so its token for the
/// Helper never reaches the other host, and it retries the job as a set-up problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_follows_no_redirect() {
    let h = Harness::start().await;
    let serve = |app: axum::Router| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (addr, server)
    };
    // The other host counts the requests that reach it.
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reached);
    let (elsewhere, other_host) = serve(axum::Router::new().fallback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { StatusCode::INTERNAL_SERVER_ERROR }
    }))
    .await;
    // The Helper's URL: its HPKE configuration as the real Helper's, its jobs redirected.
    let real = h.helper_url.clone();
    let (redirector, redirecting) = serve(axum::Router::new().fallback(move |uri: Uri| {
        let real = real.clone();
        async move {
            if uri.path().contains("aggregation_jobs") {
                let to = format!("http://{elsewhere}{}", uri.path());
                return (StatusCode::TEMPORARY_REDIRECT, [("location", to)]).into_response();
            }
            let path = uri.path_and_query().map_or("", |p| p.as_str());
            let url = real.join(path.trim_start_matches("/helper/")).expect("url");
            let answer = reqwest::get(url).await.expect("the real Helper answers");
            let content_type = answer
                .headers()
                .get("content-type")
                .map(|v| v.to_str().expect("ascii").to_string())
                .unwrap_or_default();
            let body = answer.bytes().await.expect("body");
            ([("content-type", content_type)], body).into_response()
        }
    }))
    .await;
    let helper_url = parse_endpoint(&format!("http://{redirector}/helper/")).expect("url");
    let vdaf = VdafInstance::Prio3Count;
    let (task, _) = h.task_via(vdaf.clone(), 1, &helper_url).await;
    upload_ones(&task, &vdaf, 1).await;
    let retried = first_job_outcomes(&h).await.is_some_and(|o| o.retried > 0);
    redirecting.abort();
    other_host.abort();
    h.stop().await;
    assert!(retried, "the job was not retried");
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
}

/// A Leader too busy for an upload (429) has it sent again by the client, not lost: both
/// reports of a client whose first two requests were refused are collected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_refused_while_the_leader_is_busy_are_sent_again() {
    let h = Harness::start().await;
    let vdaf = VdafInstance::Prio3Count;
    let (task, collector_key) = h.task(vdaf.clone(), 2).await;
    let mut busy = StallingHelper::start_with(&h.leader_url, "reports", Stall::BusyTwice).await;
    let mut through_busy = task.clone();
    through_busy.leader_endpoint = busy.url.clone();
    let start = RealClock.now().round_down(task.time_precision);
    let one = vdaf.parse_measurement("1").expect("measurement");
    let client = client(&through_busy, &vdaf).await;
    for _ in 0..2 {
        client
            .upload(&one)
            .await
            .expect("uploaded after the Leader was busy");
    }
    busy.wait_held().await;
    let result = collector(&task, collector_key, &vdaf)
        .collect(two_hours_from(start), COLLECT_TIMEOUT)
        .await
        .expect("collected");
    busy.stop().await;
    h.stop().await;
    assert_eq!(result.report_count, 2);
}

/// A poll of a collection job that fails for a moment (here the Leader answers it 503 once, as
/// while it restarts) is tried again within the collection's timeout, not taken for the end of
/// the collection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_poll_is_tried_again() {
    let h = Harness::start().await;
    let vdaf = VdafInstance::Prio3Count;
    let (task, collector_key) = h.task(vdaf.clone(), 1).await;
    let start = RealClock.now().round_down(task.time_precision);
    upload_ones(&task, &vdaf, 1).await;
    let query = two_hours_from(start);
    let job = collector(&task, collector_key.clone(), &vdaf)
        .start_collection(query)
        .await
        .expect("start");
    // Polled through a proxy that fails the first request.
    let mut flaky =
        StallingHelper::start_with(&h.leader_url, "collection_jobs", Stall::FailOnce).await;
    let mut through_flaky = task.clone();
    through_flaky.leader_endpoint = flaky.url.clone();
    let result = collector(&through_flaky, collector_key, &vdaf)
        .poll_until_ready(&job, &query, COLLECT_TIMEOUT)
        .await
        .expect("collected after the failed poll");
    flaky.wait_held().await;
    flaky.stop().await;
    h.stop().await;
    assert_eq!(result.report_count, 1);
}
