//! `GET /metrics`: the counters after a few uploads (one refused) have been aggregated.

mod common;

use std::time::Duration as StdDuration;

use common::{send, Harness};
use duet_core::{Clock, Measurement, RealClock, Task, VdafInstance};
use duet_messages::dap09::{media_type, Report, Time};
use duet_messages::{Decode, Encode};
use reqwest::Method;

/// Reads `/metrics`: its content type and its samples (`name{labels}` → value).
async fn scrape(h: &Harness) -> (String, Vec<(String, f64)>) {
    let url = h.leader_url.join("/metrics").expect("url");
    let r = send(Method::GET, url, None, None, Vec::new()).await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).expect("UTF-8");
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("a sample line");
            (name.to_string(), value.parse().expect("a number"))
        })
        .collect();
    (r.content_type, samples)
}

/// Scrapes `/metrics` every 100 ms until `done` holds of its samples, ten seconds at most;
/// returns the last samples.
async fn scrape_until(h: &Harness, done: impl Fn(&[(String, f64)]) -> bool) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    for _ in 0..100 {
        (_, samples) = scrape(h).await;
        if done(&samples) {
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    samples
}

/// Uploads a Prio3Count report to `task` in each of the last `hours` hours (this one first).
async fn upload_one_an_hour(client: &duet_client::Client, task: &Task, hours: u64) {
    let now = RealClock.now();
    for hours_ago in 0..hours {
        let time = Time(now.0 - hours_ago * task.time_precision.0);
        client
            .upload_at(&Measurement::Count(true), Some(time))
            .await
            .expect("upload");
    }
}

/// Uploads a Prio3Count report of each of `bits` to `task`'s Leader, each accepted; returns the
/// upload URL.
async fn upload_counts(task: &Task, client: &duet_client::Client, bits: &[bool]) -> url::Url {
    let url = task
        .leader_endpoint
        .join(&format!("tasks/{}/reports", task.id))
        .expect("url");
    for bit in bits {
        let report = client
            .prepare_report(&Measurement::Count(*bit))
            .expect("report");
        let r = send(
            Method::PUT,
            url.clone(),
            Some(media_type::REPORT),
            None,
            report.get_encoded(),
        )
        .await;
        assert_eq!(r.status, 201);
    }
    url
}

fn value(samples: &[(String, f64)], name: &str) -> Option<f64> {
    samples.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_uploads_and_jobs() {
    let h = Harness::start().await;
    let (task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    let client = common::client(&task).await;
    let url = upload_counts(&task, &client, &[true, false, true]).await;
    // A report from a day in the future.
    let mut early = Report::get_decoded(
        &client
            .prepare_report(&Measurement::Count(true))
            .expect("report")
            .get_encoded(),
    )
    .expect("decode");
    early.metadata.time = Time(RealClock.now().0 + 86_400);
    send(
        Method::PUT,
        url.clone(),
        Some(media_type::REPORT),
        None,
        early.get_encoded(),
    )
    .await
    .assert_problem(400, "reportTooEarly");

    // Aggregation runs in the background: wait until all three reports are aggregated.
    let mut samples = Vec::new();
    for _ in 0..100 {
        let content_type;
        (content_type, samples) = scrape(&h).await;
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        // Every job the Helper answered has also been recorded as finished by the Leader.
        let finished = value(
            &samples,
            "duet_aggregation_jobs_total{outcome=\"finished\"}",
        );
        let answered = value(
            &samples,
            "duet_datastore_seconds_count{operation=\"put_helper_aggregation_job\"}",
        );
        if value(&samples, "duet_helper_reports_total{outcome=\"continued\"}") == Some(3.0)
            && finished.is_some_and(|n| n >= 1.0)
            && finished == answered
        {
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    let v = |name: &str| value(&samples, name).unwrap_or_else(|| panic!("{name} missing"));
    assert_eq!(v("duet_uploads_total"), 3.0);
    assert_eq!(
        v("duet_upload_rejections_total{reason=\"reportTooEarly\"}"),
        1.0
    );
    assert_eq!(v("duet_helper_reports_total{outcome=\"continued\"}"), 3.0);
    assert_eq!(v("duet_helper_reports_total{outcome=\"rejected\"}"), 0.0);
    let finished = v("duet_aggregation_jobs_total{outcome=\"finished\"}");
    assert!((1.0..=3.0).contains(&finished), "{finished} jobs finished");
    assert_eq!(v("duet_leader_reports_total{outcome=\"aggregated\"}"), 3.0);
    for outcome in ["rejected", "rejected_by_helper", "abandoned"] {
        let name = format!("duet_leader_reports_total{{outcome=\"{outcome}\"}}");
        assert_eq!(v(&name), 0.0, "{name}");
    }
    assert_eq!(v("duet_aggregation_jobs_total{outcome=\"retried\"}"), 0.0);
    assert_eq!(v("duet_aggregation_jobs_total{outcome=\"abandoned\"}"), 0.0);
    assert_eq!(v("duet_collection_jobs_total{outcome=\"finished\"}"), 0.0);
    assert!(v("duet_datastore_seconds_count{operation=\"put_reports\"}") >= 1.0);
    assert!(v("duet_datastore_seconds_sum{operation=\"put_reports\"}") > 0.0);
    assert_eq!(
        v("duet_datastore_seconds_count{operation=\"finish_aggregation_job\"}"),
        finished
    );
    assert_eq!(
        v("duet_datastore_seconds_count{operation=\"put_helper_aggregation_job\"}"),
        finished
    );
    h.stop().await;
}

/// A task's jobs hold as many reports as fit `max_aggregation_job_bytes` (here two and a half
/// reports' worth), whatever `max_aggregation_job_size` allows: five reports make jobs of two
/// at most (three, as the uploads land before the creator's pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_hold_what_fits_their_byte_budget() {
    let probe = Harness::start().await;
    let (task, _) = probe.task(VdafInstance::Prio3Count, 1).await;
    let report_len = common::client(&task)
        .await
        .prepare_report(&Measurement::Count(true))
        .expect("report")
        .get_encoded()
        .len();
    probe.stop().await;
    let h = Harness::start_with(duet_aggregator::AggregatorConfig {
        max_aggregation_job_bytes: report_len * 5 / 2,
        // Every upload lands before the job creator cuts jobs.
        job_creation_delay_ms: 1000,
        ..duet_aggregator::AggregatorConfig::default()
    })
    .await;
    let (task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    let client = common::client(&task).await;
    upload_counts(&task, &client, &[true; 5]).await;
    // A job's reports are counted before the job: wait for both.
    let aggregated = "duet_leader_reports_total{outcome=\"aggregated\"}";
    let finished = "duet_aggregation_jobs_total{outcome=\"finished\"}";
    let samples = scrape_until(&h, |samples| {
        value(samples, aggregated) == Some(5.0) && value(samples, finished) >= Some(3.0)
    })
    .await;
    assert_eq!(value(&samples, aggregated), Some(5.0), "{samples:?}");
    assert!(value(&samples, finished) >= Some(3.0), "{samples:?}");
    // However the uploads fell between the creator's passes, no job holds more than two.
    let mut db = h.sqlite().await;
    let (largest, reports): (i64, i64) =
        sqlx::query_as("SELECT MAX(report_count), SUM(report_count) FROM aggregation_jobs")
            .fetch_one(&mut db)
            .await
            .expect("jobs");
    sqlx::Connection::close(db).await.expect("close");
    assert!(largest <= 2, "a job of {largest} reports");
    assert_eq!(reports, 5);
    h.stop().await;
}

/// With room for two Prio3Count aggregates per job (`max_job_aggregate_bytes` of 16), the Leader
/// cuts five reports, each in an hour of its own, into jobs of at most two, and the Helper, with
/// the same setting, takes every one: all five are aggregated, in three jobs or more, none
/// abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_hold_what_fits_their_aggregate_budget() {
    let h = Harness::start_with(duet_aggregator::AggregatorConfig {
        max_job_aggregate_bytes: 16,
        // Every upload lands before the job creator cuts jobs.
        job_creation_delay_ms: 1000,
        ..duet_aggregator::AggregatorConfig::default()
    })
    .await;
    let (task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    let client = common::client(&task).await;
    upload_one_an_hour(&client, &task, 5).await;
    let aggregated = "duet_leader_reports_total{outcome=\"aggregated\"}";
    let finished = "duet_aggregation_jobs_total{outcome=\"finished\"}";
    let abandoned = "duet_aggregation_jobs_total{outcome=\"abandoned\"}";
    let samples = scrape_until(&h, |samples| {
        let ended =
            value(samples, finished).unwrap_or(0.0) + value(samples, abandoned).unwrap_or(0.0);
        value(samples, aggregated) == Some(5.0) && ended >= 3.0 || ended >= 5.0
    })
    .await;
    assert_eq!(value(&samples, abandoned), Some(0.0), "{samples:?}");
    assert_eq!(value(&samples, aggregated), Some(5.0), "{samples:?}");
    // Jobs of at most two reports (three or more, as the uploads came by the creator's passes).
    assert!(value(&samples, finished) >= Some(3.0), "{samples:?}");
    h.stop().await;
}

/// A replica that runs jobs sizes them for a task it has never served, stored after it started
/// and uploaded to another replica: five reports in five hours, uploaded to an API-only
/// replica, with room for two buckets per job, all end up in jobs the Helper takes. (A job of
/// all five is refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_replica_sizes_jobs_of_a_task_uploaded_elsewhere() {
    let h = Harness::start_with(duet_aggregator::AggregatorConfig {
        max_job_aggregate_bytes: 16,
        // The job creator passes while the uploads come, and after them.
        polling_interval_ms: 50,
        ..duet_aggregator::AggregatorConfig::default()
    })
    .await;
    let (api, api_url) = h.api_replica().await;
    let (mut task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    task.leader_endpoint = api_url;
    let client = common::client(&task).await;
    upload_one_an_hour(&client, &task, 5).await;
    let aggregated = "duet_leader_reports_total{outcome=\"aggregated\"}";
    let abandoned = "duet_aggregation_jobs_total{outcome=\"abandoned\"}";
    let samples = scrape_until(&h, |samples| {
        value(samples, aggregated) == Some(5.0) || value(samples, abandoned) > Some(0.0)
    })
    .await;
    api.shutdown().await.expect("shutdown");
    h.stop().await;
    assert_eq!(value(&samples, abandoned), Some(0.0), "{samples:?}");
    assert_eq!(value(&samples, aggregated), Some(5.0), "{samples:?}");
}

/// Reports queued for a task no longer stored (a replica that still had it cached took them
/// after it was deleted), or for one whose stored parameters cannot be read, hold back no other
/// task's: the job creator, finding no such task, claims them into jobs of the largest size,
/// and the reports uploaded after them are aggregated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_of_tasks_gone_or_unreadable_hold_back_no_others() {
    let h = Harness::start_with(duet_aggregator::AggregatorConfig {
        polling_interval_ms: 50,
        ..duet_aggregator::AggregatorConfig::default()
    })
    .await;
    let (gone, unreadable) = (
        duet_messages::dap09::TaskId::random(),
        duet_messages::dap09::TaskId::random(),
    );
    let mut db = h.sqlite().await;
    sqlx::query("INSERT INTO tasks (role, task_id, parameters) VALUES ('leader', ?, '{}')")
        .bind(&unreadable.0[..])
        .execute(&mut db)
        .await
        .expect("an unreadable task");
    sqlx::Connection::close(db).await.expect("close");
    for task_id in [gone, unreadable] {
        let orphans: Vec<duet_store::NewReport> = (0..3)
            .map(|_| duet_store::NewReport {
                task_id,
                report_id: duet_messages::dap09::ReportId::random(),
                time: RealClock.now(),
                encoded: vec![0; 8],
            })
            .collect();
        h.leader_store
            .put_reports(&orphans)
            .await
            .expect("put_reports");
    }
    let (task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    let client = common::client(&task).await;
    upload_counts(&task, &client, &[true, false]).await;
    let aggregated = "duet_leader_reports_total{outcome=\"aggregated\"}";
    let samples = scrape_until(&h, |samples| value(samples, aggregated) == Some(2.0)).await;
    h.stop().await;
    assert_eq!(value(&samples, aggregated), Some(2.0), "{samples:?}");
}

/// Reports the Helper rejects are counted as such by the Leader: here the Helper's copy of the
/// task has another verify key, so every report fails its preparation there, and the Leader's
/// jobs still finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_the_helper_rejects_are_counted() {
    let h = Harness::start().await;
    let (task, _) = h
        .leader_task(VdafInstance::Prio3Count, 1, &h.helper_url)
        .await;
    h.helper_task_with(&task, |t| {
        t.vdaf_verify_key = task.vdaf_verify_key.map(|b| b ^ 0xff)
    })
    .await;
    let client = common::client(&task).await;
    for m in [true, false] {
        client.upload(&Measurement::Count(m)).await.expect("upload");
    }
    let name = "duet_leader_reports_total{outcome=\"rejected_by_helper\"}";
    for _ in 0..100 {
        let (_, samples) = scrape(&h).await;
        if value(&samples, name) == Some(2.0) {
            assert_eq!(
                value(
                    &samples,
                    "duet_leader_reports_total{outcome=\"aggregated\"}"
                ),
                Some(0.0)
            );
            h.stop().await;
            return;
        }
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    panic!("{name} did not reach 2");
}

/// With an admin listener, `/metrics` and `/healthz` are served there and not on the DAP
/// listener, which strangers reach.
#[tokio::test]
async fn an_admin_listener_takes_metrics_and_health_off_the_dap_port() {
    use std::sync::Arc;

    use duet_aggregator::server::{run_with_admin, RoleConfig, Roles};
    use duet_aggregator::{AggregatorConfig, Datastore};
    use duet_core::AggregatorRole;
    use duet_store::sqlite::SqliteDatastore;

    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteDatastore::connect(&dir.path().join("a.sqlite").to_string_lossy())
        .await
        .expect("open");
    let leader: Arc<dyn Datastore> = Arc::new(store.with_role(AggregatorRole::Leader));
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let server = run_with_admin(
        bind().await.expect("bind"),
        Some(bind().await.expect("bind")),
        Roles {
            leader: Some(RoleConfig {
                store: leader,
                path_prefix: "/leader".into(),
            }),
            helper: None,
        },
        AggregatorConfig::default(),
        Arc::new(RealClock),
        axum::Router::new(),
    )
    .await
    .expect("server");
    let dap = format!("http://{}", server.local_addr);
    let admin = format!("http://{}", server.admin_addr.expect("admin address"));
    let status =
        |url: String| async move { reqwest::get(url).await.expect("request").status().as_u16() };
    for path in ["/metrics", "/healthz"] {
        assert_eq!(status(format!("{admin}{path}")).await, 200, "{path}");
        assert_eq!(status(format!("{dap}{path}")).await, 404, "{path}");
    }
    // The DAP routes stay where they were.
    assert_eq!(status(format!("{dap}/leader/hpke_config")).await, 200);
    server.shutdown().await.expect("shutdown");
}
