//! The Helper's endpoints: aggregation jobs and aggregate shares.

mod common;

use common::{send, Harness};
use duet_core::{AuthenticationToken, Measurement, Task, VdafInstance};
use duet_messages::dap09::{
    media_type, AggregateShareReq, AggregationJobContinueReq, AggregationJobId,
    AggregationJobInitReq, AggregationJobResp, AggregationJobStep, BatchSelector, Duration,
    Interval, PartialBatchSelector, PlaintextInputShare, PrepareContinue, PrepareError,
    PrepareInit, PrepareStepResult, Report, ReportIdChecksum, ReportShare,
};
use duet_messages::{Decode, Encode};
use reqwest::Method;

/// The URL of aggregation job `id` of `task` at its Helper.
fn job_url(task: &Task, id: AggregationJobId) -> url::Url {
    task.helper_endpoint
        .join(&format!("tasks/{}/aggregation_jobs/{id}", task.id))
        .expect("url")
}

/// The URL of `task`'s aggregate shares at its Helper.
fn share_url(task: &Task) -> url::Url {
    task.helper_endpoint
        .join(&format!("tasks/{}/aggregate_shares", task.id))
        .expect("url")
}

/// The Leader's HPKE key, to open the Leader's shares of reports as a Leader would.
async fn leader_key(h: &Harness) -> duet_core::hpke::HpkeKeypair {
    h.leader_store
        .get_hpke_keypairs()
        .await
        .expect("keys")
        .remove(0)
}

