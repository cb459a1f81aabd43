use super::*;
use duet_core::hpke::{seal, HpkeApplicationInfo};
use duet_core::Measurement;
use duet_messages::dap09::{
    AggregateShareAad, BatchSelector, Duration, FixedSizeQuery, HpkeConfigId, PartialBatchSelector,
    ReportId, Role, Time,
};

const TASK: TaskId = TaskId([4; 32]);

fn interval(start: u64, duration: u64) -> Interval {
    Interval::new(Time(start), Duration(duration)).expect("interval")
}

/// Runs the aggregators' side in memory: shard, prepare, accumulate, and return the encoded
/// Leader and Helper aggregate shares.
fn aggregate_shares(vdaf: &Vdaf, measurements: &[Measurement]) -> (Vec<u8>, Vec<u8>) {
    let vk = [5u8; 16];
    let mut leader = vdaf.empty_aggregate().expect("empty");
    let mut helper = vdaf.empty_aggregate().expect("empty");
    for m in measurements {
        let id = ReportId::random();
        let (public, l, h) = vdaf.shard(m, &id).expect("shard");
        let (state, msg) = vdaf
            .leader_init(&vk, &id, &public, &l)
            .expect("leader init");
        let (helper_out, reply) = vdaf
            .helper_init(&vk, &id, &public, &h, &msg)
            .expect("helper init");
        let leader_out = vdaf
            .leader_continued(state, &reply)
            .expect("leader continued");
        vdaf.accumulate(&mut leader, &leader_out)
            .expect("accumulate");
        vdaf.accumulate(&mut helper, &helper_out)
            .expect("accumulate");
    }
    (
        vdaf.encode_aggregate(&leader).expect("encode"),
        vdaf.encode_aggregate(&helper).expect("encode"),
    )
}

/// Seals both shares to the collector as the aggregators would, bound to `sealed_for`.
fn collection(
    keypair: &HpkeKeypair,
    shares: &(Vec<u8>, Vec<u8>),
    sealed_for: BatchSelector,
    partial_batch_selector: PartialBatchSelector,
    report_count: u64,
) -> Collection {
    let aad = AggregateShareAad {
        task_id: TASK,
        aggregation_parameter: vec![],
        batch_selector: sealed_for,
    }
    .get_encoded();
    let seal_as = |server, share: &[u8]| {
        seal(
            &keypair.config,
            &HpkeApplicationInfo::AggregateShare { server },
            share,
            &aad,
        )
        .expect("seal")
    };
    Collection {
        partial_batch_selector,
        report_count,
        interval: interval(3600, 3600),
        leader_encrypted_agg_share: seal_as(Role::Leader, &shares.0),
        helper_encrypted_agg_share: seal_as(Role::Helper, &shares.1),
    }
}

fn check_time_interval(instance: VdafInstance, measurements: &[Measurement]) {
    let vdaf = instance.instantiate().expect("vdaf");
    let keypair = HpkeKeypair::generate(HpkeConfigId(3));
    let shares = aggregate_shares(&vdaf, measurements);
    let queried = interval(0, 7200);
    let query = Query::TimeInterval {
        batch_interval: queried,
    };
    let n = measurements.len() as u64;
    let c = collection(
        &keypair,
        &shares,
        BatchSelector::TimeInterval {
            batch_interval: queried,
        },
        PartialBatchSelector::TimeInterval,
        n,
    );
    let result = decrypt_collection(&TASK, &keypair, &vdaf, &query, &c).expect("decrypt");
    assert_eq!(
        result,
        CollectionResult {
            report_count: n,
            // The Collection's (narrower) interval is reported; the queried one is only the AAD.
            interval: interval(3600, 3600),
            batch_id: None,
            aggregate: instance.plaintext_aggregate(measurements).expect("plain"),
        }
    );
}

#[test]
fn time_interval_collections_decrypt_and_unshard() {
    check_time_interval(
        VdafInstance::Prio3Count,
        &[
            Measurement::Count(true),
            Measurement::Count(false),
            Measurement::Count(true),
        ],
    );
    check_time_interval(
        VdafInstance::Prio3Sum { bits: 16 },
        &[Measurement::Sum(1000), Measurement::Sum(65535)],
    );
    check_time_interval(
        VdafInstance::Prio3Histogram {
            length: 4,
            chunk_length: 2,
        },
        &[
            Measurement::Histogram(0),
            Measurement::Histogram(3),
            Measurement::Histogram(3),
        ],
    );
    check_time_interval(
        VdafInstance::Prio3SumVec {
            bits: 4,
            length: 3,
            chunk_length: 2,
        },
        &[
            Measurement::SumVec(vec![1, 2, 3]),
            Measurement::SumVec(vec![15, 0, 1]),
        ],
    );
}

