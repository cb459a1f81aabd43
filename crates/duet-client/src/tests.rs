use super::*;
use duet_core::hpke::{open, HpkeKeypair};
use duet_core::MockClock;
use duet_messages::dap09::{HpkeAeadId, HpkeConfigId};

const PRECISION: Duration = Duration(3600);

struct Fixture {
    client: Client<MockClock>,
    leader_key: HpkeKeypair,
    helper_key: HpkeKeypair,
    clock: MockClock,
}

fn fixture(vdaf: VdafInstance) -> Fixture {
    let leader_key = HpkeKeypair::generate(HpkeConfigId(1));
    let helper_key = HpkeKeypair::generate(HpkeConfigId(2));
    let clock = MockClock::new(Time(1_700_000_123));
    let params = ClientParameters {
        task_id: TaskId([9; 32]),
        leader_endpoint: "http://leader.test/v09".parse().expect("url"),
        helper_endpoint: "http://helper.test/".parse().expect("url"),
        time_precision: PRECISION,
    };
    let client = Client::with_hpke_configs(
        params,
        vdaf,
        reqwest::Client::new(),
        clock.clone(),
        leader_key.config.clone(),
        helper_key.config.clone(),
    )
    .expect("client");
    Fixture {
        client,
        leader_key,
        helper_key,
        clock,
    }
}

/// Opens one input share as its aggregator would.
fn open_share(
    key: &HpkeKeypair,
    server: Role,
    task_id: TaskId,
    report: &Report,
) -> Result<Vec<u8>, String> {
    let ciphertext = match server {
        Role::Leader => &report.leader_encrypted_input_share,
        _ => &report.helper_encrypted_input_share,
    };
    let aad = InputShareAad {
        task_id,
        metadata: report.metadata,
        public_share: report.public_share.clone(),
    };
    let plaintext = open(
        key,
        &HpkeApplicationInfo::InputShare { server },
        ciphertext,
        &aad.get_encoded(),
    )
    .map_err(|e| e.to_string())?;
    let share = PlaintextInputShare::get_decoded(&plaintext).map_err(|e| e.to_string())?;
    assert!(share.extensions.is_empty());
    Ok(share.payload)
}

#[test]
fn report_time_is_rounded_down_and_ids_are_fresh() {
    let f = fixture(VdafInstance::Prio3Count);
    let a = f
        .client
        .prepare_report(&Measurement::Count(true))
        .expect("prepare");
    let b = f
        .client
        .prepare_report(&Measurement::Count(true))
        .expect("prepare");
    assert_eq!(a.metadata.time, Time(1_699_999_200));
    assert_ne!(a.metadata.id, b.metadata.id);

    f.clock.advance(Duration(3600));
    let c = f
        .client
        .prepare_report(&Measurement::Count(false))
        .expect("prepare");
    assert_eq!(c.metadata.time, Time(1_700_002_800));

    let d = f
        .client
        .prepare_report_at(&Measurement::Count(false), Time(7201))
        .expect("prepare");
    assert_eq!(d.metadata.time, Time(7200));
}

