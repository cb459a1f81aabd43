//! The limits a public endpoint needs, on real connections: a request's head and body must arrive
//! in time, connections beyond the limit wait for a free one, and an upload's body is read only
//! for a task the Leader has and only up to what a report of that task can be.

mod common;

use std::time::Duration;

use common::Harness;
use duet_aggregator::AggregatorConfig;
use duet_core::VdafInstance;
use duet_messages::dap09::{media_type, TaskId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything the server sends on `conn` until it closes it; fails if that takes over `within`.
async fn read_until_closed(conn: &mut TcpStream, within: Duration) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(within, conn.read_to_end(&mut got))
        .await
        .expect("the server closed the connection in time")
        .expect("read");
    String::from_utf8_lossy(&got).into_owned()
}

async fn connect(url: &url::Url) -> TcpStream {
    let addr = format!(
        "{}:{}",
        url.host_str().expect("host"),
        url.port().expect("port")
    );
    TcpStream::connect(addr).await.expect("connect")
}

/// A connection that sends nothing, one that sends half a head, and one whose body stops
/// coming are each closed once their time is up.
#[tokio::test]
async fn heads_and_bodies_must_arrive_in_time() {
    let h = Harness::start_with(AggregatorConfig {
        http_header_timeout_ms: 300,
        http_body_timeout_ms: 300,
        ..AggregatorConfig::default()
    })
    .await;
    let mut silent = connect(&h.leader_url).await;
    read_until_closed(&mut silent, Duration::from_secs(10)).await;

    let mut slow = connect(&h.leader_url).await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    read_until_closed(&mut slow, Duration::from_secs(10)).await;

    // A collector's request (its body is read only once the task and token are checked).
    let (task, _) = h.task(VdafInstance::Prio3Count, 1).await;
    let (name, value) = task
        .collector_auth_token
        .as_ref()
        .expect("collector token")
        .request_header();
    let path = format!(
        "{}tasks/{}/collection_jobs/AAAAAAAAAAAAAAAAAAAAAA",
        h.leader_url.path(),
        task.id
    );
    let mut stalled = connect(&h.leader_url).await;
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: x\r\n{name}: {value}\r\ncontent-type: {}\r\n\
         content-length: 100\r\n\r\n0123",
        media_type::COLLECTION_REQ
    );
    stalled.write_all(head.as_bytes()).await.expect("write");
    let answer = read_until_closed(&mut stalled, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    h.stop().await;
}

/// With every connection slot taken, the next connection waits until one is free.
#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let h = Harness::start_with(AggregatorConfig {
        max_connections: 2,
        ..AggregatorConfig::default()
    })
    .await;
    let health = h.leader_url.join("/healthz").expect("url");
    let get = || async {
        reqwest::Client::new()
            .get(health.clone())
            .timeout(Duration::from_millis(500))
            .send()
            .await
    };
    assert!(get().await.is_ok(), "a free slot answers at once");
    let first = connect(&h.leader_url).await;
    let _second = connect(&h.leader_url).await;
    // Both slots are taken once the server has accepted both.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(get().await.is_err(), "no slot is free");
    drop(first);
    let mut answered = false;
    for _ in 0..20 {
        if get().await.is_ok() {
            answered = true;
            break;
        }
    }
    assert!(answered, "a freed slot takes the next connection");
    h.stop().await;
}

/// An upload's body is not read for a task the Leader does not have, nor beyond what a report
/// of its task can be: the answer comes before the body is sent.
#[tokio::test]
async fn uploads_are_refused_before_their_bodies_when_they_cannot_be_reports() {
    let h = Harness::start().await;
    let (task, _) = h
        .task_via(VdafInstance::Prio3Count, 1, &h.helper_url.clone())
        .await;
    let put_head = |task_id: TaskId, length: usize| {
        format!(
            "PUT {}tasks/{task_id}/reports HTTP/1.1\r\nHost: x\r\ncontent-type: {}\r\n\
             content-length: {length}\r\n\r\n",
            h.leader_url.path(),
            media_type::REPORT
        )
    };
    let answer = |head: String| {
        let url = h.leader_url.clone();
        async move {
            let mut conn = connect(&url).await;
            conn.write_all(head.as_bytes()).await.expect("write");
            let mut got = vec![0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut got))
                .await
                .expect("answered without the body")
                .expect("read");
            String::from_utf8_lossy(&got[..n]).into_owned()
        }
    };
    let unknown = answer(put_head(TaskId::random(), 10 << 20)).await;
    assert!(unknown.starts_with("HTTP/1.1 400"), "{unknown}");
    assert!(unknown.contains("unrecognizedTask"), "{unknown}");
    // A megabyte: far more than any Prio3Count report.
    let long = answer(put_head(task.id, 1 << 20)).await;
    assert!(long.starts_with("HTTP/1.1 413"), "{long}");
    h.stop().await;
}

/// A burst of more new connections than the standard library's listen queue of 128 is queued
/// by the kernel, not dropped: every client's connect completes at once, none waits a second for
/// its SYN to be resent, while the server has not accepted any yet.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_burst_of_new_connections_is_queued_not_dropped() {
    const BURST: usize = 300;
    // The kernel caps the queue at `net.core.somaxconn`; below the burst nothing can show.
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok());
    if somaxconn.is_none_or(|n| n < BURST) {
        eprintln!("skipped: net.core.somaxconn is {somaxconn:?}, not at least {BURST}");
        return;
    }
    let listener = duet_aggregator::server::listen("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("address");
    let mut connects = tokio::task::JoinSet::new();
    for _ in 0..BURST {
        connects.spawn(tokio::time::timeout(
            Duration::from_millis(700),
            TcpStream::connect(addr),
        ));
    }
    let (mut streams, mut timed_out, mut failed) = (Vec::new(), 0, Vec::new());
    while let Some(outcome) = connects.join_next().await {
        match outcome.expect("connect task") {
            Ok(Ok(stream)) => streams.push(stream),
            Ok(Err(e)) => failed.push(e.to_string()),
            Err(_) => timed_out += 1,
        }
    }
    assert!(
        streams.len() == BURST,
        "of {BURST} connects, {timed_out} waited past 700 ms (a SYN dropped) and {} failed: \
         {failed:?}",
        failed.len()
    );
    drop(streams);
    drop(listener);
}