#[test]
fn fixed_size_collections_bind_the_leaders_batch_id() {
    let vdaf = VdafInstance::Prio3Count.instantiate().expect("vdaf");
    let keypair = HpkeKeypair::generate(HpkeConfigId(1));
    let shares = aggregate_shares(&vdaf, &[Measurement::Count(true), Measurement::Count(true)]);
    let batch_id = BatchId([7; 32]);
    let query = Query::FixedSize {
        fixed_size_query: FixedSizeQuery::CurrentBatch,
    };
    let c = collection(
        &keypair,
        &shares,
        BatchSelector::FixedSize { batch_id },
        PartialBatchSelector::FixedSize(batch_id),
        2,
    );
    let result = decrypt_collection(&TASK, &keypair, &vdaf, &query, &c).expect("decrypt");
    assert_eq!(result.aggregate, AggregateResult::Number(2));
    assert_eq!(result.batch_id, Some(batch_id));

    // Shares sealed for another batch do not open.
    let other = collection(
        &keypair,
        &shares,
        BatchSelector::FixedSize {
            batch_id: BatchId([8; 32]),
        },
        PartialBatchSelector::FixedSize(batch_id),
        2,
    );
    let e = decrypt_collection(&TASK, &keypair, &vdaf, &query, &other).expect_err("wrong batch");
    assert!(matches!(e, CollectorError::Hpke(_)), "{e}");

    // A batch asked for by its ID: that batch's collection opens, another's is refused, however
    // well its shares are sealed for it.
    let by_id = |id: BatchId| Query::FixedSize {
        fixed_size_query: FixedSizeQuery::ByBatchId { batch_id: id },
    };
    decrypt_collection(&TASK, &keypair, &vdaf, &by_id(batch_id), &c).expect("the batch asked for");
    let e = decrypt_collection(&TASK, &keypair, &vdaf, &by_id(BatchId([9; 32])), &c)
        .expect_err("another batch");
    assert!(matches!(e, CollectorError::InvalidCollection(_)), "{e}");
}

#[test]
fn decryption_is_bound_to_task_batch_role_and_key() {
    let vdaf = VdafInstance::Prio3Count.instantiate().expect("vdaf");
    let keypair = HpkeKeypair::generate(HpkeConfigId(1));
    let shares = aggregate_shares(&vdaf, &[Measurement::Count(true)]);
    // The interval the sealed collections span.
    let queried = interval(3600, 3600);
    let query = Query::TimeInterval {
        batch_interval: queried,
    };
    let good = collection(
        &keypair,
        &shares,
        BatchSelector::TimeInterval {
            batch_interval: queried,
        },
        PartialBatchSelector::TimeInterval,
        1,
    );
    assert!(decrypt_collection(&TASK, &keypair, &vdaf, &query, &good).is_ok());

    // Another task.
    let e = decrypt_collection(&TaskId([0; 32]), &keypair, &vdaf, &query, &good).expect_err("task");
    assert!(
        e.to_string()
            .starts_with("HPKE error: could not decrypt the Leader's aggregate share"),
        "{e}"
    );
    // Another queried interval (one that still holds the collection's).
    let shifted = Query::TimeInterval {
        batch_interval: interval(0, 7200),
    };
    let e = decrypt_collection(&TASK, &keypair, &vdaf, &shifted, &good).expect_err("interval");
    assert!(matches!(e, CollectorError::Hpke(_)), "{e}");
    // Leader and Helper shares swapped: the info strings differ.
    let mut swapped = good.clone();
    std::mem::swap(
        &mut swapped.leader_encrypted_agg_share,
        &mut swapped.helper_encrypted_agg_share,
    );
    assert!(decrypt_collection(&TASK, &keypair, &vdaf, &query, &swapped).is_err());
    // Another key: the error hints at the config ID.
    let stranger = HpkeKeypair::generate(HpkeConfigId(2));
    let e = decrypt_collection(&TASK, &stranger, &vdaf, &query, &good).expect_err("key");
    assert!(
        e.to_string()
            .contains("it names HPKE config 1, the collector's is 2"),
        "{e}"
    );
    // A fixed_size answer to a time_interval query.
    let mut mixed = good.clone();
    mixed.partial_batch_selector = PartialBatchSelector::FixedSize(BatchId([0; 32]));
    let e = decrypt_collection(&TASK, &keypair, &vdaf, &query, &mixed).expect_err("mixed");
    assert!(matches!(e, CollectorError::InvalidCollection(_)), "{e}");
    // Shares of another VDAF do not unshard.
    let sum = VdafInstance::Prio3Sum { bits: 8 }
        .instantiate()
        .expect("vdaf");
    let e = decrypt_collection(&TASK, &keypair, &sum, &query, &good).expect_err("vdaf");
    assert!(matches!(e, CollectorError::Vdaf(_)), "{e}");
}

