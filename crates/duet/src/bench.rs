//! `duet bench`: reproducible throughput, latency and memory figures on this machine.
//!
//! For each backend and VDAF it measures, in one run:
//! * the *floor*: single-threaded CPU per report of the Leader's and the Helper's cryptography
//!   (HPKE open, VDAF preparation, accumulation), on pre-generated reports;
//! * *upload*: reports/s the Leader accepts over HTTP from `--concurrency` connections, on its
//!   own: the reports go to a server that runs no jobs (`run_jobs = false`), and are then
//!   deleted again;
//! * *end to end*: the same reports uploaded to a full server, from the first upload to a
//!   finished collection, with the rate uploads were accepted at meanwhile, and the latency from
//!   the last upload to the finished collection;
//! * the full server process's peak RSS.
//!
//! Leader and Helper run as two child `duet serve` processes, as two organisations would run them:
//! on SQLite each has its own database file; on PostgreSQL they share the `--database` (each
//! role's rows carry the role). Their memory is measured apart from the bench's. Report
//! generation is not timed.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use duet_core::hpke::{open, HpkeApplicationInfo, HpkeKeypair};
use duet_core::{AggregatorRole, Clock, Measurement, RealClock, VdafInstance};
use duet_messages::dap09::{
    media_type, Duration, HpkeConfigId, InputShareAad, PlaintextInputShare, Query, Report, Role,
};
use duet_messages::{Decode, Encode};
use rand::{Rng, SeedableRng};

/// Backends to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// An embedded SQLite file.
    Sqlite,
    /// PostgreSQL at `--database` or `DATABASE_URL`.
    Postgres,
}

/// VDAFs to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchVdaf {
    /// Prio3Count.
    Count,
    /// Prio3Histogram with 100 buckets.
    Histogram,
    /// Prio3SumVec with 1000 one-bit elements.
    Sumvec,
}

impl BenchVdaf {
    fn instance(self) -> VdafInstance {
        match self {
            Self::Count => VdafInstance::Prio3Count,
            Self::Histogram => VdafInstance::Prio3Histogram {
                length: 100,
                chunk_length: 10,
            },
            Self::Sumvec => VdafInstance::Prio3SumVec {
                bits: 1,
                length: 1000,
                chunk_length: 32,
            },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Count => "Prio3Count",
            Self::Histogram => "Prio3Histogram(100)",
            Self::Sumvec => "Prio3SumVec(1000)",
        }
    }
}

/// `duet bench` flags.
#[derive(clap::Args)]
pub struct Args {
    /// Backend (repeatable). Default: sqlite.
    #[arg(long, value_enum)]
    backend: Vec<Backend>,
    /// PostgreSQL URL for `--backend postgres`.
    #[arg(long, env = "DATABASE_URL")]
    database: Option<String>,
    /// VDAF (repeatable). Default: count.
    #[arg(long, value_enum)]
    vdaf: Vec<BenchVdaf>,
    /// Reports per run.
    #[arg(long, default_value_t = 10_000)]
    reports: usize,
    /// Concurrent upload connections (a Leader serves many clients at once).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Reports used to measure the floor.
    #[arg(long, default_value_t = 500)]
    floor_reports: usize,
    /// Aggregated reports of another task to put in the database before each run, to measure
    /// whether cost grows with history.
    #[arg(long, default_value_t = 0)]
    history: usize,
    /// Print exactly one JSON object.
    #[arg(long)]
    json: bool,
}

/// One run's figures.
#[derive(serde::Serialize)]
struct Run {
    backend: &'static str,
    vdaf: &'static str,
    reports: usize,
    history: usize,
    hpke_open_us: f64,
    leader_cpu_us_per_report: f64,
    helper_cpu_us_per_report: f64,
    floor_reports_per_s: f64,
    upload_reports_per_s: f64,
    upload_while_aggregating_reports_per_s: f64,
    end_to_end_reports_per_s: f64,
    ratio: f64,
    collect_latency_s: f64,
    peak_rss_bytes: u64,
    /// CPU time (user and system) per report of the Leader's and the Helper's processes and of
    /// the bench process (the upload client and the collector) over the end-to-end phase; on
    /// PostgreSQL the database server's is not counted.
    leader_process_cpu_us_per_report: f64,
    helper_process_cpu_us_per_report: f64,
    client_cpu_us_per_report: f64,
}