#[test]
fn shares_open_only_for_their_aggregator_and_report() {
    let f = fixture(VdafInstance::Prio3Sum { bits: 8 });
    let task_id = f.client.parameters().task_id;
    let report = f
        .client
        .prepare_report(&Measurement::Sum(200))
        .expect("prepare");
    assert_eq!(
        report.leader_encrypted_input_share.config_id,
        HpkeConfigId(1)
    );
    assert_eq!(
        report.helper_encrypted_input_share.config_id,
        HpkeConfigId(2)
    );

    let leader_share =
        open_share(&f.leader_key, Role::Leader, task_id, &report).expect("leader opens");
    let helper_share =
        open_share(&f.helper_key, Role::Helper, task_id, &report).expect("helper opens");

    // Info binding: the Leader's share does not open as the Helper's, even with the right key.
    let mut swapped = report.clone();
    swapped.helper_encrypted_input_share = report.leader_encrypted_input_share.clone();
    assert!(open_share(&f.leader_key, Role::Helper, task_id, &swapped).is_err());
    // Wrong key.
    assert!(open_share(&f.helper_key, Role::Leader, task_id, &report).is_err());
    // AAD binding: another task, another time, another report ID or public share all fail.
    assert!(open_share(&f.leader_key, Role::Leader, TaskId([8; 32]), &report).is_err());
    let mut moved = report.clone();
    moved.metadata.time = Time(moved.metadata.time.0 + 3600);
    assert!(open_share(&f.leader_key, Role::Leader, task_id, &moved).is_err());
    let mut renamed = report.clone();
    renamed.metadata.id = ReportId([0; 16]);
    assert!(open_share(&f.helper_key, Role::Helper, task_id, &renamed).is_err());
    let mut tampered = report.clone();
    tampered.public_share.push(0);
    assert!(open_share(&f.helper_key, Role::Helper, task_id, &tampered).is_err());

    // The opened shares prepare and unshard to the measurement.
    let vdaf = VdafInstance::Prio3Sum { bits: 8 }
        .instantiate()
        .expect("vdaf");
    let vk = [3u8; 16];
    let id = report.metadata.id;
    let (state, msg) = vdaf
        .leader_init(&vk, &id, &report.public_share, &leader_share)
        .expect("leader init");
    let (helper_out, reply) = vdaf
        .helper_init(&vk, &id, &report.public_share, &helper_share, &msg)
        .expect("helper init");
    let leader_out = vdaf
        .leader_continued(state, &reply)
        .expect("leader continued");
    let mut l = vdaf.empty_aggregate().expect("empty");
    let mut h = vdaf.empty_aggregate().expect("empty");
    vdaf.accumulate(&mut l, &leader_out).expect("accumulate");
    vdaf.accumulate(&mut h, &helper_out).expect("accumulate");
    let l = vdaf.encode_aggregate(&l).expect("encode");
    let h = vdaf.encode_aggregate(&h).expect("encode");
    assert_eq!(
        vdaf.unshard(&l, &h, 1).expect("unshard"),
        duet_core::AggregateResult::Number(200)
    );
}

#[test]
fn a_measurement_of_the_wrong_kind_is_refused() {
    let f = fixture(VdafInstance::Prio3Count);
    let e = f
        .client
        .prepare_report(&Measurement::Sum(3))
        .expect_err("must fail");
    assert!(matches!(e, ClientError::Vdaf(_)), "{e}");
    assert!(
        e.to_string().starts_with("could not shard the measurement"),
        "{e}"
    );
}

#[test]
fn unsupported_suites_are_refused() {
    let leader = HpkeKeypair::generate(HpkeConfigId(1)).config;
    let mut helper = HpkeKeypair::generate(HpkeConfigId(2)).config;
    helper.aead_id = HpkeAeadId::CHACHA20_POLY1305;
    let params = ClientParameters {
        task_id: TaskId([1; 32]),
        leader_endpoint: "http://leader.test/".parse().expect("url"),
        helper_endpoint: "http://helper.test/".parse().expect("url"),
        time_precision: PRECISION,
    };
    let e = Client::with_hpke_configs(
        params,
        VdafInstance::Prio3Count,
        reqwest::Client::new(),
        RealClock,
        leader,
        helper.clone(),
    )
    .expect_err("must fail");
    assert!(
        matches!(e, ClientError::NoSupportedHpkeConfig { .. }),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("the Helper at http://helper.test/ offers no HPKE configuration"),
        "{e}"
    );

    // From a list, the first supported config wins and unsupported ones are skipped.
    let good = HpkeKeypair::generate(HpkeConfigId(5)).config;
    let also_good = HpkeKeypair::generate(HpkeConfigId(6)).config;
    let picked = pick_config(
        "x",
        HpkeConfigList(vec![helper.clone(), good.clone(), also_good]),
    )
    .expect("pick");
    assert_eq!(picked, good);
    assert!(pick_config("x", HpkeConfigList(vec![helper])).is_err());
}