#[test]
fn retry_after_seconds_are_read() {
    let mut headers = reqwest::header::HeaderMap::new();
    assert_eq!(retry_after(&headers), None);
    headers.insert(
        reqwest::header::RETRY_AFTER,
        reqwest::header::HeaderValue::from_static(" 3 "),
    );
    assert_eq!(
        retry_after(&headers),
        Some(std::time::Duration::from_secs(3))
    );
    headers.insert(
        reqwest::header::RETRY_AFTER,
        reqwest::header::HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
    );
    assert_eq!(retry_after(&headers), None);
}

#[test]
fn collector_checks_its_parameters() {
    let params = |keypair: HpkeKeypair| CollectorParameters {
        task_id: TASK,
        leader_endpoint: "http://leader.test/dap".parse().expect("url"),
        auth_token: AuthenticationToken::Bearer("t".into()),
        hpke_keypair: keypair,
    };
    let c = Collector::new(
        params(HpkeKeypair::generate(HpkeConfigId(1))),
        VdafInstance::Prio3Count,
        reqwest::Client::new(),
    )
    .expect("collector");
    assert_eq!(
        c.parameters().leader_endpoint.as_str(),
        "http://leader.test/dap/"
    );
    let job = CollectionJobId([0; 16]);
    assert_eq!(
        c.job_url(&job).expect("url").as_str(),
        format!("http://leader.test/dap/tasks/{TASK}/collection_jobs/{job}")
    );

    let bad_vdaf = VdafInstance::Prio3Sum { bits: 0 };
    let e = Collector::new(
        params(HpkeKeypair::generate(HpkeConfigId(1))),
        bad_vdaf,
        reqwest::Client::new(),
    );
    assert!(matches!(e, Err(CollectorError::Vdaf(_))));

    let mut odd = HpkeKeypair::generate(HpkeConfigId(1));
    odd.config.kdf_id = duet_messages::dap09::HpkeKdfId::HKDF_SHA512;
    let e = Collector::new(
        params(odd),
        VdafInstance::Prio3Count,
        reqwest::Client::new(),
    );
    assert!(matches!(e, Err(CollectorError::Hpke(_))));

    fn send_sync<T: Send + Sync>() {}
    send_sync::<Collector>();
}

fn collector_at(leader_endpoint: url::Url) -> Collector {
    let params = CollectorParameters {
        task_id: TASK,
        leader_endpoint,
        auth_token: AuthenticationToken::DapAuth("t".into()),
        hpke_keypair: HpkeKeypair::generate(HpkeConfigId(1)),
    };
    Collector::new(params, VdafInstance::Prio3Count, reqwest::Client::new()).expect("collector")
}