#[allow(clippy::disallowed_methods)] // Benchmarks measure elapsed wall and CPU time.
fn now() -> std::time::Instant {
    std::time::Instant::now()
}

/// Kills the server on every exit path. The server also stops by itself when the pipe on its
/// standard input closes, which happens however this process ends.
struct ServerProcess(std::process::Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds (user and system, all threads) a process has used so far, from `/proc`; `None`
/// for this process.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    /// `/proc` counts CPU time in `USER_HZ` ticks, 100 per second on Linux.
    const TICKS_PER_S: f64 = 100.0;
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|stat| {
            // Fields after the parenthesised command name, which may itself hold spaces:
            // `state` is field 3, `utime` 14 and `stime` 15.
            let rest = stat.get(stat.rfind(')')? + 1..)?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) as f64 / TICKS_PER_S)
        })
        .unwrap_or(0.0)
}

/// CPU seconds used so far by the Leader's process, the Helper's and this one.
fn cpu_snapshot(leader: &ServerProcess, helper: &ServerProcess) -> [f64; 3] {
    [
        cpu_seconds(Some(leader.0.id())),
        cpu_seconds(Some(helper.0.id())),
        cpu_seconds(None),
    ]
}

fn peak_rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Which role a bench server plays.
#[derive(Clone, Copy)]
enum ServerRole {
    /// The Leader at `/leader/`, running its jobs or (`false`) only serving its API.
    Leader { jobs: bool },
    /// The Helper at `/helper/`.
    Helper,
}

/// Starts `duet serve` in `role` on `database`; returns it and its base URL.
fn start_server(dir: &Path, database: &str, role: ServerRole) -> Result<(ServerProcess, String)> {
    let (name, section) = match role {
        ServerRole::Leader { jobs } => (
            if jobs { "leader" } else { "leader-api" },
            format!("[leader]\npath_prefix = \"/leader\"\n[aggregator]\nrun_jobs = {jobs}\n"),
        ),
        ServerRole::Helper => (
            "helper",
            "[helper]\npath_prefix = \"/helper\"\n".to_string(),
        ),
    };
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:0\"\ndatabase = \"{database}\"\n{section}"),
    )?;
    let exe = std::env::current_exe().context("cannot find the duet executable")?;
    let mut child = std::process::Command::new(exe)
        .args(["serve", "--exit-on-stdin-eof", "--config"])
        .arg(&config)
        .stdin(Stdio::piped())
        .env_remove("DUET_DATABASE")
        .env_remove("DUET_LISTEN")
        .stderr(Stdio::piped())
        .spawn()
        .context("could not start `duet serve`")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let server = ServerProcess(child);
    let mut reader = BufReader::new(stderr);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let Some(base) = line.trim().strip_prefix("duet serving on ") else {
        bail!("the server did not start: {line}");
    };
    let base = base.to_string();
    // Keep draining the server's log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in reader.lines() {});
    Ok((server, base))
}

fn generate(vdaf: &VdafInstance, n: usize) -> Vec<Measurement> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..n)
        .map(|_| match vdaf {
            VdafInstance::Prio3Count => Measurement::Count(rng.gen_bool(0.5)),
            VdafInstance::Prio3Sum { .. } => Measurement::Sum(rng.gen_range(0..256)),
            VdafInstance::Prio3Histogram { length, .. } => {
                Measurement::Histogram(rng.gen_range(0..*length))
            }
            VdafInstance::Prio3SumVec { length, .. } => {
                Measurement::SumVec((0..*length).map(|_| rng.gen_range(0..2)).collect())
            }
        })
        .collect()
}