#[test]
fn endpoints_gain_a_trailing_slash() {
    let f = fixture(VdafInstance::Prio3Count);
    let leader = &f.client.parameters().leader_endpoint;
    assert_eq!(leader.as_str(), "http://leader.test/v09/");
    let url = join(leader, &format!("tasks/{}/reports", TaskId([0; 32]))).expect("join");
    assert_eq!(
        url.as_str(),
        format!("http://leader.test/v09/tasks/{}/reports", TaskId([0; 32]))
    );
}

#[test]
fn client_is_shareable_and_uploads_are_send() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<Client>();
    send_sync::<Client<MockClock>>();
    let f = fixture(VdafInstance::Prio3Count);
    let m = Measurement::Count(true);
    // Built but never polled: only its type is checked.
    let upload = f.client.upload(&m);
    send(&upload);
}

/// An aggregator's HPKE configuration list is read up to a bound: a longer one is refused
/// without being read.
#[tokio::test]
async fn an_endless_hpke_config_list_is_not_read() {
    let endpoint = duet_core::http::testing::answer_once(
        "HTTP/1.1 200 OK\r\ncontent-length: 10000000000\r\n\r\nxxxx",
    )
    .await;
    let e = fetch_hpke_config(
        &reqwest::Client::new(),
        &TaskId([7; 32]),
        Role::Leader,
        &endpoint,
    )
    .await
    .expect_err("refused");
    assert!(
        matches!(&e, ClientError::Codec(m) if m.contains("longer than 65537 bytes")),
        "{e}"
    );
}

/// What [`mock_aggregator`] does and saw.
#[derive(Default)]
struct Mock {
    /// HPKE configuration requests answered.
    gets: std::sync::atomic::AtomicUsize,
    /// Uploads answered.
    puts: std::sync::atomic::AtomicUsize,
    /// Answer configuration requests with 500 while set.
    failing_gets: std::sync::atomic::AtomicBool,
}

/// A server for both aggregators that answers an HPKE configuration request with `config`,
/// kept `max-age=60` (or 500, while `failing_gets`), and the `i`-th upload with `puts[i]` (the
/// last one for all after it).
async fn mock_aggregator(
    config: HpkeConfig,
    puts: &'static [&'static str],
) -> (url::Url, std::sync::Arc<Mock>) {
    use std::sync::atomic::Ordering;

    let mock = std::sync::Arc::new(Mock::default());
    let seen = std::sync::Arc::clone(&mock);
    let list = HpkeConfigList(vec![config]).get_encoded();
    let url = duet_core::http::testing::answer_each(move |request| {
        if request.starts_with(b"GET ") {
            seen.gets.fetch_add(1, Ordering::SeqCst);
            if seen.failing_gets.load(Ordering::SeqCst) {
                return b"HTTP/1.1 500 Internal Server Error\r\nconnection: close\r\n\
                         content-length: 0\r\n\r\n"
                    .to_vec();
            }
            let mut a = format!(
                "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\n\
                 connection: close\r\ncontent-length: {}\r\n\r\n",
                list.len()
            )
            .into_bytes();
            a.extend_from_slice(&list);
            a
        } else {
            let i = seen.puts.fetch_add(1, Ordering::SeqCst);
            puts[i.min(puts.len() - 1)].as_bytes().to_vec()
        }
    })
    .await;
    (url, mock)
}

/// An upload answered 201.
const CREATED: &str = "HTTP/1.1 201 Created\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// A client of `endpoint` (both aggregators) on `clock`.
async fn client_of(endpoint: url::Url, clock: &MockClock) -> Client<MockClock> {
    let params = ClientParameters {
        task_id: TaskId([7; 32]),
        leader_endpoint: endpoint.clone(),
        helper_endpoint: endpoint,
        time_precision: PRECISION,
    };
    Client::with_clock(
        params,
        VdafInstance::Prio3Count,
        reqwest::Client::new(),
        clock.clone(),
    )
    .await
    .expect("client")
}

