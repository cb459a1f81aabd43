//! Several `duet serve` processes over one database, killed abruptly in the middle of aggregation:
//! no report may be lost and none counted twice.
//!
//! The PostgreSQL tests need `DATABASE_URL`, a server whose user may create databases
//! (`scripts/test` starts a throwaway cluster and sets it); each test creates its own database and
//! drops it at the end. Without `DATABASE_URL` they print why they are skipped and pass. The
//! SQLite test always runs.
// Real servers run on real time: deadlines and elapsed-time reports read the monotonic clock.
#![allow(clippy::disallowed_methods)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use duet_client::{Client, ClientParameters};
use duet_collector::{Collector, CollectorParameters};
use duet_core::hpke::{HpkeKeypair, HpkeKeypairSerde};
use duet_core::task::parse_endpoint;
use duet_core::{AggregateResult, Measurement, TaskParameters};
use duet_messages::dap09::{Interval, Query, Time};
use duet_messages::problem::DapProblemType;
use sqlx::{Connection, PgConnection, SqliteConnection};

/// Tunables every server of these tests runs with: short leases, quick polling, small jobs.
const AGGREGATOR_SECTION: &str =
    "[aggregator]\nlease_duration_s = 3\npolling_interval_ms = 300\nmax_aggregation_job_size = 200\n";
/// Each test gives up after this long.
const TEST_TIMEOUT: Duration = Duration::from_secs(170);

fn duet() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_duet"));
    c.env_remove("RUST_LOG")
        .env_remove("DUET_DATABASE")
        .env_remove("DUET_LISTEN");
    c
}

/// Runs a `duet` command to completion and fails the test if it fails.
fn run_ok(args: &[&str]) {
    let out = duet().args(args).output().expect("run duet");
    assert!(
        out.status.success(),
        "duet {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a `duet` command that prints one JSON object (off the async runtime), fails the test if
/// it fails, and returns the object.
async fn json_of(args: Vec<String>) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || duet().args(&args).output().expect("run duet"))
        .await
        .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("one JSON object")
}

/// Runs `body` on a fresh PostgreSQL database (dropped afterwards), within `TEST_TIMEOUT`; the
/// servers it started die with its task, before the database is dropped.
async fn with_fresh_database<F, Fut>(test: &str, body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    duet_store::conformance::postgres::with_fresh_database(test, |url| {
        let test = body(url);
        async move {
            tokio::time::timeout(TEST_TIMEOUT, test)
                .await
                .expect("the test timed out");
        }
    })
    .await;
}

/// A running `duet serve`, killed (SIGKILL) when dropped.
struct Server {
    child: std::process::Child,
    /// `http://ADDR`, without a trailing slash.
    base: String,
    /// `ADDR`, to restart on the same port.
    addr: String,
    log: PathBuf,
}

impl Server {
    /// Starts `duet serve` with `roles` (the `[leader]`/`[helper]` sections) and waits for its
    /// address. `name` names its config and log files in `dir`.
    async fn start(dir: &Path, name: &str, listen: &str, database: &str, roles: &str) -> Server {
        Self::start_with(dir, name, listen, database, roles, "").await
    }