/// Fills the databases with `n` already-aggregated reports of another task, through the stores'
/// own job lifecycles (the Leader's reports and jobs, the Helper's jobs and report IDs), as a
/// long-running deployment would have.
async fn add_history(leader_db: &str, helper_db: &str, n: usize) -> Result<()> {
    use duet_messages::dap09::{AggregationJobId, ReportId, TaskId, Time};
    let store = crate::db::open(leader_db, AggregatorRole::Leader).await?;
    let helper = crate::db::open(helper_db, AggregatorRole::Helper).await?;
    let keep_first = |a: &[u8], _: &[u8]| Ok(a.to_vec());
    let task_id = TaskId::random();
    let pb = crate::upload::progress_bar(n as u64, "history");
    let t0 = RealClock.now().0.saturating_sub(30 * 86_400);
    let mut done = 0;
    while done < n {
        let batch: Vec<duet_store::NewReport> = (done..n.min(done + 10_000))
            .map(|i| duet_store::NewReport {
                task_id,
                report_id: ReportId::random(),
                time: Time(t0 + i as u64 / 100),
                encoded: vec![0; 200],
            })
            .collect();
        done += batch.len();
        store.put_reports(&batch).await?;
        for jobs_reports in batch.chunks(1000) {
            let ids: Vec<ReportId> = jobs_reports.iter().map(|r| r.report_id).collect();
            let job = duet_store::HelperAggregationJob {
                task_id,
                id: AggregationJobId::random(),
                request_hash: [0; 32],
                step: 0,
                response: Vec::new(),
            };
            helper
                .put_helper_aggregation_job(&job, &ids, &[], &keep_first)
                .await?;
        }
        store.create_aggregation_jobs(1000, RealClock.now()).await?;
        loop {
            let jobs = store
                .acquire_aggregation_jobs(RealClock.now(), 600, 100)
                .await?;
            if jobs.is_empty() {
                break;
            }
            for job in &jobs {
                store.finish_aggregation_job(job, &[], &keep_first).await?;
            }
        }
        pb.set_position(done as u64);
    }
    pb.finish_and_clear();
    store.close().await;
    helper.close().await;
    Ok(())
}

/// Single-threaded CPU per report (seconds) of the Leader's and the Helper's work, and of one
/// HPKE open alone.
fn floor(
    task: &duet_core::Task,
    leader_key: &HpkeKeypair,
    helper_key: &HpkeKeypair,
    reports: &[Report],
) -> Result<(f64, f64, f64)> {
    let vdaf = task.vdaf.instantiate()?;
    let mut leader = std::time::Duration::ZERO;
    let mut helper = std::time::Duration::ZERO;
    let mut opens = std::time::Duration::ZERO;
    let mut leader_agg = vdaf.empty_aggregate()?;
    let mut helper_agg = vdaf.empty_aggregate()?;
    for r in reports {
        let aad = InputShareAad {
            task_id: task.id,
            metadata: r.metadata,
            public_share: r.public_share.clone(),
        }
        .get_encoded();
        let t = now();
        let pt = open(
            leader_key,
            &HpkeApplicationInfo::InputShare {
                server: Role::Leader,
            },
            &r.leader_encrypted_input_share,
            &aad,
        )?;
        opens += t.elapsed();
        let share = PlaintextInputShare::get_decoded(&pt)?;
        let (state, msg) = vdaf.leader_init(
            &task.vdaf_verify_key,
            &r.metadata.id,
            &r.public_share,
            &share.payload,
        )?;
        leader += t.elapsed();

        let t = now();
        let pt = open(
            helper_key,
            &HpkeApplicationInfo::InputShare {
                server: Role::Helper,
            },
            &r.helper_encrypted_input_share,
            &aad,
        )?;
        let share = PlaintextInputShare::get_decoded(&pt)?;
        let (out, reply) = vdaf.helper_init(
            &task.vdaf_verify_key,
            &r.metadata.id,
            &r.public_share,
            &share.payload,
            &msg,
        )?;
        vdaf.accumulate(&mut helper_agg, &out)?;
        helper += t.elapsed();

        let t = now();
        let out = vdaf.leader_continued(state, &reply)?;
        vdaf.accumulate(&mut leader_agg, &out)?;
        leader += t.elapsed();
    }
    let n = reports.len().max(1) as f64;
    Ok((
        leader.as_secs_f64() / n,
        helper.as_secs_f64() / n,
        opens.as_secs_f64() / n,
    ))
}

