//! `duet bench`: reproducible throughput, latency and memory figures on this machine.
//!
//! For each backend and VDAF it measures, in one run:
//! * the *floor*: single-threaded CPU per report of the Leader's and the Helper's cryptography
//!   (HPKE open, VDAF preparation, accumulation), on pre-generated reports, the fastest of
//!   five passes;
//! * *upload*: reports/s the Leader accepts over HTTP from `--concurrency` connections, on its
//!   own: the reports go to a server that runs no jobs (`run_jobs = false`), and are then
//!   deleted again;
//! * *end to end*: the same reports uploaded to a full server, from the first upload to a
//!   finished collection, with the rate uploads were accepted at meanwhile, and the latency from
//!   the last upload to the finished collection;
//! * the full server process's peak RSS, and each process's CPU per report over the uploads
//!   alone and end to end.
//!
//! Leader and Helper run as two child `duet serve` processes, as two organisations would run them:
//! on SQLite each has its own database file; on PostgreSQL they share the `--database` (each
//! role's rows carry the role). Their memory is measured apart from the bench's. Report
//! generation is not timed. Each timed phase starts on a settled database (`sync`, and a
//! `CHECKPOINT` on PostgreSQL), so that its figure does not depend on the runs before it.
//! `--repeat N` runs every case N times, in rounds, and adds each case's medians.

mod medians;
mod servers;
mod uploader;
mod workload;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use duet_core::hpke::HpkeKeypair;
use duet_core::{AggregatorRole, VdafInstance};
use duet_messages::dap09::{Duration, HpkeConfigId, Query, Report, TaskId};
use duet_messages::Encode;

use servers::{cpu_snapshot, cpu_us_per_report, peak_rss_bytes, start_server, ServerRole};
use uploader::upload_all;
use workload::{add_helper_history, add_leader_history, floor, generate, settle};

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

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "SQLite",
            Self::Postgres => "PostgreSQL",
        }
    }
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

/// A flag value as written on the command line (`sqlite`, `sumvec`, …).
fn flag_value(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_owned())
}

/// Upload connections by default. At 64 the cores idled a quarter of the time while uploads
/// alone ran (SQLite Prio3Count: about 150 % of the two busy); at 256 they are busy (175–180 %),
/// and the end-to-end latencies stay well under the 2 s target (see `BENCHMARKS.md`).
const DEFAULT_CONCURRENCY: usize = 256;

/// The upload connections a run opens: `--concurrency`, but no more than there are reports (each
/// connection is opened for its first upload).
fn connections(args: &Args) -> usize {
    args.concurrency.clamp(1, args.reports.max(1))
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
    /// Concurrent upload connections, each with one upload in flight, in both the upload and
    /// the end-to-end phase. A Leader open to the public serves many clients at once; with fewer
    /// connections than its commits group, the uploads measure the clients' round trips (each
    /// waits for its batch's durable commit) rather than what the Leader can take.
    #[arg(long, default_value_t = DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Reports used to measure the floor (in each of its five passes).
    #[arg(long, default_value_t = 500)]
    floor_reports: usize,
    /// Reports of the measured task, aggregated long ago, to put in both databases before each
    /// run's end-to-end phase, to measure whether cost grows with history.
    #[arg(long, default_value_t = 0)]
    history: usize,
    /// When SQLite's log is synced: `commit` (every commit durable, as `duet serve` does by
    /// default) or `checkpoint` (not durable against a machine crash; the bench warns).
    #[arg(long, value_enum, default_value = "commit")]
    sqlite_sync: crate::serve::SqliteSync,
    /// The page size of the SQLite databases the bench creates, as `duet serve`'s
    /// `sqlite_page_size` (8192 by default).
    #[arg(long, value_parser = crate::db::parse_page_size)]
    sqlite_page_size: Option<u32>,
    /// Runs of each case (backend and VDAF), in rounds: every case once, then again, so that a
    /// slow spell of a shared machine falls on all of them. With more than one, each case's
    /// medians follow the runs (`medians` in `--json`). PostgreSQL runs share `--database`, so
    /// later rounds find the earlier rounds' rows there.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Append each server's log (its standard error, at the level `RUST_LOG` sets) to files in
    /// this directory, named by backend, VDAF and role.
    #[arg(long)]
    server_logs: Option<std::path::PathBuf>,
    /// Print exactly one JSON object.
    #[arg(long)]
    json: bool,
}

