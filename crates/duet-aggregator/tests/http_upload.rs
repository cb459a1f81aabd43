//! `PUT /tasks/{task}/reports` and `GET /hpke_config` on the Leader.

mod common;

use common::{send, Harness};
use duet_core::{Measurement, VdafInstance};
use duet_messages::dap09::{media_type, HpkeConfigId, HpkeConfigList, Report, Time};
use duet_messages::{Decode, Encode};
use reqwest::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_validation() {
    let h = Harness::start().await;
    let (task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    let client = common::client(&task).await;
    let url = task
        .leader_endpoint
        .join(&format!("tasks/{}/reports", task.id))
        .expect("url");
    let good = client
        .prepare_report(&Measurement::Count(true))
        .expect("report");

    // A good report: 201, and again (a replay is accepted, and counted once).
    for _ in 0..2 {
        let r = send(
            Method::PUT,
            url.clone(),
            Some(media_type::REPORT),
            None,
            good.get_encoded(),
        )
        .await;
        assert_eq!(r.status, 201);
    }
    // Wrong media type.
    send(
        Method::PUT,
        url.clone(),
        Some("application/octet-stream"),
        None,
        good.get_encoded(),
    )
    .await
    .assert_problem(400, "invalidMessage");
    // Garbage, truncated and padded bodies.
    let bytes = good.get_encoded();
    for body in [
        vec![1, 2, 3],
        bytes[..bytes.len() - 1].to_vec(),
        [bytes.clone(), vec![0]].concat(),
        Vec::new(),
    ] {
        send(
            Method::PUT,
            url.clone(),
            Some(media_type::REPORT),
            None,
            body,
        )
        .await
        .assert_problem(400, "invalidMessage");
    }
    // Unknown task, and a malformed task ID.
    let other = task
        .leader_endpoint
        .join(&format!(
            "tasks/{}/reports",
            duet_messages::dap09::TaskId::random()
        ))
        .expect("url");
    send(
        Method::PUT,
        other.clone(),
        Some(media_type::REPORT),
        None,
        bytes.clone(),
    )
    .await
    .assert_problem(400, "unrecognizedTask");
    // The task is checked before the media type (DAP-09 §4.4.2).
    send(
        Method::PUT,
        other,
        Some(media_type::COLLECTION_REQ),
        None,
        bytes.clone(),
    )
    .await
    .assert_problem(400, "unrecognizedTask");
    // A path segment that is not a task ID, and one whose escapes are not even UTF-8: each a
    // problem document.
    for segment in ["not-a-task-id", "%FF%FE"] {
        let bad = task
            .leader_endpoint
            .join(&format!("tasks/{segment}/reports"))
            .expect("url");
        send(
            Method::PUT,
            bad,
            Some(media_type::REPORT),
            None,
            bytes.clone(),
        )
        .await
        .assert_problem(400, "invalidMessage");
    }
    // An HPKE config the Leader doesn't have.
    let mut stale = client
        .prepare_report(&Measurement::Count(false))
        .expect("report");
    stale.leader_encrypted_input_share.config_id = HpkeConfigId(
        stale
            .leader_encrypted_input_share
            .config_id
            .0
            .wrapping_add(1),
    );
    send(
        Method::PUT,
        url.clone(),
        Some(media_type::REPORT),
        None,
        stale.get_encoded(),
    )
    .await
    .assert_problem(400, "outdatedConfig");
    // A report from the future.
    let future = client
        .prepare_report_at(&Measurement::Count(true), Time(u64::MAX / 2))
        .expect("report");
    send(
        Method::PUT,
        url.clone(),
        Some(media_type::REPORT),
        None,
        future.get_encoded(),
    )
    .await
    .assert_problem(400, "reportTooEarly");
    // Wrong method.
    assert_eq!(
        send(Method::POST, url, Some(media_type::REPORT), None, bytes)
            .await
            .status,
        405
    );

    // A timestamp past 2^63 seconds is too early whatever the task's clock skew, even one that
    // would allow it: no store keeps it, and its write batch would fail with the uploads in it.
    let mut lenient = task.clone();
    lenient.id = duet_messages::dap09::TaskId::random();
    lenient.tolerable_clock_skew = duet_messages::dap09::Duration(i64::MAX as u64);
    h.leader_store.put_task(&lenient).await.expect("task");
    let mut helper_copy = lenient.clone();
    helper_copy.collector_auth_token = None;
    h.helper_store.put_task(&helper_copy).await.expect("task");
    let client = common::client(&lenient).await;
    let beyond = client
        .prepare_report_at(&Measurement::Count(true), Time((1 << 63) + 3600))
        .expect("report");
    let url = lenient
        .leader_endpoint
        .join(&format!("tasks/{}/reports", lenient.id))
        .expect("url");
    send(
        Method::PUT,
        url,
        Some(media_type::REPORT),
        None,
        beyond.get_encoded(),
    )
    .await
    .assert_problem(400, "reportTooEarly");
    h.stop().await;
}

/// A report's parts must have the sizes its task's VDAF makes: the public share and the Leader's
/// sealed share exactly, the Helper's sealed share up to a full extension list more. Anything
/// else is refused at upload, before it is stored and sent on in a job with other reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_sizes_follow_the_vdaf() {
    let h = Harness::start().await;
    let vdaf = VdafInstance::Prio3Histogram {
        length: 4,
        chunk_length: 2,
    };
    let (task, _) = h.task(vdaf, 1).await;
    let client = common::client(&task).await;
    let url = task
        .leader_endpoint
        .join(&format!("tasks/{}/reports", task.id))
        .expect("url");
    let put = |report: Report| {
        let url = url.clone();
        async move {
            send(
                Method::PUT,
                url,
                Some(media_type::REPORT),
                None,
                report.get_encoded(),
            )
            .await
        }
    };
    let report = || {
        client
            .prepare_report(&Measurement::Histogram(1))
            .expect("report")
    };
    assert!(!report().public_share.is_empty());

    let mut longer_public = report();
    longer_public.public_share.push(0);
    let mut shorter_public = report();
    shorter_public.public_share.pop();
    let mut longer_leader = report();
    longer_leader.leader_encrypted_input_share.payload.push(0);
    let mut shorter_leader = report();
    shorter_leader.leader_encrypted_input_share.payload.pop();
    let mut shorter_helper = report();
    shorter_helper.helper_encrypted_input_share.payload.pop();
    let mut swollen_helper = report();
    swollen_helper
        .helper_encrypted_input_share
        .payload
        .extend(vec![0; usize::from(u16::MAX) + 1]);
    let mut huge_helper = report();
    huge_helper
        .helper_encrypted_input_share
        .payload
        .extend(vec![0; 8 << 20]);
    let mut long_key = report();
    long_key.helper_encrypted_input_share.encapsulated_key = vec![1; 134];
    for (what, bad) in [
        ("public share one byte long", longer_public),
        ("public share one byte short", shorter_public),
        ("Leader's share one byte long", longer_leader),
        ("Leader's share one byte short", shorter_leader),
        ("Helper's share one byte short", shorter_helper),
        (
            "Helper's share a byte past a full extension list",
            swollen_helper,
        ),
        ("encapsulated key of 134 bytes", long_key),
    ] {
        let r = put(bad).await;
        let detail = String::from_utf8_lossy(&r.body).into_owned();
        assert!(detail.contains(" bytes"), "{what}: {detail}");
        r.assert_problem(400, "invalidMessage");
    }

    // Longer than any report of the task can be: refused as too large before it is read. The
    // answer and the connection's close may reach the client while it still sends the body,
    // which it then reports as a failed request instead.
    let sent = reqwest::Client::new()
        .put(url.clone())
        .header("content-type", media_type::REPORT)
        .body(huge_helper.get_encoded())
        .send()
        .await;
    if let Ok(r) = sent {
        assert_eq!(r.status(), 413);
    }

    // Within the bounds: the report as made, and the Helper's share with a full extension list.
    let mut with_extensions = report();
    with_extensions
        .helper_encrypted_input_share
        .payload
        .extend(vec![0; usize::from(u16::MAX)]);
    for good in [report(), with_extensions] {
        assert_eq!(put(good).await.status, 201);
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpke_config_lists_the_keys() {
    let h = Harness::start().await;
    for base in [&h.leader_url, &h.helper_url] {
        let r = send(
            Method::GET,
            base.join("hpke_config").expect("url"),
            None,
            None,
            Vec::new(),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, media_type::HPKE_CONFIG_LIST);
        let list = HpkeConfigList::get_decoded(&r.body).expect("decode");
        assert_eq!(list.0.len(), 1);
    }
    // Leader and Helper keep separate keys even over one database.
    let l = send(
        Method::GET,
        h.leader_url.join("hpke_config").expect("url"),
        None,
        None,
        Vec::new(),
    )
    .await;
    let hp = send(
        Method::GET,
        h.helper_url.join("hpke_config").expect("url"),
        None,
        None,
        Vec::new(),
    )
    .await;
    assert_ne!(l.body, hp.body);

    // A client may name its task: known, the same list; unknown, `unrecognizedTask`.
    let (task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    for (base, list) in [(&h.leader_url, &l.body), (&h.helper_url, &hp.body)] {
        let get = |query: String| {
            let url = base.join(&format!("hpke_config?{query}")).expect("url");
            async move { send(Method::GET, url, None, None, Vec::new()).await }
        };
        let known = get(format!("task_id={}", task.id)).await;
        assert_eq!((known.status, &known.body), (200, list));
        get(format!(
            "task_id={}",
            duet_messages::dap09::TaskId::random()
        ))
        .await
        .assert_problem(400, "unrecognizedTask");
        get("task_id=not-a-task-id".into())
            .await
            .assert_problem(400, "invalidMessage");
        assert_eq!(get("other=1".into()).await.status, 200);
    }
    h.stop().await;
}