/// How long the bench waits for the collection after the last upload before it gives up.
const COLLECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Uploads every body to `url` over `concurrency` keep-alive connections, with a progress bar;
/// returns the seconds it took. Any refused upload fails the run.
///
/// The bench client shares the machine with the servers, so it is kept lean, like a load
/// generator (`wrk`, `h2load`): each connection writes a whole HTTP/1.1 request with one system
/// call and reads the answer with as few as it can, one request in flight at a time.
async fn upload_all(
    url: &url::Url,
    bodies: &[bytes::Bytes],
    concurrency: usize,
    label: &'static str,
) -> Result<f64> {
    let target = UploadTarget::new(url)?;
    let bodies: Arc<Vec<bytes::Bytes>> = Arc::new(bodies.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let pb = crate::upload::progress_bar(bodies.len() as u64, label);
    let t0 = now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (target, next, bodies, pb) = (
            Arc::clone(&target),
            Arc::clone(&next),
            Arc::clone(&bodies),
            pb.clone(),
        );
        workers.spawn(async move {
            let mut conn: Option<UploadConnection> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else {
                    return Ok::<(), anyhow::Error>(());
                };
                target
                    .put(&mut conn, body)
                    .await
                    .with_context(|| format!("upload {i}"))?;
                pb.inc(1);
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r??;
    }
    pb.finish_and_clear();
    Ok(t0.elapsed().as_secs_f64())
}

/// Where [`upload_all`] sends reports: a plain-HTTP Leader.
struct UploadTarget {
    /// `host:port` to connect to.
    addr: String,
    /// The request line and the headers every upload shares, up to `content-length: `.
    head: Vec<u8>,
}

/// One keep-alive connection and its read buffer.
struct UploadConnection {
    stream: tokio::net::TcpStream,
    request: Vec<u8>,
    response: Vec<u8>,
}

/// Largest response head the bench accepts from the Leader.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

impl UploadTarget {
    fn new(url: &url::Url) -> Result<Arc<UploadTarget>> {
        if url.scheme() != "http" {
            bail!("the bench uploads over plain HTTP, not to {url}");
        }
        let host = url.host_str().context("the upload URL has no host")?;
        let port = url
            .port_or_known_default()
            .context("the upload URL has no port")?;
        let addr = format!("{host}:{port}");
        let head = format!(
            "PUT {} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: {}\r\ncontent-length: ",
            url.path(),
            media_type::REPORT
        )
        .into_bytes();
        Ok(Arc::new(UploadTarget { addr, head }))
    }

    /// Uploads one report, on `conn` or a new connection; a connection the server closed is
    /// replaced once.
    async fn put(&self, conn: &mut Option<UploadConnection>, body: &[u8]) -> Result<()> {
        for attempt in 0..2 {
            let c = match conn {
                Some(c) => c,
                None => {
                    let stream = tokio::net::TcpStream::connect(&self.addr)
                        .await
                        .with_context(|| format!("connecting to {}", self.addr))?;
                    stream.set_nodelay(true)?;
                    conn.insert(UploadConnection {
                        stream,
                        request: Vec::new(),
                        response: Vec::new(),
                    })
                }
            };
            match c.round_trip(&self.head, body).await {
                Ok(()) => return Ok(()),
                Err(UploadError::Closed) if attempt == 0 => *conn = None,
                Err(UploadError::Closed) => bail!("the Leader closed the connection"),
                Err(UploadError::Failed(e)) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Why an upload round trip failed.
enum UploadError {
    /// The connection was closed before any of the answer arrived (the request may be retried on
    /// a new connection).
    Closed,
    Failed(anyhow::Error),
}

impl From<std::io::Error> for UploadError {
    fn from(e: std::io::Error) -> Self {
        UploadError::Failed(e.into())
    }
}

impl UploadConnection {
    async fn round_trip(&mut self, head: &[u8], body: &[u8]) -> Result<(), UploadError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        self.request.clear();
        self.request.extend_from_slice(head);
        self.request
            .extend_from_slice(format!("{}\r\n\r\n", body.len()).as_bytes());
        self.request.extend_from_slice(body);
        if let Err(e) = self.stream.write_all(&self.request).await {
            return Err(match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    UploadError::Closed
                }
                _ => e.into(),
            });
        }
        self.response.clear();
        let head_len = loop {
            if let Some(end) = find(&self.response, b"\r\n\r\n") {
                break end + 4;
            }
            if self.response.len() > MAX_RESPONSE_HEAD {
                return Err(UploadError::Failed(anyhow::anyhow!(
                    "the Leader's response head is over {MAX_RESPONSE_HEAD} bytes"
                )));
            }
            let mut chunk = [0u8; 4096];
            let n = match self.stream.read(&mut chunk).await {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(if self.response.is_empty() {
                    UploadError::Closed
                } else {
                    UploadError::Failed(anyhow::anyhow!(
                        "the Leader closed the connection mid-answer"
                    ))
                });
            }
            self.response.extend_from_slice(&chunk[..n]);
        };
        let (status, content_length) =
            parse_response_head(&self.response[..head_len]).map_err(UploadError::Failed)?;
        while self.response.len() < head_len + content_length {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(UploadError::Failed(anyhow::anyhow!(
                    "the Leader closed the connection mid-answer"
                )));
            }
            self.response.extend_from_slice(&chunk[..n]);
        }
        if !(200..300).contains(&status) {
            let body = &self.response[head_len..head_len + content_length];
            return Err(UploadError::Failed(anyhow::anyhow!(
                "refused: {status} {}",
                String::from_utf8_lossy(body)
            )));
        }
        Ok(())
    }
}

/// The status code and `content-length` of an HTTP/1.1 response head.
fn parse_response_head(head: &[u8]) -> Result<(u16, usize)> {
    let text = std::str::from_utf8(head).context("the Leader's response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .with_context(|| format!("unexpected status line {status_line:?}"))?;
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .trim()
                    .parse::<usize>()
                    .with_context(|| format!("bad content-length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("the bench client reads only content-length framed responses");
        }
    }
    Ok((status, content_length.unwrap_or(0)))
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn run_one(args: &Args, backend: Backend, which: BenchVdaf) -> Result<Run> {
    let vdaf = which.instance();
    let dir = tempfile::tempdir()?;
    let (leader_db, helper_db) = match backend {
        Backend::Sqlite => (
            dir.path().join("leader.sqlite").display().to_string(),
            dir.path().join("helper.sqlite").display().to_string(),
        ),
        Backend::Postgres => {
            let url = args
                .database
                .clone()
                .context("--backend postgres needs --database postgres://… or DATABASE_URL")?;
            (url.clone(), url)
        }
    };
    if args.history > 0 {
        add_history(&leader_db, &helper_db, args.history).await?;
        // Write the history's dirty pages out now, not during the measurement. (`sync` for the
        // whole system: opening and closing a SQLite file here would drop SQLite's POSIX locks.)
        let _ = std::process::Command::new("sync").status();
    }
    // The Helper for the whole run, and first a Leader that only serves uploads: the task names
    // it, and the client reads the Leader's HPKE config from it (the full Leader started later
    // has the same keys, from the same database).
    let (helper_server, helper_base) = start_server(dir.path(), &helper_db, ServerRole::Helper)?;
    let (api_server, base) =
        start_server(dir.path(), &leader_db, ServerRole::Leader { jobs: false })?;
    let leader_url = format!("{base}/leader/");
    let helper_url = format!("{helper_base}/helper/");

    let collector_key = HpkeKeypair::generate(HpkeConfigId(1));
    let n = args.reports;
    let task = crate::task::new_task(
        &leader_url,
        &helper_url,
        vdaf.clone(),
        collector_key.config.clone(),
        n as u64,
        3600,
        1,
        None,
    )?;
    let leader_store = crate::db::open(&leader_db, AggregatorRole::Leader).await?;
    let helper_store = crate::db::open(&helper_db, AggregatorRole::Helper).await?;
    leader_store.put_task(&task).await?;
    let helper_task = |task: &duet_core::Task| {
        let mut t = task.clone();
        t.collector_auth_token = None;
        t
    };
    helper_store.put_task(&helper_task(&task)).await?;
    let params = task.to_parameters();
    let client = Arc::new(crate::upload::client_for(&params).await?);

    // Generate (untimed), across cores.
    let measurements = generate(&vdaf, n);
    let plaintext = vdaf.plaintext_aggregate(&measurements)?;
    let pb = crate::upload::progress_bar(n as u64, "generating");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = n.div_ceil(threads).max(1);
    let reports: Vec<Report> = std::thread::scope(|s| {
        let handles: Vec<_> = measurements
            .chunks(chunk)
            .map(|part| {
                let client = Arc::clone(&client);
                let pb = pb.clone();
                s.spawn(move || {
                    part.iter()
                        .map(|m| {
                            pb.inc(1);
                            client.prepare_report(m)
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("generator panicked"))?
                    .map_err(anyhow::Error::from)
            })
            .collect::<Result<Vec<Vec<_>>>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    pb.finish_and_clear();

    let leader_key = leader_store.get_hpke_keypairs().await?.remove(0);
    let helper_key = helper_store.get_hpke_keypairs().await?.remove(0);
    let sample = &reports[..reports.len().min(args.floor_reports.max(1))];
    let (leader_cpu, helper_cpu, hpke_open) = floor(&task, &leader_key, &helper_key, sample)?;
    let floor_rate = threads as f64 / (leader_cpu + helper_cpu);

    let bodies: Vec<bytes::Bytes> = reports
        .iter()
        .map(|r| bytes::Bytes::from(r.get_encoded()))
        .collect();
    // The batch to collect covers the reports' own timestamps, set when they were generated.
    let times = reports.iter().map(|r| r.metadata.time);
    let (first, last) = (
        times.clone().min().context("no reports")?,
        times.max().context("no reports")?,
    );
    drop(reports);

    // Uploads alone, then forget them.
    let url = task
        .leader_endpoint
        .join(&format!("tasks/{}/reports", task.id))?;
    let upload_alone_s = upload_all(&url, &bodies, args.concurrency, "uploading").await?;
    drop(api_server);
    leader_store.delete_task(&task.id).await?;

    // The same reports, end to end, through a full Leader. (The Helper's copy of the task still
    // names the first Leader, which the Helper never contacts.)
    let (server, base) = start_server(dir.path(), &leader_db, ServerRole::Leader { jobs: true })?;
    let mut task = task;
    task.leader_endpoint = format!("{base}/leader/").parse()?;
    leader_store.put_task(&task).await?;
    let url = task
        .leader_endpoint
        .join(&format!("tasks/{}/reports", task.id))?;
    let cpu0 = cpu_snapshot(&server, &helper_server);
    let t0 = now();
    let upload_s = upload_all(&url, &bodies, args.concurrency, "end to end").await?;
    let params = task.to_parameters();

    let t1 = now();
    let collector = crate::collect::collector_for(&params, collector_key)?;
    let query = Query::TimeInterval {
        batch_interval: crate::task::covering_interval(first, last, Duration(3600)),
    };
    let job = collector.start_collection(query).await?;
    let result = loop {
        match collector.poll_once(&job, &query).await? {
            duet_collector::PollOutcome::Ready(r) => break r,
            _ if t1.elapsed() > COLLECT_TIMEOUT => bail!(
                "the collection did not finish within {} s of the last upload",
                COLLECT_TIMEOUT.as_secs()
            ),
            _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    let latency = t1.elapsed().as_secs_f64();
    let total = t0.elapsed().as_secs_f64();
    if result.report_count != n as u64 || result.aggregate != plaintext {
        bail!(
            "the benchmark's aggregate is wrong: {} reports, {}",
            result.report_count,
            result.aggregate
        );
    }
    let cpu1 = cpu_snapshot(&server, &helper_server);
    let cpu_us = |i: usize| (cpu1[i] - cpu0[i]) * 1e6 / n as f64;
    let rss = peak_rss_bytes(server.0.id()) + peak_rss_bytes(helper_server.0.id());
    drop((server, helper_server));
    let e2e = n as f64 / total;
    Ok(Run {
        backend: match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        },
        vdaf: which.name(),
        reports: n,
        history: args.history,
        hpke_open_us: hpke_open * 1e6,
        leader_cpu_us_per_report: leader_cpu * 1e6,
        helper_cpu_us_per_report: helper_cpu * 1e6,
        floor_reports_per_s: floor_rate,
        upload_reports_per_s: n as f64 / upload_alone_s,
        upload_while_aggregating_reports_per_s: n as f64 / upload_s,
        end_to_end_reports_per_s: e2e,
        ratio: e2e / floor_rate,
        collect_latency_s: latency,
        peak_rss_bytes: rss,
        leader_process_cpu_us_per_report: cpu_us(0),
        helper_process_cpu_us_per_report: cpu_us(1),
        client_cpu_us_per_report: cpu_us(2),
    })
}

/// Runs `duet bench`.
pub async fn run(mut args: Args) -> Result<ExitCode> {
    if args.backend.is_empty() {
        args.backend.push(Backend::Sqlite);
    }
    if args.vdaf.is_empty() {
        args.vdaf.push(BenchVdaf::Count);
    }
    if args.reports == 0 {
        bail!("--reports must be at least 1");
    }
    let mut runs = Vec::new();
    for &backend in &args.backend {
        for &vdaf in &args.vdaf {
            if !args.json {
                eprintln!(
                    "running {vdaf:?} on {backend:?} with {} reports…",
                    args.reports
                );
            }
            runs.push(
                run_one(&args, backend, vdaf)
                    .await
                    .with_context(|| format!("{vdaf:?} on {backend:?}"))?,
            );
        }
    }
    if args.json {
        println!("{}", serde_json::json!({ "runs": runs }));
    } else {
        println!(
            "{:<8} {:<20} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "backend",
            "vdaf",
            "reports",
            "HPKE µs",
            "leader µs",
            "helper µs",
            "floor/s",
            "upload/s",
            "upl+agg/s",
            "e2e/s",
            "ratio",
            "latency",
            "peak RSS",
            "L proc µs",
            "H proc µs",
            "client µs"
        );
        for r in &runs {
            println!(
                "{:<8} {:<20} {:>8} {:>8.1} {:>9.1} {:>9.1} {:>9.0} {:>9.0} {:>10.0} {:>9.0} {:>6.2} {:>7.2}s {:>7.0}MB {:>9.1} {:>9.1} {:>9.1}",
                r.backend,
                r.vdaf,
                r.reports,
                r.hpke_open_us,
                r.leader_cpu_us_per_report,
                r.helper_cpu_us_per_report,
                r.floor_reports_per_s,
                r.upload_reports_per_s,
                r.upload_while_aggregating_reports_per_s,
                r.end_to_end_reports_per_s,
                r.ratio,
                r.collect_latency_s,
                r.peak_rss_bytes as f64 / 1e6,
                r.leader_process_cpu_us_per_report,
                r.helper_process_cpu_us_per_report,
                r.client_cpu_us_per_report
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads_give_their_status_and_length() {
        let (status, len) = parse_response_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\ndate: Wed, 25 Nov 2026 00:00:00 GMT\r\n\r\n",
        )
        .expect("a valid head");
        assert_eq!((status, len), (200, 0));
        let (status, len) = parse_response_head(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ncontent-length: 57\r\n\r\n",
        )
        .expect("a valid head");
        assert_eq!((status, len), (400, 57));
    }

    #[test]
    fn response_heads_the_client_cannot_read_are_errors() {
        for head in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.0 200 OK\r\n\r\n",
            b"HTTP/1.1 2x0 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        ] {
            assert!(
                parse_response_head(head).is_err(),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn find_locates_the_end_of_a_head() {
        assert_eq!(find(b"ab\r\n\r\ncd", b"\r\n\r\n"), Some(2));
        assert_eq!(find(b"ab\r\n", b"\r\n\r\n"), None);
    }
}
