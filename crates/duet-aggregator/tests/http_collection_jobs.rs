//! `PUT/POST/DELETE /tasks/{task}/collection_jobs/{id}` on the Leader.

mod common;

use common::{send, Harness};
use duet_core::{AuthenticationToken, Clock, Measurement, RealClock, VdafInstance};
use duet_messages::dap09::{
    media_type, CollectionJobId, CollectionReq, Duration, Interval, Query, Time,
};
use duet_messages::Encode;
use reqwest::Method;

/// The URL of collection job `id` of `task` at its Leader.
fn job_url(task: &duet_core::Task, id: CollectionJobId) -> url::Url {
    task.leader_endpoint
        .join(&format!("tasks/{}/collection_jobs/{id}", task.id))
        .expect("url")
}

fn req(start: u64, duration: u64) -> Vec<u8> {
    CollectionReq {
        query: Query::TimeInterval {
            batch_interval: Interval {
                start: Time(start),
                duration: Duration(duration),
            },
        },
        aggregation_parameter: Vec::new(),
    }
    .get_encoded()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_job_validation_and_lifecycle() {
    let h = Harness::start().await;
    let (task, _) = h.task(VdafInstance::Prio3Count, 3).await;
    let token = task.collector_auth_token.clone().expect("token");
    let job_url = |id: CollectionJobId| job_url(&task, id);
    let hour = RealClock.now().round_down(Duration(3600)).0;
    let ct = Some(media_type::COLLECTION_REQ);

    // Authentication: none, or the wrong token.
    let id = CollectionJobId::random();
    send(Method::PUT, job_url(id), ct, None, req(hour, 3600))
        .await
        .assert_problem(403, "unauthorizedRequest");
    let wrong = AuthenticationToken::Bearer("nope".into());
    send(Method::PUT, job_url(id), ct, Some(&wrong), req(hour, 3600))
        .await
        .assert_problem(403, "unauthorizedRequest");
    // The token before the media type and the body: a stranger's body is not read.
    send(
        Method::PUT,
        job_url(id),
        Some("text/plain"),
        None,
        vec![0; 70_000],
    )
    .await
    .assert_problem(403, "unauthorizedRequest");
    // Misaligned or too short intervals.
    send(
        Method::PUT,
        job_url(id),
        ct,
        Some(&token),
        req(hour + 1, 3600),
    )
    .await
    .assert_problem(400, "batchInvalid");
    send(Method::PUT, job_url(id), ct, Some(&token), req(hour, 1800))
        .await
        .assert_problem(400, "batchInvalid");
    // Malformed body, wrong media type.
    send(Method::PUT, job_url(id), ct, Some(&token), vec![9])
        .await
        .assert_problem(400, "invalidMessage");
    send(
        Method::PUT,
        job_url(id),
        Some("text/plain"),
        Some(&token),
        req(hour, 3600),
    )
    .await
    .assert_problem(400, "invalidMessage");
    // Unknown job: 404.
    assert_eq!(
        send(Method::POST, job_url(id), None, Some(&token), Vec::new())
            .await
            .status,
        404
    );

    // A valid job: 201; an identical PUT again: 201; a different one under the same ID: refused.
    assert_eq!(
        send(Method::PUT, job_url(id), ct, Some(&token), req(hour, 3600))
            .await
            .status,
        201
    );
    assert_eq!(
        send(Method::PUT, job_url(id), ct, Some(&token), req(hour, 3600))
            .await
            .status,
        201
    );
    send(Method::PUT, job_url(id), ct, Some(&token), req(hour, 7200))
        .await
        .assert_problem(400, "invalidMessage");
    // Overlapping another batch; the same batch again, with the same (Prio3's empty) aggregation
    // parameter: one query of the batch, whatever the number of jobs (max_batch_query_count = 1
    // counts distinct parameters).
    let other = CollectionJobId::random();
    send(
        Method::PUT,
        job_url(other),
        ct,
        Some(&token),
        req(hour, 7200),
    )
    .await
    .assert_problem(400, "batchOverlap");
    assert_eq!(
        send(
            Method::PUT,
            job_url(other),
            ct,
            Some(&token),
            req(hour, 3600),
        )
        .await
        .status,
        201
    );

    // Too few reports: the job stays pending.
    let client = common::client(&task).await;
    client
        .upload(&Measurement::Count(true))
        .await
        .expect("upload");
    for _ in 0..5 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(
            send(Method::POST, job_url(id), None, Some(&token), Vec::new())
                .await
                .status,
            202
        );
    }
    // Deleted: 204 on DELETE, then 204 on poll.
    assert_eq!(
        send(Method::DELETE, job_url(id), None, Some(&token), Vec::new())
            .await
            .status,
        204
    );
    assert_eq!(
        send(Method::POST, job_url(id), None, Some(&token), Vec::new())
            .await
            .status,
        204
    );
    // The same request again under the deleted job's ID is refused (it would not run), and a
    // new job for the batch is created.
    send(Method::PUT, job_url(id), ct, Some(&token), req(hour, 3600))
        .await
        .assert_problem(400, "invalidMessage");
    assert_eq!(
        send(
            Method::PUT,
            job_url(CollectionJobId::random()),
            ct,
            Some(&token),
            req(hour, 3600),
        )
        .await
        .status,
        201
    );
    h.stop().await;
}