/// One run's figures.
#[derive(serde::Serialize)]
struct Run {
    backend: String,
    vdaf: &'static str,
    reports: usize,
    history: usize,
    /// Upload connections opened ([`connections`]).
    concurrency: usize,
    hpke_open_us: f64,
    leader_cpu_us_per_report: f64,
    helper_cpu_us_per_report: f64,
    floor_reports_per_s: f64,
    upload_reports_per_s: f64,
    /// CPU time (user and system) per report of the Leader's process and of the bench process
    /// (the upload client) over the uploads alone.
    upload_leader_cpu_us_per_report: f64,
    upload_client_cpu_us_per_report: f64,
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
    /// The Leader's database: its engine, version, and the settings that decide the cost of a
    /// commit (`Datastore::settings`).
    #[serde(serialize_with = "pairs_as_map")]
    database: Vec<(String, String)>,
}

/// (name, value) pairs as a JSON object.
fn pairs_as_map<S: serde::Serializer>(
    pairs: &[(String, String)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(pairs.iter().map(|(name, value)| (name, value)))
}

/// Settings under which a commit is not durable: a run with them measures another system.
fn non_durable(settings: &[(String, String)]) -> Vec<String> {
    settings
        .iter()
        .filter(|(name, value)| match name.as_str() {
            "fsync" | "full_page_writes" => value == "off",
            // `local`, `remote_write` and `remote_apply` wait for the local flush too.
            "synchronous_commit" => value == "off",
            "synchronous" => value == "OFF",
            // SQLite's log synced only around checkpoints.
            "log_sync" => value == "checkpoint",
            _ => false,
        })
        .map(|(name, value)| format!("{name} = {value}"))
        .collect()
}

#[allow(clippy::disallowed_methods)] // Benchmarks measure elapsed wall and CPU time.
fn now() -> std::time::Instant {
    std::time::Instant::now()
}

/// How long the bench waits for the collection after the last upload before it gives up.
const COLLECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The SQLite settings of a run on `backend`: as lines of the servers' config, and for the
/// bench's own openings of their databases.
fn sqlite_setup(backend: Backend, args: &Args) -> (String, duet_store::sqlite::SqliteSetup) {
    let mut setup = duet_store::sqlite::SqliteSetup::default();
    let mut lines = String::new();
    if backend == Backend::Sqlite {
        setup.log_sync = args.sqlite_sync.into();
        if args.sqlite_sync == crate::serve::SqliteSync::Checkpoint {
            lines.push_str("sqlite_sync = \"checkpoint\"\n");
        }
        if let Some(size) = args.sqlite_page_size {
            setup.page_size = Some(size);
            lines.push_str(&format!("sqlite_page_size = {size}\n"));
        }
    }
    (lines, setup)
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
    // The task's ID comes first: its history goes in before its servers start. (The Leader's
    // part goes in after the uploads-alone phase, whose reports are deleted with the task.)
    let task_id = TaskId::random();
    let (settings, sqlite) = sqlite_setup(backend, args);
    if args.history > 0 {
        add_helper_history(&helper_db, sqlite, task_id, args.history).await?;
    }
    // The Helper for the whole run, and first a Leader that only serves uploads: the task names
    // it, and the client reads the Leader's HPKE config from it (the full Leader started later
    // has the same keys, from the same database).
    let prefix = format!("{}-{}", flag_value(backend), flag_value(which));
    let logs = args
        .server_logs
        .as_deref()
        .map(|dir| (dir, prefix.as_str()));
    let start = |database: &str, role| start_server(dir.path(), database, &settings, role, logs);
    let (helper_server, helper_base) = start(&helper_db, ServerRole::Helper)?;
    let (api_server, base) = start(&leader_db, ServerRole::Leader { jobs: false })?;
    let leader_url = format!("{base}/leader/");
    let helper_url = format!("{helper_base}/helper/");

    let collector_key = HpkeKeypair::generate(HpkeConfigId(1));
    let n = args.reports;
    let mut task = crate::task::new_task(
        &leader_url,
        &helper_url,
        vdaf.clone(),
        collector_key.config.clone(),
        n as u64,
        3600,
        1,
        None,
    )?;
    let leader_store = crate::db::open_with(&leader_db, AggregatorRole::Leader, sqlite).await?;
    let helper_store = crate::db::open_with(&helper_db, AggregatorRole::Helper, sqlite).await?;
    task.id = task_id;
    leader_store.put_task(&task).await?;
    let settings = leader_store.settings().await?;
    let unsafe_settings = non_durable(&settings);
    if !unsafe_settings.is_empty() {
        eprintln!(
            "warning: the database runs with {}: commits are not durable, so these figures are \
             not comparable with a durable setup",
            unsafe_settings.join(", ")
        );
    }
    let helper_task = |task: &duet_core::Task| {
        let mut t = task.clone();
        t.collector_auth_token = None;
        t
    };
    helper_store.put_task(&helper_task(&task)).await?;
    let params = task.to_parameters();
    let client = Arc::new(crate::upload::client_for(&(&params).into()).await?);

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

    let bodies: Arc<[bytes::Bytes]> = reports
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
    settle(&leader_db).await;
    let upload_cpu0 = cpu_snapshot(&[&api_server]);
    let upload_alone_s = upload_all(&url, &bodies, args.concurrency, "uploading").await?;
    let upload_cpu_us = cpu_us_per_report(&upload_cpu0, &cpu_snapshot(&[&api_server]), n);
    drop(api_server);
    leader_store.delete_task(&task.id).await?;
    if args.history > 0 {
        add_leader_history(&leader_db, task_id, args.history).await?;
    }
    settle(&leader_db).await;

    // The same reports, end to end, through a full Leader. (The Helper's copy of the task still
    // names the first Leader, which the Helper never contacts.)
    let (server, base) = start(&leader_db, ServerRole::Leader { jobs: true })?;
    task.leader_endpoint = format!("{base}/leader/").parse()?;
    leader_store.put_task(&task).await?;
    let url = task
        .leader_endpoint
        .join(&format!("tasks/{}/reports", task.id))?;
    let cpu0 = cpu_snapshot(&[&server, &helper_server]);
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
    let cpu_us = cpu_us_per_report(&cpu0, &cpu_snapshot(&[&server, &helper_server]), n);
    let rss = peak_rss_bytes(server.0.id()) + peak_rss_bytes(helper_server.0.id());
    drop((server, helper_server));
    let e2e = n as f64 / total;
    Ok(Run {
        backend: flag_value(backend),
        vdaf: which.name(),
        reports: n,
        history: args.history,
        concurrency: connections(args),
        hpke_open_us: hpke_open * 1e6,
        leader_cpu_us_per_report: leader_cpu * 1e6,
        helper_cpu_us_per_report: helper_cpu * 1e6,
        floor_reports_per_s: floor_rate,
        upload_reports_per_s: n as f64 / upload_alone_s,
        upload_leader_cpu_us_per_report: upload_cpu_us[0],
        upload_client_cpu_us_per_report: upload_cpu_us[1],
        upload_while_aggregating_reports_per_s: n as f64 / upload_s,
        end_to_end_reports_per_s: e2e,
        ratio: e2e / floor_rate,
        collect_latency_s: latency,
        peak_rss_bytes: rss,
        leader_process_cpu_us_per_report: cpu_us[0],
        helper_process_cpu_us_per_report: cpu_us[1],
        client_cpu_us_per_report: cpu_us[2],
        database: settings,
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
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    if let Some(dir) = &args.server_logs {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create the --server-logs directory {}",
                dir.display()
            )
        })?;
    }
    let mut runs = Vec::new();
    for round in 1..=args.repeat {
        let of = if args.repeat > 1 {
            format!(" (round {round} of {})", args.repeat)
        } else {
            String::new()
        };
        for &backend in &args.backend {
            for &vdaf in &args.vdaf {
                if !args.json {
                    eprintln!(
                        "running {} on {} with {} reports{of}…",
                        vdaf.name(),
                        backend.name(),
                        args.reports
                    );
                }
                runs.push(
                    run_one(&args, backend, vdaf)
                        .await
                        .with_context(|| format!("{} on {}", vdaf.name(), backend.name()))?,
                );
            }
        }
    }
    let medians = (args.repeat > 1).then(|| medians::medians(&runs));
    if args.json {
        let mut out = serde_json::json!({ "runs": runs });
        if let Some(medians) = &medians {
            out["medians"] = serde_json::json!(medians);
        }
        outln!("{out}");
    } else {
        outln!(
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
            outln!(
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
        if let Some(medians) = &medians {
            print_medians(medians)?;
        }
        outln!(
            "uploads over {} connections, one upload in flight on each",
            connections(&args)
        );
        let mut shown = Vec::new();
        for r in &runs {
            if !shown.contains(&&r.backend) {
                shown.push(&r.backend);
                let settings: Vec<String> = r
                    .database
                    .iter()
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect();
                outln!("{} database: {}", r.backend, settings.join(" "));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The table of each case's medians.
fn print_medians(medians: &[medians::Medians]) -> Result<()> {
    outln!(
        "\n{:<8} {:<20} {:>5} {:>9} {:>9} {:>10} {:>9} {:>6} {:>8} {:>8} {:>9}",
        "medians",
        "vdaf",
        "runs",
        "floor/s",
        "upload/s",
        "L upl µs",
        "e2e/s",
        "ratio",
        "upl÷e2e",
        "latency",
        "peak RSS"
    );
    for m in medians {
        outln!(
            "{:<8} {:<20} {:>5} {:>9.0} {:>9.0} {:>10.1} {:>9.0} {:>6.3} {:>8.2} {:>7.2}s {:>7.0}MB",
            m.backend,
            m.vdaf,
            m.runs,
            m.floor_reports_per_s,
            m.upload_reports_per_s,
            m.upload_leader_cpu_us_per_report,
            m.end_to_end_reports_per_s,
            m.ratio,
            m.upload_over_end_to_end,
            m.collect_latency_s,
            m.peak_rss_bytes as f64 / 1e6
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::non_durable;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// Only the settings that let a commit return before its data is on disk are flagged.
    #[test]
    fn flags_settings_that_make_commits_not_durable() {
        let durable = pairs(&[
            ("engine", "postgresql"),
            ("fsync", "on"),
            ("synchronous_commit", "on"),
            ("full_page_writes", "on"),
            ("shared_buffers", "128MB"),
        ]);
        assert!(non_durable(&durable).is_empty());
        for waits in ["local", "remote_write", "remote_apply"] {
            assert!(non_durable(&pairs(&[("synchronous_commit", waits)])).is_empty());
        }
        // SQLite's NORMAL with the log synced at each commit by Duet itself.
        assert!(
            non_durable(&pairs(&[("synchronous", "NORMAL"), ("log_sync", "commit")])).is_empty()
        );
        assert_eq!(
            non_durable(&pairs(&[("log_sync", "checkpoint")])),
            ["log_sync = checkpoint"]
        );
        assert_eq!(
            non_durable(&pairs(&[
                ("fsync", "off"),
                ("synchronous_commit", "off"),
                ("full_page_writes", "off"),
                ("synchronous", "OFF"),
            ])),
            [
                "fsync = off",
                "synchronous_commit = off",
                "full_page_writes = off",
                "synchronous = OFF"
            ]
        );
    }
}
