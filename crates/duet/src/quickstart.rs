//! `duet quickstart`: the whole pipeline in one process. Leader and Helper serve on loopback over
//! one SQLite file; the real HTTP client uploads; the real collector collects; the private
//! aggregate is printed next to the plaintext one.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use duet_aggregator::server::{RoleConfig, Roles};
use duet_aggregator::AggregatorConfig;
use duet_core::hpke::HpkeKeypair;
use duet_core::{AggregatorRole, Clock, Measurement, RealClock, VdafInstance};
use duet_messages::dap09::{Duration, HpkeConfigId, Query};
use rand::{Rng, SeedableRng};

use crate::vdaf_args::VdafArgs;

/// `duet quickstart` flags.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    vdaf: VdafArgs,
    /// Number of generated measurements.
    #[arg(long, default_value_t = 1000, conflicts_with = "measurements")]
    reports: usize,
    /// Read measurements from this file (one per line) instead of generating them.
    #[arg(long)]
    measurements: Option<PathBuf>,
    /// Seed for generated measurements.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// SQLite file to use (default: a temporary file, removed afterwards).
    #[arg(long)]
    db: Option<String>,
    /// Print exactly one JSON object on standard output.
    #[arg(long)]
    json: bool,
}

fn generate(vdaf: &VdafInstance, n: usize, seed: u64) -> Vec<Measurement> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let max = |bits: usize| {
        if bits >= 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        }
    };
    (0..n)
        .map(|_| match vdaf {
            VdafInstance::Prio3Count => Measurement::Count(rng.gen_bool(0.5)),
            VdafInstance::Prio3Sum { bits } => Measurement::Sum(rng.gen_range(0..=max(*bits))),
            VdafInstance::Prio3SumVec { bits, length, .. } => Measurement::SumVec(
                (0..*length)
                    .map(|_| rng.gen_range(0..=max(*bits)))
                    .collect(),
            ),
            VdafInstance::Prio3Histogram { length, .. } => {
                Measurement::Histogram(rng.gen_range(0..*length))
            }
        })
        .collect()
}

#[allow(clippy::disallowed_methods)] // Wall time for the summary only.
fn stopwatch() -> std::time::Instant {
    std::time::Instant::now()
}

/// Runs `duet quickstart`.
pub async fn run(args: Args) -> Result<ExitCode> {
    let vdaf = args.vdaf.instance()?;
    let (measurements, lines) = match &args.measurements {
        Some(path) => {
            let (measurements, lines) = crate::measurements::read_all(path, &vdaf)?;
            (measurements, Some((path.as_path(), lines)))
        }
        None => {
            if args.reports == 0 {
                bail!("--reports must be at least 1");
            }
            (generate(&vdaf, args.reports, args.seed), None)
        }
    };
    let n = measurements.len();
    let plaintext = vdaf.plaintext_aggregate(&measurements)?;

    let tmp = tempfile::tempdir().context("could not create a temporary directory")?;
    let db = match &args.db {
        Some(p) => p.clone(),
        None => tmp.path().join("duet.sqlite").display().to_string(),
    };
    let leader_store = crate::db::open(&db, AggregatorRole::Leader).await?;
    let helper_store = crate::db::open(&db, AggregatorRole::Helper).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("could not bind a loopback port")?;
    let addr = listener.local_addr()?;
    let config = AggregatorConfig {
        polling_interval_ms: 500,
        ..AggregatorConfig::default()
    };
    let clock: Arc<dyn Clock> = Arc::new(RealClock);
    let roles = Roles {
        leader: Some(RoleConfig {
            store: Arc::clone(&leader_store),
            path_prefix: "/leader".into(),
        }),
        helper: Some(RoleConfig {
            store: Arc::clone(&helper_store),
            path_prefix: "/helper".into(),
        }),
    };
    let server = duet_aggregator::run(listener, roles, config, Arc::clone(&clock)).await?;
    let leader_url = format!("http://{addr}/leader/");
    let helper_url = format!("http://{addr}/helper/");

    let outcome = async {
        let collector_key = HpkeKeypair::generate(HpkeConfigId(1));
        let time_precision = 3600;
        let task = crate::task::new_task(
            &leader_url,
            &helper_url,
            vdaf.clone(),
            collector_key.config.clone(),
            n as u64,
            time_precision,
            1,
            None,
        )?;
        leader_store.put_task(&task).await?;
        let mut helper_task = task.clone();
        helper_task.collector_auth_token = None;
        helper_store.put_task(&helper_task).await?;
        let params = task.to_parameters();
        if !args.json {
            outln!("Duet quickstart: {vdaf}, {n} reports");
            outln!("  Leader   {leader_url}");
            outln!("  Helper   {helper_url}");
            outln!("  database {db}");
        }

        let started = clock.now();
        let t0 = stopwatch();
        let client = Arc::new(crate::upload::client_for(&(&params).into()).await?);
        let lines = lines
            .as_ref()
            .map(|(path, lines)| (*path, lines.as_slice()));
        let all = Box::new(measurements.into_iter().map(Ok));
        crate::upload::upload_all(client, n, all, lines, 16).await?;
        let uploaded_in = t0.elapsed();
        let finished = clock.now();
        if !args.json {
            outln!(
                "uploaded  {n} reports in {:.2} s",
                uploaded_in.as_secs_f64()
            );
        }

        let t1 = stopwatch();
        let collector = crate::collect::collector_for(&params, collector_key)?;
        let batch_interval =
            crate::task::covering_interval(started, finished, Duration(time_precision));
        let result = collector
            .collect(
                Query::TimeInterval { batch_interval },
                std::time::Duration::from_secs(300),
            )
            .await
            .context("collection failed")?;
        let collected_in = t1.elapsed();
        anyhow::Ok((result, uploaded_in, collected_in))
    }
    .await;
    server.shutdown().await?;
    drop(tmp);
    let (result, _, collected_in) = outcome?;

    let matches = result.aggregate == plaintext && result.report_count == n as u64;
    if args.json {
        let doc = serde_json::json!({
            "vdaf": args.vdaf.vdaf.name(),
            "report_count": result.report_count,
            "result": crate::collect::result_json(&result.aggregate),
            "plaintext": crate::collect::result_json(&plaintext),
        });
        outln!("{doc}");
    } else {
        outln!(
            "collected {} reports in {:.2} s",
            result.report_count,
            collected_in.as_secs_f64()
        );
        outln!("private aggregate: {}", result.aggregate);
        outln!("plaintext:         {plaintext}");
        outln!(
            "{}",
            if matches {
                "✔ the private aggregate equals the plaintext"
            } else {
                "✘ MISMATCH"
            }
        );
    }
    Ok(if matches {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