/// Builds the Leader's side of an aggregation job by hand, as a Leader would.
fn init_req(
    task: &Task,
    leader_key: &duet_core::hpke::HpkeKeypair,
    reports: &[Report],
) -> AggregationJobInitReq {
    let vdaf = task.vdaf.instantiate().expect("vdaf");
    let info = duet_core::hpke::HpkeApplicationInfo::InputShare {
        server: duet_messages::dap09::Role::Leader,
    };
    let prepare_inits = reports
        .iter()
        .map(|r| {
            let aad = duet_messages::dap09::InputShareAad {
                task_id: task.id,
                metadata: r.metadata,
                public_share: r.public_share.clone(),
            }
            .get_encoded();
            let pt =
                duet_core::hpke::open(leader_key, &info, &r.leader_encrypted_input_share, &aad)
                    .expect("open");
            let share = PlaintextInputShare::get_decoded(&pt).expect("share");
            let (_, message) = vdaf
                .leader_init(
                    &task.vdaf_verify_key,
                    &r.metadata.id,
                    &r.public_share,
                    &share.payload,
                )
                .expect("init");
            PrepareInit {
                report_share: ReportShare {
                    metadata: r.metadata,
                    public_share: r.public_share.clone(),
                    encrypted_input_share: r.helper_encrypted_input_share.clone(),
                },
                message,
            }
        })
        .collect();
    AggregationJobInitReq {
        aggregation_parameter: Vec::new(),
        partial_batch_selector: PartialBatchSelector::TimeInterval,
        prepare_inits,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregation_jobs_and_aggregate_shares() {
    let h = Harness::start().await;
    let (task, _) = h.task(VdafInstance::Prio3Count, 2).await;
    let leader_key = leader_key(&h).await;
    let token = task.aggregator_auth_token.clone();
    let client = common::client(&task).await;
    // Every report of the test at one time, so that all fall in one hour, whenever it runs.
    let now = duet_core::Clock::now(&duet_core::RealClock);
    let at = |m: bool| {
        client
            .prepare_report_at(&Measurement::Count(m), now)
            .expect("report")
    };
    let reports: Vec<Report> = (0..3).map(|i| at(i % 2 == 0)).collect();
    let job_url = |id: AggregationJobId| job_url(&task, id);
    let ct = Some(media_type::AGGREGATION_JOB_INIT_REQ);
    let req = init_req(&task, &leader_key, &reports[..2]).get_encoded();
    let job = AggregationJobId::random();

    // Authentication and media type, after the task (DAP-09 §4.5.1.2).
    let unknown = task
        .helper_endpoint
        .join(&format!(
            "tasks/{}/aggregation_jobs/{job}",
            duet_messages::dap09::TaskId::random()
        ))
        .expect("url");
    send(
        Method::PUT,
        unknown,
        Some(media_type::REPORT),
        Some(&token),
        req.clone(),
    )
    .await
    .assert_problem(400, "unrecognizedTask");
    send(
        Method::PUT,
        job_url(job),
        Some(media_type::REPORT),
        None,
        req.clone(),
    )
    .await
    .assert_problem(403, "unauthorizedRequest");
    send(Method::PUT, job_url(job), ct, None, req.clone())
        .await
        .assert_problem(403, "unauthorizedRequest");
    let wrong = AuthenticationToken::DapAuth("wrong".into());
    send(Method::PUT, job_url(job), ct, Some(&wrong), req.clone())
        .await
        .assert_problem(403, "unauthorizedRequest");
    send(
        Method::PUT,
        job_url(job),
        Some(media_type::REPORT),
        Some(&token),
        req.clone(),
    )
    .await
    .assert_problem(400, "invalidMessage");
    send(Method::PUT, job_url(job), ct, Some(&token), vec![0, 0])
        .await
        .assert_problem(400, "invalidMessage");
    // Wrong query type; a report named twice.
    let mut fixed = init_req(&task, &leader_key, &reports[..1]);
    fixed.partial_batch_selector =
        PartialBatchSelector::FixedSize(duet_messages::dap09::BatchId([1; 32]));
    send(
        Method::PUT,
        job_url(job),
        ct,
        Some(&token),
        fixed.get_encoded(),
    )
    .await
    .assert_problem(400, "invalidMessage");
    let mut twice = init_req(&task, &leader_key, &reports[..1]);
    twice.prepare_inits.push(twice.prepare_inits[0].clone());
    send(
        Method::PUT,
        job_url(job),
        ct,
        Some(&token),
        twice.get_encoded(),
    )
    .await
    .assert_problem(400, "invalidMessage");

    // A good job: every report continues (Prio3's one round).
    let r = send(Method::PUT, job_url(job), ct, Some(&token), req.clone()).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.content_type, media_type::AGGREGATION_JOB_RESP);
    let resp = AggregationJobResp::get_decoded(&r.body).expect("resp");
    assert!(resp
        .prepare_resps
        .iter()
        .all(|p| matches!(p.result, PrepareStepResult::Continue { .. })));
    // The same request again gets the same answer; another body under the same ID is refused.
    let again = send(Method::PUT, job_url(job), ct, Some(&token), req.clone()).await;
    assert_eq!((again.status, again.body), (201, r.body.clone()));
    let other = init_req(&task, &leader_key, &reports[2..]).get_encoded();
    send(Method::PUT, job_url(job), ct, Some(&token), other)
        .await
        .assert_problem(400, "invalidMessage");
    // A replayed report in a new job is rejected as replayed; a new one in the same job is fine.
    let replay = init_req(
        &task,
        &leader_key,
        &[reports[0].clone(), reports[2].clone()],
    )
    .get_encoded();
    let r2 = send(
        Method::PUT,
        job_url(AggregationJobId::random()),
        ct,
        Some(&token),
        replay,
    )
    .await;
    let resp2 = AggregationJobResp::get_decoded(&r2.body).expect("resp");
    assert_eq!(
        resp2.prepare_resps[0].result,
        PrepareStepResult::Reject(PrepareError::ReportReplayed)
    );
    assert!(matches!(
        resp2.prepare_resps[1].result,
        PrepareStepResult::Continue { .. }
    ));
    // A corrupted Leader message fails preparation, not the request.
    let mut corrupt = init_req(&task, &leader_key, &[at(true)]);
    corrupt.prepare_inits[0].message = vec![0, 0, 0, 0, 1, 7];
    let r3 = send(
        Method::PUT,
        job_url(AggregationJobId::random()),
        ct,
        Some(&token),
        corrupt.get_encoded(),
    )
    .await;
    let resp3 = AggregationJobResp::get_decoded(&r3.body).expect("resp");
    assert!(
        matches!(resp3.prepare_resps[0].result, PrepareStepResult::Reject(_)),
        "{resp3:?}"
    );
    // Continuations: unknown job, and any step on a finished Prio3 job.
    let cont = AggregationJobContinueReq {
        step: AggregationJobStep(1),
        prepare_continues: vec![PrepareContinue {
            report_id: reports[0].metadata.id,
            message: vec![2],
        }],
    }
    .get_encoded();
    let cct = Some(media_type::AGGREGATION_JOB_CONTINUE_REQ);
    send(
        Method::POST,
        job_url(AggregationJobId::random()),
        cct,
        Some(&token),
        cont.clone(),
    )
    .await
    .assert_problem(400, "unrecognizedAggregationJob");
    // An unknown job is named as such whatever the message (DAP-09 checks the job first).
    send(
        Method::POST,
        job_url(AggregationJobId::random()),
        cct,
        Some(&token),
        vec![0xff; 3],
    )
    .await
    .assert_problem(400, "unrecognizedAggregationJob");
    // Its reports have no preparation state left to continue (DAP-09 §4.5.2).
    send(Method::POST, job_url(job), cct, Some(&token), cont)
        .await
        .assert_problem(400, "invalidMessage");

    // Aggregate shares: 3 reports were accepted over the two jobs.
    let share_url = share_url(&task);
    let interval = Interval {
        start: reports[0].metadata.time.round_down(Duration(3600)),
        duration: Duration(3600),
    };
    let checksum = [0usize, 1, 2]
        .iter()
        .fold(ReportIdChecksum::default(), |c, &i| {
            c.updated_with(&reports[i].metadata.id)
        });
    let share_req = |count: u64, checksum: ReportIdChecksum, interval: Interval| {
        AggregateShareReq {
            batch_selector: BatchSelector::TimeInterval {
                batch_interval: interval,
            },
            aggregation_parameter: Vec::new(),
            report_count: count,
            checksum,
        }
        .get_encoded()
    };
    let sct = Some(media_type::AGGREGATE_SHARE_REQ);
    send(
        Method::POST,
        share_url.clone(),
        sct,
        None,
        share_req(3, checksum, interval),
    )
    .await
    .assert_problem(403, "unauthorizedRequest");
    let misaligned = Interval {
        start: duet_messages::dap09::Time(interval.start.0 + 1),
        duration: Duration(3600),
    };
    send(
        Method::POST,
        share_url.clone(),
        sct,
        Some(&token),
        share_req(3, checksum, misaligned),
    )
    .await
    .assert_problem(400, "batchInvalid");
    send(
        Method::POST,
        share_url.clone(),
        sct,
        Some(&token),
        share_req(2, checksum, interval),
    )
    .await
    .assert_problem(400, "batchMismatch");
    send(
        Method::POST,
        share_url.clone(),
        sct,
        Some(&token),
        share_req(3, ReportIdChecksum::default(), interval),
    )
    .await
    .assert_problem(400, "batchMismatch");
    let empty = Interval {
        start: duet_messages::dap09::Time(interval.start.0 + 7200),
        duration: Duration(3600),
    };
    send(
        Method::POST,
        share_url.clone(),
        sct,
        Some(&token),
        share_req(0, ReportIdChecksum::default(), empty),
    )
    .await
    .assert_problem(400, "invalidBatchSize");
    let ok = send(
        Method::POST,
        share_url.clone(),
        sct,
        Some(&token),
        share_req(3, checksum, interval),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(ok.content_type, media_type::AGGREGATE_SHARE);
    // Idempotent repeat; then the batch is collected: new reports in it are rejected.
    let repeat = send(
        Method::POST,
        share_url.clone(),
        sct,
        Some(&token),
        share_req(3, checksum, interval),
    )
    .await;
    assert_eq!((repeat.status, repeat.body), (200, ok.body));
    let late = init_req(&task, &leader_key, &[at(true)]);
    let r4 = send(
        Method::PUT,
        job_url(AggregationJobId::random()),
        ct,
        Some(&token),
        late.get_encoded(),
    )
    .await;
    let resp4 = AggregationJobResp::get_decoded(&r4.body).expect("resp");
    assert_eq!(
        resp4.prepare_resps[0].result,
        PrepareStepResult::Reject(PrepareError::BatchCollected)
    );
    // Overlapping batch.
    let wide = Interval {
        start: interval.start,
        duration: Duration(7200),
    };
    send(
        Method::POST,
        share_url,
        sct,
        Some(&token),
        share_req(3, checksum, wide),
    )
    .await
    .assert_problem(400, "batchOverlap");
    h.stop().await;
}

/// A request without the Leader's token is answered from its headers: the Helper reads no body
/// from a stranger, however long the body says it is (here 256 MiB, never sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_answered_before_their_bodies_are_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let h = Harness::start().await;
    let (task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    let wrong = AuthenticationToken::DapAuth("wrong".into());
    let job = AggregationJobId::random();
    let requests = [
        (
            "PUT",
            format!("tasks/{}/aggregation_jobs/{job}", task.id),
            media_type::AGGREGATION_JOB_INIT_REQ,
        ),
        (
            "POST",
            format!("tasks/{}/aggregation_jobs/{job}", task.id),
            media_type::AGGREGATION_JOB_CONTINUE_REQ,
        ),
        (
            "POST",
            format!("tasks/{}/aggregate_shares", task.id),
            media_type::AGGREGATE_SHARE_REQ,
        ),
    ];
    for (method, path, content_type) in requests {
        for token in [None, Some(&wrong)] {
            let url = h.helper_url.join(&path).expect("url");
            let host = url.host_str().expect("host");
            let port = url.port().expect("port");
            let mut conn = tokio::net::TcpStream::connect((host, port))
                .await
                .expect("connect");
            let header = match token {
                Some(AuthenticationToken::DapAuth(t)) => format!("DAP-Auth-Token: {t}\r\n"),
                _ => String::new(),
            };
            let head = format!(
                "{method} {} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n\
                 {header}Content-Length: {}\r\n\r\n",
                url.path(),
                256u64 << 20
            );
            conn.write_all(head.as_bytes()).await.expect("write");
            conn.write_all(&[0; 1024]).await.expect("write");
            let mut answer = vec![0; 4096];
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(30), conn.read(&mut answer))
                    .await
                    .expect("the Helper answered before the body was sent")
                    .expect("read");
            let answer = String::from_utf8_lossy(&answer[..read]);
            assert!(
                answer.starts_with("HTTP/1.1 403"),
                "{method} {path}: {answer}"
            );
            assert!(answer.contains("unauthorizedRequest"), "{answer}");
        }
    }
    h.stop().await;
}

/// A job of reports at `times` (in seconds) whose shares no key opens: each is rejected once
/// prepared, so what a Helper refuses before preparing stands out.
fn unopenable_job(times: impl Iterator<Item = u64>) -> AggregationJobInitReq {
    use duet_messages::dap09::{HpkeCiphertext, HpkeConfigId, ReportId, ReportMetadata, Time};

    AggregationJobInitReq {
        aggregation_parameter: Vec::new(),
        partial_batch_selector: PartialBatchSelector::TimeInterval,
        prepare_inits: times
            .map(|t| PrepareInit {
                report_share: ReportShare {
                    metadata: ReportMetadata {
                        id: ReportId::random(),
                        time: Time(t),
                    },
                    public_share: Vec::new(),
                    encrypted_input_share: HpkeCiphertext {
                        config_id: HpkeConfigId(1),
                        encapsulated_key: vec![1],
                        payload: vec![1],
                    },
                },
                message: vec![1],
            })
            .collect(),
    }
}

/// A job of more reports than a Helper prepares at once is refused before any is prepared.
#[tokio::test]
async fn jobs_over_the_size_limit_are_refused() {
    let h = Harness::start().await;
    let (task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    let init = |n: usize| unopenable_job(std::iter::repeat_n(0, n));
    let url = job_url(&task, AggregationJobId::random());
    let r = send(
        Method::PUT,
        url,
        Some(media_type::AGGREGATION_JOB_INIT_REQ),
        Some(&task.aggregator_auth_token),
        init(100_001).get_encoded(),
    )
    .await;
    let detail = String::from_utf8_lossy(&r.body).into_owned();
    assert!(detail.contains("at most 100000 per job"), "{detail}");
    r.assert_problem(400, "invalidMessage");
    h.stop().await;
}

/// A job whose reports fall in more time buckets than the Helper has room for the aggregates of
/// is refused before any report is prepared or recorded; the same job ID then takes a job
/// within the limit. Here `max_job_aggregate_bytes` of 16 holds two Prio3Count aggregates.
#[tokio::test]
async fn jobs_spread_over_too_many_buckets_are_refused() {
    let h = Harness::start_with(duet_aggregator::AggregatorConfig {
        max_job_aggregate_bytes: 16,
        ..duet_aggregator::AggregatorConfig::default()
    })
    .await;
    let (task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    let hour = task.time_precision.0;
    // Report shares no key opens: each is rejected once prepared, so only the job's own
    // refusal answers 400.
    let init = |times: &[u64]| unopenable_job(times.iter().copied());
    let url = job_url(&task, AggregationJobId::random());
    let put = |req: AggregationJobInitReq| {
        send(
            Method::PUT,
            url.clone(),
            Some(media_type::AGGREGATION_JOB_INIT_REQ),
            Some(&task.aggregator_auth_token),
            req.get_encoded(),
        )
    };
    let r = put(init(&[0, hour, 2 * hour])).await;
    let detail = String::from_utf8_lossy(&r.body).into_owned();
    assert!(detail.contains("more than 2 time buckets"), "{detail}");
    r.assert_problem(400, "invalidMessage");
    // Three reports in two buckets fit, under the refused job's ID: nothing of it was kept.
    let r = put(init(&[0, hour - 1, hour])).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let resp = AggregationJobResp::get_decoded(&r.body).expect("resp");
    assert_eq!(resp.prepare_resps.len(), 3);
    h.stop().await;
}

/// A Leader's retry of a job the Helper took gets the stored answer even after the Helper's
/// budget for a job's aggregates was lowered below what the job needs: the bucket check comes
/// after the stored answer. A new job of the same reports is refused for its buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_job_gets_its_answer_after_the_budget_is_lowered() {
    let h = Harness::start().await;
    let (task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    let leader_key = leader_key(&h).await;
    let client = common::client(&task).await;
    let now = duet_core::Clock::now(&duet_core::RealClock);
    let hour = task.time_precision.0;
    let reports: Vec<Report> = (0..3)
        .map(|k| {
            client
                .prepare_report_at(
                    &Measurement::Count(true),
                    duet_messages::dap09::Time(now.0 - k * hour),
                )
                .expect("report")
        })
        .collect();
    let body = init_req(&task, &leader_key, &reports).get_encoded();
    let put = |h: &Harness, id: AggregationJobId| {
        let url = h
            .helper_url
            .join(&format!("tasks/{}/aggregation_jobs/{id}", task.id))
            .expect("url");
        send(
            Method::PUT,
            url,
            Some(media_type::AGGREGATION_JOB_INIT_REQ),
            Some(&task.aggregator_auth_token),
            body.clone(),
        )
    };
    let id = AggregationJobId::random();
    let first = put(&h, id).await;
    assert_eq!(
        first.status,
        201,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    // Room for two Prio3Count aggregates; the job's reports are in three hours.
    let h = h
        .restart_with(duet_aggregator::AggregatorConfig {
            max_job_aggregate_bytes: 16,
            ..duet_aggregator::AggregatorConfig::default()
        })
        .await;
    let again = put(&h, id).await;
    assert_eq!(
        again.status,
        201,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(again.body, first.body);
    let other = put(&h, AggregationJobId::random()).await;
    let detail = String::from_utf8_lossy(&other.body).into_owned();
    assert!(detail.contains("more than 2 time buckets"), "{detail}");
    other.assert_problem(400, "invalidMessage");
    h.stop().await;
}

/// A report the Helper rejected is never prepared again: in a later job it is `report_replayed`,
/// whatever Leader share comes with it (DAP-09 §4.5.1.1 forbids the Leader to send it again, and
/// a second answer to a second Leader share would tell a Leader something of the Helper's).
/// Only a report rejected as too early may come back, and is prepared once its time has come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_reports_are_not_prepared_again() {
    // The hour's last second, where rounding a report's time down to the hour takes the most.
    let hour = duet_messages::dap09::Duration(3_600);
    let now = duet_core::Clock::now(&duet_core::RealClock).round_down(hour);
    let now = duet_messages::dap09::Time(now.0 + hour.0 - 1);
    let clock = std::sync::Arc::new(duet_core::MockClock::new(now));
    let h = Harness::start_with_clock(
        duet_aggregator::AggregatorConfig::default(),
        std::sync::Arc::clone(&clock) as std::sync::Arc<dyn duet_core::Clock>,
    )
    .await;
    let (task, _) = h.task(VdafInstance::Prio3Count, 2).await;
    let leader_key = leader_key(&h).await;
    let token = task.aggregator_auth_token.clone();
    let client = common::client(&task).await;
    let ct = Some(media_type::AGGREGATION_JOB_INIT_REQ);
    let run_job = |req: &AggregationJobInitReq| {
        let url = job_url(&task, AggregationJobId::random());
        let body = req.get_encoded();
        let token = token.clone();
        async move {
            let answer = send(Method::PUT, url, ct, Some(&token), body).await;
            assert_eq!(
                answer.status,
                201,
                "{}",
                String::from_utf8_lossy(&answer.body)
            );
            AggregationJobResp::get_decoded(&answer.body).expect("resp")
        }
    };

    // Rejected for its corrupted Leader share, then sent again with the right one: replayed.
    let report = client
        .prepare_report(&Measurement::Count(true))
        .expect("report");
    let good = init_req(&task, &leader_key, std::slice::from_ref(&report));
    let mut corrupt = good.clone();
    corrupt.prepare_inits[0].message = vec![0, 0, 0, 0, 1, 7];
    let first = run_job(&corrupt).await;
    assert!(
        matches!(first.prepare_resps[0].result, PrepareStepResult::Reject(_)),
        "{first:?}"
    );
    let again = run_job(&good).await;
    assert_eq!(
        again.prepare_resps[0].result,
        PrepareStepResult::Reject(PrepareError::ReportReplayed),
        "a rejected report was prepared again"
    );

    // Too early, then on time: prepared.
    // Two hours ahead, so that the report's time, rounded down to the hour, is still over an
    // hour ahead of the clock, whatever the minute.
    let later = duet_messages::dap09::Time(now.0 + 2 * 3_600);
    let early = client
        .prepare_report_at(&Measurement::Count(true), later)
        .expect("report");
    let req = init_req(&task, &leader_key, std::slice::from_ref(&early));
    let first = run_job(&req).await;
    assert_eq!(
        first.prepare_resps[0].result,
        PrepareStepResult::Reject(PrepareError::ReportTooEarly)
    );
    clock.set(later);
    let again = run_job(&req).await;
    assert!(
        matches!(
            again.prepare_resps[0].result,
            PrepareStepResult::Continue { .. }
        ),
        "{again:?}"
    );
    h.stop().await;
}

/// An aggregate share request is checked in DAP-09's order (§4.6.6): a batch that is both too
/// small and overlapping one served before is `invalidBatchSize`, not `batchOverlap`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_checks_come_in_the_drafts_order() {
    let h = Harness::start().await;
    let (task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    let leader_key = leader_key(&h).await;
    let token = task.aggregator_auth_token.clone();
    let client = common::client(&task).await;
    let report = client
        .prepare_report(&Measurement::Count(true))
        .expect("report");
    let url = job_url(&task, AggregationJobId::random());
    let init = init_req(&task, &leader_key, std::slice::from_ref(&report)).get_encoded();
    let answer = send(
        Method::PUT,
        url,
        Some(media_type::AGGREGATION_JOB_INIT_REQ),
        Some(&token),
        init,
    )
    .await;
    assert_eq!(answer.status, 201);
    let hour = Duration(3600);
    let bucket = report.metadata.time.round_down(hour);
    let share = |start: u64, count: u64| {
        let checksum = if count == 0 {
            ReportIdChecksum::default()
        } else {
            ReportIdChecksum::default().updated_with(&report.metadata.id)
        };
        let body = AggregateShareReq {
            batch_selector: BatchSelector::TimeInterval {
                batch_interval: Interval {
                    start: duet_messages::dap09::Time(start),
                    duration: Duration(7200),
                },
            },
            aggregation_parameter: Vec::new(),
            report_count: count,
            checksum,
        }
        .get_encoded();
        let url = share_url(&task);
        send(
            Method::POST,
            url,
            Some(media_type::AGGREGATE_SHARE_REQ),
            Some(&token),
            body,
        )
    };
    // Served: the report's hour and the one before it.
    let served = share(bucket.0 - 3600, 1).await;
    assert_eq!(
        served.status,
        200,
        "{}",
        String::from_utf8_lossy(&served.body)
    );
    // The two hours before that: overlapping in the empty hour, and empty.
    share(bucket.0 - 7200, 0)
        .await
        .assert_problem(400, "invalidBatchSize");
    // The report's hour and the one after it: overlapping, and large enough.
    share(bucket.0, 1).await.assert_problem(400, "batchOverlap");
    h.stop().await;
}

/// A report whose time is past 2^63 seconds is too early whatever the task's clock skew: a
/// Helper that allowed any skew would otherwise take it, then fail to store its job (at every
/// attempt of the Leader's, until it gave the job up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_past_what_a_store_keeps_are_too_early() {
    let h = Harness::start().await;
    let (task, _) = h
        .leader_task(VdafInstance::Prio3Count, 1, &h.helper_url)
        .await;
    h.helper_task_with(&task, |t| t.tolerable_clock_skew = Duration(u64::MAX))
        .await;
    let leader_key = leader_key(&h).await;
    let client = common::client(&task).await;
    let far = client
        .prepare_report_at(
            &Measurement::Count(true),
            duet_messages::dap09::Time(u64::MAX),
        )
        .expect("report");
    let req = init_req(&task, &leader_key, std::slice::from_ref(&far));
    let answer = send(
        Method::PUT,
        job_url(&task, AggregationJobId::random()),
        Some(media_type::AGGREGATION_JOB_INIT_REQ),
        Some(&task.aggregator_auth_token),
        req.get_encoded(),
    )
    .await;
    assert_eq!(
        answer.status,
        201,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let resp = AggregationJobResp::get_decoded(&answer.body).expect("resp");
    assert_eq!(
        resp.prepare_resps[0].result,
        PrepareStepResult::Reject(PrepareError::ReportTooEarly)
    );
    h.stop().await;
}
