//! `duet upload`: shard, encrypt and upload measurements to a task's Leader.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
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

/// Uploads every measurement with `concurrency` requests in flight (each retried by the client
/// after transient failures). After a failure no new upload starts and those in flight finish;
/// the error then says how many were uploaded and which were not, so that only those are sent
/// again (sending an uploaded one again would count it twice).
pub async fn upload_all(
    client: Arc<Client>,
    measurements: Vec<Measurement>,
    concurrency: usize,
) -> Result<()> {
    let total = measurements.len();
    let pb = progress_bar(total as u64, "uploading");
    let queue = Arc::new(std::sync::Mutex::new(measurements.into_iter().enumerate()));
    let sent: Arc<Vec<AtomicBool>> = Arc::new((0..total).map(|_| AtomicBool::new(false)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, queue, pb) = (Arc::clone(&client), Arc::clone(&queue), pb.clone());
        let (sent, stop) = (Arc::clone(&sent), Arc::clone(&stop));
        workers.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let next = queue
                    .lock()
                    .map_err(|_| anyhow::anyhow!("upload queue poisoned"))?
                    .next();
                let Some((i, m)) = next else {
                    break;
                };
                if let Err(e) = client.upload(&m).await {
                    stop.store(true, Ordering::SeqCst);
                    return Ok(Some((i, e)));
                }
                sent[i].store(true, Ordering::SeqCst);
                pb.inc(1);
            }
            Ok::<_, anyhow::Error>(None)
        });
    }
    let mut failed: Option<(usize, duet_client::ClientError)> = None;
    while let Some(r) = workers.join_next().await {
        if let Some((i, e)) = r.context("an upload worker failed")?? {
            if failed.as_ref().is_none_or(|(j, _)| i < *j) {
                failed = Some((i, e));
            }
        }
    }
    pb.finish_and_clear();
    if let Some((i, e)) = failed {
        let unsent: Vec<usize> = (0..total)
            .filter(|&j| !sent[j].load(Ordering::SeqCst))
            .collect();
        bail!(
            "uploading measurement {} failed: {e}; {} of {total} reports were uploaded, and \
             measurements {} were not (send only those again: an uploaded one sent again would \
             count twice)",
            i + 1,
            total - unsent.len(),
            ranges(&unsent)
        );
    }
    Ok(())
}

/// Measurement numbers (from 1) of the indices `sorted`, as ranges: "3, 7-9".
fn ranges(sorted: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            format!("{}", sorted[i] + 1)
        } else {
            format!("{}-{}", sorted[i] + 1, sorted[j] + 1)
        });
        i = j + 1;
    }
    out.join(", ")
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

#[cfg(test)]
mod tests {
    #[test]
    fn unsent_measurements_are_named_as_ranges() {
        assert_eq!(super::ranges(&[0, 1, 2, 6, 9, 10]), "1-3, 7, 10-11");
        assert_eq!(super::ranges(&[4]), "5");
        assert_eq!(super::ranges(&[]), "");
    }
}
