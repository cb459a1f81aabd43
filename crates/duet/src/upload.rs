//! `duet upload`: shard, encrypt and upload measurements to a task's Leader.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use duet_client::{Client, ClientParameters};
use duet_core::task::{parse_endpoint, TaskParameters};
use duet_core::Measurement;
use duet_messages::dap09::Duration;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `duet upload` flags.
#[derive(clap::Args)]
pub struct Args {
    /// The task file (from `duet task create`).
    #[arg(long)]
    task: PathBuf,
    /// Measurements, one per line; `-` reads standard input.
    #[arg(long, default_value = "-")]
    measurements: PathBuf,
    /// Uploads in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

/// A client for a task's parameters.
pub async fn client_for(params: &TaskParameters) -> Result<Client> {
    let cp = ClientParameters {
        task_id: params
            .task_id
            .parse()
            .map_err(|_| anyhow::anyhow!("bad task_id in the task file"))?,
        leader_endpoint: parse_endpoint(&params.leader_endpoint)?,
        helper_endpoint: parse_endpoint(&params.helper_endpoint)?,
        time_precision: Duration(params.time_precision),
    };
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .context("could not build the HTTP client")?;
    Client::new(cp, params.vdaf.clone(), http).await.context(
        "could not fetch the aggregators' HPKE configs (are the Leader and Helper running?)",
    )
}

/// A progress bar on standard error, hidden when standard output is not a terminal.
pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if std::io::stdout().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::stderr());
    } else {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) =
        ProgressStyle::with_template("{msg:10} [{bar:40}] {pos}/{len} ({per_sec}, {eta})")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// Uploads every measurement with `concurrency` requests in flight; fails on the first error.
pub async fn upload_all(
    client: Arc<Client>,
    measurements: Vec<Measurement>,
    concurrency: usize,
) -> Result<()> {
    let pb = progress_bar(measurements.len() as u64, "uploading");
    let queue = Arc::new(std::sync::Mutex::new(measurements.into_iter().enumerate()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let client = Arc::clone(&client);
        let queue = Arc::clone(&queue);
        let pb = pb.clone();
        workers.spawn(async move {
            loop {
                let next = queue
                    .lock()
                    .map_err(|_| anyhow::anyhow!("upload queue poisoned"))?
                    .next();
                let Some((i, m)) = next else {
                    return Ok::<(), anyhow::Error>(());
                };
                client
                    .upload(&m)
                    .await
                    .with_context(|| format!("uploading measurement {} failed", i + 1))?;
                pb.inc(1);
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.context("an upload worker failed")??;
    }
    pb.finish_and_clear();
    Ok(())
}

/// Runs `duet upload`.
pub async fn run(args: Args) -> Result<ExitCode> {
    let params = crate::task::read_task_file(&args.task)?;
    let measurements = crate::task::read_measurements(&args.measurements, &params.vdaf)?;
    let n = measurements.len();
    let client = Arc::new(client_for(&params).await?);
    upload_all(client, measurements, args.concurrency).await?;
    eprintln!("uploaded {n} reports to {}", params.leader_endpoint);
    Ok(ExitCode::SUCCESS)
}