#[tokio::test]
async fn a_refusing_leader_is_named_in_the_error() {
    // A port that was just free: connecting to it is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let c = collector_at(format!("http://127.0.0.1:{port}/").parse().expect("url"));
    let query = Query::TimeInterval {
        batch_interval: interval(0, 3600),
    };
    let e = c
        .collect(query, std::time::Duration::from_secs(10))
        .await
        .expect_err("must fail");
    assert!(matches!(e, CollectorError::Http { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.starts_with(&format!(
            "could not create a collection job at the Leader at http://127.0.0.1:{port}/"
        )),
        "{text}"
    );
}

#[tokio::test]
async fn a_silent_leader_times_out() {
    // The kernel accepts the connection but nobody ever answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let c = collector_at(format!("http://127.0.0.1:{port}/").parse().expect("url"));
    let query = Query::TimeInterval {
        batch_interval: interval(0, 3600),
    };
    let timeout = std::time::Duration::from_millis(200);
    let e = c.collect(query, timeout).await.expect_err("must time out");
    assert!(
        matches!(e, CollectorError::Timeout { job: None, .. }),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "could not start a collection job within 200ms"
    );
    let job = CollectionJobId([1; 16]);
    let e = c
        .poll_until_ready(&job, &query, timeout)
        .await
        .expect_err("must time out");
    assert_eq!(
        e.to_string(),
        format!("collection job {job} was not ready after 200ms")
    );
    drop(listener);
}

/// A pending job is polled again after the Leader's `Retry-After`, never sooner than the
/// collector's own backoff: `Retry-After: 0` does not make it poll in a tight loop.
#[test]
fn polls_wait_at_least_the_backoff() {
    let s = std::time::Duration::from_secs;
    let backoff = std::time::Duration::from_millis(400);
    assert_eq!(poll_wait(None, backoff), backoff);
    assert_eq!(poll_wait(Some(s(0)), backoff), backoff);
    assert_eq!(poll_wait(Some(s(3)), backoff), s(3));
}

/// A Collection is only taken for the batch asked for: one counting no report, or spanning
/// time outside the queried interval, is refused.
#[test]
fn collections_about_another_batch_are_refused() {
    let instance = VdafInstance::Prio3Count;
    let vdaf = instance.instantiate().expect("vdaf");
    let keypair = HpkeKeypair::generate(HpkeConfigId(3));
    let shares = aggregate_shares(&vdaf, &[Measurement::Count(true)]);
    let queried = interval(0, 7200);
    let query = Query::TimeInterval {
        batch_interval: queried,
    };
    let sealed = |report_count| {
        collection(
            &keypair,
            &shares,
            BatchSelector::TimeInterval {
                batch_interval: queried,
            },
            PartialBatchSelector::TimeInterval,
            report_count,
        )
    };
    let mut outside = sealed(1);
    outside.interval = interval(3600, 7200);
    for bad in [sealed(0), outside] {
        assert!(matches!(
            decrypt_collection(&TASK, &keypair, &vdaf, &query, &bad),
            Err(CollectorError::InvalidCollection(_))
        ));
    }
    assert!(decrypt_collection(&TASK, &keypair, &vdaf, &query, &sealed(1)).is_ok());
}

/// A Leader's answer to a poll is read only up to the longest Collection the task's VDAF
/// allows: a longer one is refused without being read.
#[tokio::test]
async fn an_endless_collection_is_not_read() {
    let c = collector_at(
        duet_core::http::testing::answer_once(
            "HTTP/1.1 200 OK\r\ncontent-length: 10000000000\r\n\r\nxxxx",
        )
        .await,
    );
    let query = Query::TimeInterval {
        batch_interval: interval(0, 3600),
    };
    let e = c
        .poll_once(&CollectionJobId([1; 16]), &query)
        .await
        .expect_err("refused");
    assert!(
        matches!(&e, CollectorError::Codec(m) if m.contains("is longer than")),
        "{e}"
    );
}

/// A job the Leader gave up on answers every poll with an error: the collector keeps polling
/// (the error might pass), and when its time is up says what the last poll got, not only that
/// the job was not ready.
#[tokio::test]
async fn a_timeout_names_the_last_polls_error() {
    let c = collector_at(
        duet_core::http::testing::answer_always(
            "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/problem+json\r\n\
             connection: close\r\ncontent-length: 82\r\n\r\n\
             {\"type\":\"about:blank\",\"status\":500,\"detail\":\"the collection job failed; see logs\"}",
        )
        .await,
    );
    let query = Query::TimeInterval {
        batch_interval: interval(0, 3600),
    };
    let job = CollectionJobId([1; 16]);
    let e = c
        .poll_until_ready(&job, &query, std::time::Duration::from_millis(500))
        .await
        .expect_err("must time out");
    match &e {
        CollectorError::Timeout {
            last_error: Some(last),
            ..
        } => assert!(last.contains("the collection job failed"), "{last}"),
        other => panic!("{other:?}"),
    }
    assert!(
        e.to_string()
            .contains("the Leader answered its last poll with an error"),
        "{e}"
    );
}

/// A Leader busy (429) at the last poll leaves the job pending as far as the timeout says: no
/// error to report.
#[tokio::test]
async fn a_busy_leader_is_not_a_failed_job() {
    let c = collector_at(
        duet_core::http::testing::answer_always(
            "HTTP/1.1 429 Too Many Requests\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        )
        .await,
    );
    let query = Query::TimeInterval {
        batch_interval: interval(0, 3600),
    };
    let e = c
        .poll_until_ready(
            &CollectionJobId([1; 16]),
            &query,
            std::time::Duration::from_millis(300),
        )
        .await
        .expect_err("must time out");
    assert!(
        matches!(
            e,
            CollectorError::Timeout {
                last_error: None,
                ..
            }
        ),
        "{e}"
    );
}