    /// Like [`Server::start`], with extra `[aggregator]` settings.
    async fn start_with(
        dir: &Path,
        name: &str,
        listen: &str,
        database: &str,
        roles: &str,
        aggregator_extra: &str,
    ) -> Server {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"{listen}\"\ndatabase = \"{database}\"\n{roles}\n{AGGREGATOR_SECTION}{aggregator_extra}"
            ),
        )
        .expect("write config");
        let log = dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log).expect("create log");
        let child = duet()
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn duet serve");
        let mut server = Server {
            child,
            base: String::new(),
            addr: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&server.log).unwrap_or_default();
            if let Some(base) = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("duet serving on "))
            {
                server.base = base.to_string();
                server.addr = base
                    .strip_prefix("http://")
                    .expect("an http:// address")
                    .to_string();
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("duet serve ({name}) exited with {status}:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "duet serve ({name}) did not start:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, and reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The server's log, for failure messages.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

const LEADER_ONLY: &str = "[leader]\npath_prefix = \"/\"\n";
const HELPER_ONLY: &str = "[helper]\npath_prefix = \"/\"\n";
const BOTH_ROLES: &str =
    "[leader]\npath_prefix = \"/leader\"\n[helper]\npath_prefix = \"/helper\"\n";

/// A Prio3Count task, imported for both roles into `database`.
struct Provisioned {
    params: TaskParameters,
    collector_key: HpkeKeypair,
}

fn provision(dir: &Path, database: &str, leader_url: &str, helper_url: &str) -> Provisioned {
    let key = dir.join("collector.json").display().to_string();
    run_ok(&["keys", "generate", "--out", &key]);
    let task = dir.join("task.json").display().to_string();
    run_ok(&[
        "task",
        "create",
        "--leader-url",
        leader_url,
        "--helper-url",
        helper_url,
        "--vdaf",
        "count",
        "--collector-key",
        &key,
        "--min-batch-size",
        "100",
        "--out",
        &task,
    ]);
    for role in ["leader", "helper"] {
        run_ok(&["task", "import", &task, "--db", database, "--role", role]);
    }
    let params: TaskParameters =
        serde_json::from_str(&std::fs::read_to_string(&task).expect("read task")).expect("task");
    let serde: HpkeKeypairSerde =
        serde_json::from_str(&std::fs::read_to_string(&key).expect("read key")).expect("key");
    Provisioned {
        params,
        collector_key: HpkeKeypair::from_serde(&serde).expect("key"),
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// A client uploading to `leader` (which may differ from the task's Leader endpoint).
async fn client(p: &Provisioned, leader: &str) -> Arc<Client> {
    let params = ClientParameters {
        task_id: p.params.task_id.parse().expect("task id"),
        leader_endpoint: parse_endpoint(leader).expect("leader url"),
        helper_endpoint: parse_endpoint(&p.params.helper_endpoint).expect("helper url"),
        time_precision: duet_messages::dap09::Duration(p.params.time_precision),
    };
    Arc::new(
        Client::new(params, p.params.vdaf.clone(), http())
            .await
            .expect("client"),
    )
}

/// Report `i`'s measurement.
fn measurement(i: usize) -> bool {
    i % 3 == 0
}

/// Uploads reports `from..to`, report `i` to `clients[i % clients.len()]`, 32 at a time.
async fn upload(clients: &[Arc<Client>], from: usize, to: usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(from));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let next = Arc::clone(&next);
        let clients = clients.to_vec();
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= to {
                    return;
                }
                let m = Measurement::Count(measurement(i));
                if let Err(e) = clients[i % clients.len()].upload(&m).await {
                    panic!("upload of report {i} failed: {e}");
                }
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        if let Err(e) = r {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// Collects everything uploaded in this test through `leader` and checks the count and the sum.
/// On a collection error, the test fails with the servers' logs.
/// Collects the hours around now through `leader` and checks the result holds the `n` reports
/// uploaded; returns the interval collected.
async fn collect_and_check(
    p: &Provisioned,
    leader: &str,
    n: usize,
    servers: &[&Server],
) -> Interval {
    let params = CollectorParameters {
        task_id: p.params.task_id.parse().expect("task id"),
        leader_endpoint: parse_endpoint(leader).expect("leader url"),
        auth_token: p
            .params
            .collector_auth_token
            .clone()
            .expect("collector token"),
        hpke_keypair: p.collector_key.clone(),
    };
    let collector = Collector::new(params, p.params.vdaf.clone(), http()).expect("collector");
    let precision = p.params.time_precision;
    let now = std::time::SystemTime::UNIX_EPOCH
        .elapsed()
        .expect("clock")
        .as_secs();
    let batch_interval = Interval {
        start: Time((now / precision * precision).saturating_sub(2 * precision)),
        duration: duet_messages::dap09::Duration(3 * precision),
    };
    let query = Query::TimeInterval { batch_interval };
    let result = collector
        .collect(query, Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| {
            let logs: Vec<String> = servers.iter().map(|s| s.log()).collect();
            panic!("collection failed: {e}\n{}", logs.join("\n----\n"))
        });
    let expected = (0..n).filter(|&i| measurement(i)).count() as u128;
    assert_eq!(result.report_count, n as u64, "report count");
    assert_eq!(result.aggregate, AggregateResult::Number(expected), "sum");
    batch_interval
}

/// Aggregation jobs in the database, by state.
#[derive(Clone, Copy, Debug)]
struct Jobs {
    all: i64,
    finished: i64,
    /// Active and under an unexpired lease: being run by some Leader right now.
    leased: i64,
    /// Leased more than once: run again after a lease expired (or after a failed attempt).
    re_leased: i64,
}

async fn jobs(database: &str) -> Jobs {
    let now = std::time::SystemTime::UNIX_EPOCH
        .elapsed()
        .expect("clock")
        .as_secs();
    let sql = format!(
        "SELECT COUNT(*), \
         COALESCE(SUM(CASE WHEN state = 'finished' THEN 1 ELSE 0 END), 0), \
         COALESCE(SUM(CASE WHEN state = 'active' AND lease_expiry > {now} THEN 1 ELSE 0 END), 0), \
         COALESCE(SUM(CASE WHEN lease_attempts > 1 THEN 1 ELSE 0 END), 0) \
         FROM aggregation_jobs"
    );
    let row: (i64, i64, i64, i64) = if database.starts_with("postgres") {
        let mut c = PgConnection::connect(database).await.expect("connect");
        let row = sqlx::query_as(&sql).fetch_one(&mut c).await.expect("query");
        let _ = c.close().await;
        row
    } else {
        let mut c = SqliteConnection::connect(&format!("sqlite://{database}"))
            .await
            .expect("connect");
        let row = sqlx::query_as(&sql).fetch_one(&mut c).await.expect("query");
        let _ = c.close().await;
        row
    };
    Jobs {
        all: row.0,
        finished: row.1,
        leased: row.2,
        re_leased: row.3,
    }
}

/// After a collection: every aggregation job finished (none abandoned or left behind).
async fn finished_all(database: &str, started: Instant) {
    let j = jobs(database).await;
    println!(
        "collected after {:?}: {} aggregation jobs, {} finished, {} leased more than once",
        started.elapsed(),
        j.all,
        j.finished,
        j.re_leased
    );
    assert_eq!(j.finished, j.all, "unfinished aggregation jobs: {j:?}");
}

/// Waits until some aggregation jobs have finished and at least `leased` are being run, so that a
/// kill lands in the middle of aggregation. `None` if that moment did not come within 60 s.
async fn wait_mid_aggregation(database: &str, leased: i64) -> Option<Jobs> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = jobs(database).await;
        if j.finished > 0 && j.leased >= leased {
            return Some(j);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Two Leader replicas and a Helper over one PostgreSQL database. Half the reports go to each
/// replica; then, while the rest go to replica B, replica A is killed while it holds leases on
/// aggregation jobs. Replica B must take those jobs over once the leases expire and collect
/// exactly every report.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_replica_killed_mid_aggregation() {
    with_fresh_database("leader_replica_killed_mid_aggregation", |db| async move {
        const N: usize = 20_000;
        // Replica B runs one job at a time, so with two jobs under lease at once replica A
        // holds at least one of them.
        const LEASED_BY_BOTH: i64 = 2;
        let started = Instant::now();
        let dir = tempfile::tempdir().expect("tmp");
        let helper = Server::start(dir.path(), "helper", "127.0.0.1:0", &db, HELPER_ONLY).await;
        let mut a = Server::start(dir.path(), "leader-a", "127.0.0.1:0", &db, LEADER_ONLY).await;
        let b = Server::start_with(
            dir.path(),
            "leader-b",
            "127.0.0.1:0",
            &db,
            LEADER_ONLY,
            "max_concurrent_jobs = 1\n",
        )
        .await;
        let p = provision(
            dir.path(),
            &db,
            &format!("{}/", a.base),
            &format!("{}/", helper.base),
        );
        let client_a = client(&p, &format!("{}/", a.base)).await;
        let client_b = client(&p, &format!("{}/", b.base)).await;

        upload(&[client_a, Arc::clone(&client_b)], 0, N / 2).await;
        println!("uploaded {} reports after {:?}", N / 2, started.elapsed());
        let rest = tokio::spawn(async move { upload(&[client_b], N / 2, N).await });
        let at_kill = wait_mid_aggregation(&db, LEASED_BY_BOTH).await;
        a.kill();
        println!(
            "killed replica A after {:?}; jobs then: {at_kill:?}",
            started.elapsed()
        );
        if let Err(e) = rest.await {
            std::panic::resume_unwind(e.into_panic());
        }
        println!("uploaded {N} reports after {:?}", started.elapsed());
        collect_and_check(&p, &format!("{}/", b.base), N, &[&a, &b, &helper]).await;
        finished_all(&db, started).await;
        assert!(
            at_kill.is_some(),
            "never saw {LEASED_BY_BOTH} jobs under lease at once: replica A was not killed mid-aggregation"
        );
        drop((helper, b));
    })
    .await;
}

/// An API-only Leader replica (`run_jobs = false`) stores uploads and accepts the collection job
/// but runs no job; a worker replica started later on the same database does the aggregation and
/// the collection, which the collector then reads through the API replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_replica_leaves_jobs_to_a_worker_replica() {
    with_fresh_database(
        "api_replica_leaves_jobs_to_a_worker_replica",
        |db| async move {
            const N: usize = 2_000;
            let started = Instant::now();
            let dir = tempfile::tempdir().expect("tmp");
            let helper = Server::start(dir.path(), "helper", "127.0.0.1:0", &db, HELPER_ONLY).await;
            let api = Server::start_with(
                dir.path(),
                "leader-api",
                "127.0.0.1:0",
                &db,
                LEADER_ONLY,
                "run_jobs = false\n",
            )
            .await;
            let p = provision(
                dir.path(),
                &db,
                &format!("{}/", api.base),
                &format!("{}/", helper.base),
            );
            upload(&[client(&p, &format!("{}/", api.base)).await], 0, N).await;
            // Many times the job creation delay: a replica that ran jobs would have made some.
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(jobs(&db).await.all, 0, "the API replica created jobs");

            let worker =
                Server::start(dir.path(), "leader-worker", "127.0.0.1:0", &db, LEADER_ONLY).await;
            let collected =
                collect_and_check(&p, &format!("{}/", api.base), N, &[&api, &worker, &helper])
                    .await;
            // The worker ran the collection; the API replica learns of it within about a second
            // and then refuses reports for the collected interval.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let late = client(&p, &format!("{}/", api.base))
                .await
                .upload_at(&Measurement::Count(true), Some(collected.start))
                .await;
            let e = late.expect_err("a report for a collected interval is refused");
            assert_eq!(
                e.problem_type(),
                Some(DapProblemType::ReportRejected),
                "{e}"
            );
            finished_all(&db, started).await;
            drop((api, worker, helper));
        },
    )
    .await;
}

/// Uploads `n` reports, kills the Leader and the Helper in the middle of aggregation, restarts
/// them on the same addresses over the same database, and collects.
async fn restart_mid_aggregation(db: &str, dir: &Path, separate: bool, n: usize) {
    let started = Instant::now();
    let (mut leader, mut helper, leader_url, helper_url) = if separate {
        let h = Server::start(dir, "helper", "127.0.0.1:0", db, HELPER_ONLY).await;
        let l = Server::start(dir, "leader", "127.0.0.1:0", db, LEADER_ONLY).await;
        let (lu, hu) = (format!("{}/", l.base), format!("{}/", h.base));
        (l, Some(h), lu, hu)
    } else {
        let s = Server::start(dir, "both", "127.0.0.1:0", db, BOTH_ROLES).await;
        let (lu, hu) = (format!("{}/leader/", s.base), format!("{}/helper/", s.base));
        (s, None, lu, hu)
    };
    let p = provision(dir, db, &leader_url, &helper_url);
    let c = client(&p, &leader_url).await;
    upload(&[c], 0, n).await;
    let at_kill = wait_mid_aggregation(db, 1).await;
    leader.kill();
    if let Some(h) = helper.as_mut() {
        h.kill();
    }
    println!(
        "killed after {:?}; jobs then: {at_kill:?}",
        started.elapsed()
    );
    let (leader, helper) = if separate {
        let h = helper.as_ref().expect("helper");
        let h = Server::start(dir, "helper-2", &h.addr, db, HELPER_ONLY).await;
        let l = Server::start(dir, "leader-2", &leader.addr, db, LEADER_ONLY).await;
        (l, Some(h))
    } else {
        let s = Server::start(dir, "both-2", &leader.addr, db, BOTH_ROLES).await;
        (s, None)
    };
    let mut servers = vec![&leader];
    servers.extend(helper.as_ref());
    collect_and_check(&p, &leader_url, n, &servers).await;
    finished_all(db, started).await;
    assert!(
        at_kill.is_some(),
        "never saw a job under lease: the servers were not killed mid-aggregation"
    );
    drop((leader, helper));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_mid_aggregation_postgres() {
    with_fresh_database("restart_mid_aggregation_postgres", |db| async move {
        let dir = tempfile::tempdir().expect("tmp");
        restart_mid_aggregation(&db, dir.path(), true, 5_000).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_mid_aggregation_sqlite() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("agg.sqlite").display().to_string();
    tokio::time::timeout(
        TEST_TIMEOUT,
        restart_mid_aggregation(&db, dir.path(), false, 5_000),
    )
    .await
    .expect("the test timed out");
}

/// `duet quickstart --db postgres://…`: the whole pipeline over PostgreSQL, exact result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_on_postgres() {
    with_fresh_database("quickstart_on_postgres", |db| async move {
        let v = json_of(vec![
            "quickstart".into(),
            "--vdaf".into(),
            "histogram".into(),
            "--length".into(),
            "5".into(),
            "--reports".into(),
            "300".into(),
            "--json".into(),
            "--db".into(),
            db,
        ])
        .await;
        assert_eq!(v["report_count"], 300);
        assert_eq!(v["result"], v["plaintext"]);
    })
    .await;
}

/// `duet bench` on PostgreSQL with Prio3SumVec(1000) reports (about 17 kB each): the Leader's
/// upload batches are large enough to be written before their flush and acknowledged after it,
/// and the collected aggregate, which the bench checks against the measurements, is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_on_postgres_with_large_reports() {
    with_fresh_database("bench_large_reports", |url| async move {
        let mut args: Vec<String> = ["bench", "--json", "--backend", "postgres", "--database"]
            .map(String::from)
            .into();
        args.push(url);
        args.extend(
            [
                "--vdaf",
                "sumvec",
                "--reports",
                "200",
                "--floor-reports",
                "5",
            ]
            .map(String::from),
        );
        let v = json_of(args).await;
        assert_eq!(v["runs"][0]["reports"], 200);
        assert_eq!(v["runs"][0]["backend"], "postgres");
    })
    .await;
}