/// A batch collected under a job the collector has deleted since still bars overlapping
/// batches: a job for one is refused when it is created, not when the Helper refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_collection_still_bars_overlapping_batches() {
    let h = Harness::start().await;
    let (task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    let client = common::client(&task).await;
    // The report in the hour collected, even if the clock turns the hour meanwhile.
    let hour = RealClock.now().round_down(Duration(3600)).0;
    client
        .upload_at(&Measurement::Count(true), Some(Time(hour)))
        .await
        .expect("upload");
    let token = task.collector_auth_token.clone().expect("token");
    let job_url = |id: CollectionJobId| job_url(&task, id);
    let ct = Some(media_type::COLLECTION_REQ);
    let collected = CollectionJobId::random();
    let created = send(
        Method::PUT,
        job_url(collected),
        ct,
        Some(&token),
        req(hour, 3600),
    )
    .await;
    assert_eq!(created.status, 201);
    let mut finished = false;
    for _ in 0..300 {
        let polled = send(
            Method::POST,
            job_url(collected),
            None,
            Some(&token),
            Vec::new(),
        )
        .await;
        if polled.status == 200 {
            finished = true;
            break;
        }
        assert_eq!(polled.status, 202);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(finished, "the collection did not finish in 30 s");
    let deleted = send(
        Method::DELETE,
        job_url(collected),
        None,
        Some(&token),
        Vec::new(),
    )
    .await;
    assert_eq!(deleted.status, 204);
    send(
        Method::PUT,
        job_url(CollectionJobId::random()),
        ct,
        Some(&token),
        req(hour - 3600, 7200),
    )
    .await
    .assert_problem(400, "batchOverlap");
    h.stop().await;
}

/// A collection job the Helper refuses for a batch problem fails with that problem: here the
/// Helper's copy of the task wants more reports than the Leader's, so the Leader finds the batch
/// large enough and the Helper answers `invalidBatchSize`; the collector's polls get that
/// problem, but not the Helper's detail, which counts the reports of a batch too small to
/// collect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_helper_refuses_fails_with_its_problem() {
    let h = Harness::start().await;
    let (task, _) = h
        .leader_task(VdafInstance::Prio3Count, 1, &h.helper_url)
        .await;
    h.helper_task_with(&task, |t| t.min_batch_size = 100).await;
    let client = common::client(&task).await;
    for m in [true, false] {
        client.upload(&Measurement::Count(m)).await.expect("upload");
    }
    let token = task.collector_auth_token.clone().expect("token");
    let url = job_url(&task, CollectionJobId::random());
    let hour = RealClock.now().round_down(Duration(3600)).0;
    let created = send(
        Method::PUT,
        url.clone(),
        Some(media_type::COLLECTION_REQ),
        Some(&token),
        req(hour - 3600, 7200),
    )
    .await;
    assert_eq!(created.status, 201);
    for _ in 0..300 {
        let polled = send(Method::POST, url.clone(), None, Some(&token), Vec::new()).await;
        if polled.status != 202 {
            polled.assert_problem(400, "invalidBatchSize");
            // Without the Helper's words, which count the batch's reports.
            let body = String::from_utf8_lossy(&polled.body).into_owned();
            assert!(!body.contains("the batch has"), "{body}");
            h.stop().await;
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the collection job neither failed nor finished in 30 s");
}

/// Of two overlapping collection jobs created at once, one is created and the other is
/// `batchOverlap`, however the two requests interleave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_jobs_created_at_once() {
    let h = Harness::start().await;
    let (task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    let token = task.collector_auth_token.clone().expect("token");
    let hour = RealClock.now().round_down(Duration(3600)).0;
    let put = |start: u64, duration: u64| {
        let url = job_url(&task, CollectionJobId::random());
        send(
            Method::PUT,
            url,
            Some(media_type::COLLECTION_REQ),
            Some(&token),
            req(start, duration),
        )
    };
    for round in 0..5 {
        let start = hour - (10 + 4 * round) * 3600;
        let (a, b) = tokio::join!(put(start, 3600), put(start, 7200));
        let mut statuses = [a.status, b.status];
        statuses.sort_unstable();
        assert_eq!(statuses, [201, 400]);
        let refused = if a.status == 400 { a } else { b };
        refused.assert_problem(400, "batchOverlap");
    }
    h.stop().await;
}

/// A collection whose stored aggregate no longer decodes is abandoned with the reason, rather
/// than retried for ever or handed to the collector: here the batch's one bucket, whose share
/// the store's sum passes through as it is, holds a byte where the Leader's share was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_of_unusable_aggregates_is_abandoned() {
    let h = Harness::start().await;
    let (task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    let token = task.collector_auth_token.clone().expect("token");
    let hour = RealClock.now().round_down(Duration(3600)).0;
    let batch = Interval {
        start: Time(hour),
        duration: Duration(3600),
    };
    common::client(&task)
        .await
        .upload_at(&Measurement::Count(true), Some(Time(hour)))
        .await
        .expect("upload");
    let mut aggregated = false;
    for _ in 0..200 {
        let rows = h
            .leader_store
            .get_batch_aggregations(&task.id, &batch, &[])
            .await
            .expect("read");
        if rows.iter().map(|r| r.report_count).sum::<u64>() == 1 {
            aggregated = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(aggregated, "the report was not aggregated");
    let mut db = h.sqlite().await;
    let damaged = sqlx::query(
        "UPDATE batch_aggregations SET aggregate_share = x'01' \
         WHERE role = 'leader' AND task_id = ?",
    )
    .bind(&task.id.0[..])
    .execute(&mut db)
    .await
    .expect("damage")
    .rows_affected();
    assert_eq!(damaged, 1);
    sqlx::Connection::close(db).await.expect("close");

    let id = CollectionJobId::random();
    let url = job_url(&task, id);
    let ct = Some(media_type::COLLECTION_REQ);
    let created = send(Method::PUT, url.clone(), ct, Some(&token), req(hour, 3600)).await;
    assert_eq!(created.status, 201);
    let mut polled = None;
    for _ in 0..200 {
        let answer = send(Method::POST, url.clone(), None, Some(&token), Vec::new()).await;
        if answer.status != 202 {
            polled = Some(answer);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let polled = polled.expect("the collection job stayed pending");
    assert_eq!(polled.status, 500);
    match h
        .leader_store
        .get_collection_job(&task.id, &id)
        .await
        .expect("read")
        .expect("the job")
        .state
    {
        duet_store::CollectionJobState::Abandoned(reason) => {
            assert!(
                reason.contains("stored aggregates are unusable"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    h.stop().await;
}