/// The client keeps the aggregators' HPKE configurations as long as their `Cache-Control`
/// allows, and fetches them again before the first upload after that (DAP-09 §4.3).
#[tokio::test]
async fn hpke_configs_are_fetched_again_once_stale() {
    use std::sync::atomic::Ordering;

    let key = HpkeKeypair::generate(HpkeConfigId(1));
    let (endpoint, mock) = mock_aggregator(key.config.clone(), &[CREATED]).await;
    let clock = MockClock::new(Time(1_700_000_000));
    let client = client_of(endpoint, &clock).await;
    let gets = || mock.gets.load(Ordering::SeqCst);
    // One request per aggregator.
    assert_eq!(gets(), 2);
    let m = Measurement::Count(true);
    client.upload(&m).await.expect("upload");
    clock.advance(Duration(59));
    client.upload(&m).await.expect("upload");
    assert_eq!(gets(), 2, "fresh configs fetched again");
    clock.advance(Duration(1));
    client.upload(&m).await.expect("upload");
    assert_eq!(gets(), 4, "stale configs kept");

    // A refetch that fails: the upload goes on with the stale configs, and the next ones do
    // not try again for a while.
    mock.failing_gets.store(true, Ordering::SeqCst);
    clock.advance(Duration(60));
    client.upload(&m).await.expect("upload with stale configs");
    let tried = gets();
    assert!(tried > 4, "no refetch");
    clock.advance(Duration(30));
    client.upload(&m).await.expect("upload");
    assert_eq!(gets(), tried, "refetched again at once after a failure");
    clock.advance(Duration(30));
    client.upload(&m).await.expect("upload");
    assert!(gets() > tried, "never refetched again");
}

/// An upload that may have been stored (its first attempt answered 503) is not sent again as
/// a new report when a later attempt is told `outdatedConfig`: that could count it twice.
#[tokio::test]
async fn no_new_report_after_an_attempt_that_may_have_been_stored() {
    use std::sync::atomic::Ordering;

    const UNAVAILABLE: &str =
        "HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
    const OUTDATED: &str = "HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\n\
         connection: close\r\ncontent-length: 58\r\n\r\n\
         {\"type\":\"urn:ietf:params:ppm:dap:error:outdatedConfig\"}   ";
    let key = HpkeKeypair::generate(HpkeConfigId(1));
    let (endpoint, mock) = mock_aggregator(key.config.clone(), &[UNAVAILABLE, OUTDATED]).await;
    let clock = MockClock::new(Time(1_700_000_000));
    let client = client_of(endpoint, &clock).await;
    let e = client
        .upload(&Measurement::Count(true))
        .await
        .expect_err("refused");
    assert!(matches!(e, ClientError::OutcomeUnknown(_)), "{e}");
    assert_eq!(
        e.problem_type(),
        Some(DapProblemType::OutdatedConfig),
        "{e}"
    );
    assert_eq!(mock.puts.load(Ordering::SeqCst), 2, "a new report was sent");
    assert_eq!(mock.gets.load(Ordering::SeqCst), 2, "configs refetched");
}

/// `Cache-Control` is read as HTTP has it: the smallest `max-age`, and no keeping at all for
/// `no-cache` or `no-store`.
#[test]
fn cache_lifetimes_are_read_from_cache_control() {
    let headers = |values: &[&str]| {
        let mut h = reqwest::header::HeaderMap::new();
        for v in values {
            h.append(
                reqwest::header::CACHE_CONTROL,
                v.parse().expect("header value"),
            );
        }
        h
    };
    assert_eq!(max_age(&headers(&[])), None);
    assert_eq!(max_age(&headers(&["max-age=86400"])), Some(86_400));
    assert_eq!(
        max_age(&headers(&["public, Max-Age=60", "max-age=120"])),
        Some(60)
    );
    assert_eq!(max_age(&headers(&["max-age=60, no-store"])), Some(0));
    assert_eq!(max_age(&headers(&["private"])), None);
}
