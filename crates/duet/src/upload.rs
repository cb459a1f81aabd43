//! `duet upload`: shard, encrypt and upload measurements to a task's Leader.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::measurements::{Measurements, MeasurementsFile};
use crate::task::ClientTaskFile;
use duet_client::{Client, ClientParameters};
use duet_core::task::parse_endpoint;
use duet_messages::dap09::Duration;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `duet upload` flags.
#[derive(clap::Args)]
pub struct Args {
    /// The task's client file (from `duet task client-file`; a whole task file works too, but
    /// holds secrets clients must not have).
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
pub async fn client_for(params: &ClientTaskFile) -> Result<Client> {
    let cp = ClientParameters {
        task_id: params
            .task_id
            .parse()
            .map_err(|_| anyhow::anyhow!("bad task_id in the task file"))?,
        leader_endpoint: parse_endpoint(&params.leader_endpoint)?,
        helper_endpoint: parse_endpoint(&params.helper_endpoint)?,
        time_precision: Duration(params.time_precision),
    };
    // A connection that cannot be made fails as such (not as a timeout of a request that may
    // have been sent), so that its measurement is known not to have been uploaded.
    let http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
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

/// Uploads the `total` measurements with `concurrency` requests in flight (each retried by the
/// client after transient failures), taking them from `measurements` as they go. After a
/// failure (an upload's, or a measurement that can no longer be read) no new upload starts and
/// those in flight finish; the error then says how many were uploaded and which were not, so
/// that only those are sent again (sending an uploaded one again would count it twice).
///
/// `lines`, for measurements read from a file, names the file and the line of each, which the
/// error then names them by; without it they are numbered from 1.
pub async fn upload_all(
    client: Arc<Client>,
    total: usize,
    measurements: Measurements,
    lines: Option<(&std::path::Path, &[usize])>,
    concurrency: usize,
) -> Result<()> {
    let pb = progress_bar(total as u64, "uploading");
    let queue = Arc::new(std::sync::Mutex::new(measurements.enumerate()));
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
                // `total` bounds the measurements taken.
                if i >= total {
                    break;
                }
                let outcome = match m {
                    Ok(m) => client.upload(&m).await.map_err(Failure::Upload),
                    Err(e) => Err(Failure::Read(e)),
                };
                if let Err(e) = outcome {
                    stop.store(true, Ordering::SeqCst);
                    return Ok(Some((i, e)));
                }
                sent[i].store(true, Ordering::SeqCst);
                pb.inc(1);
            }
            Ok::<_, anyhow::Error>(None)
        });
    }
    let mut failures: Vec<(usize, Failure)> = Vec::new();
    while let Some(r) = workers.join_next().await {
        if let Some(failure) = r.context("an upload worker failed")?? {
            failures.push(failure);
        }
    }
    pb.finish_and_clear();
    failures.sort_by_key(|(i, _)| *i);
    let Some((i, e)) = failures.first() else {
        return Ok(());
    };
    // Measurements whose upload may have been stored although it failed: not to be sent again
    // blindly.
    let unknown: Vec<usize> = failures
        .iter()
        .filter(|(_, e)| {
            matches!(
                e,
                Failure::Upload(duet_client::ClientError::OutcomeUnknown(_))
            )
        })
        .map(|(j, _)| *j)
        .collect();
    let unsent: Vec<usize> = (0..total)
        .filter(|&j| !sent[j].load(Ordering::SeqCst) && !unknown.contains(&j))
        .collect();
    let uploaded = total - unsent.len() - unknown.len();
    let (source, number): (String, Box<dyn Fn(usize) -> usize>) = match lines {
        Some((path, lines)) => (
            format!(" of {}", crate::measurements::source_name(path)),
            Box::new(move |j| lines[j]),
        ),
        None => (String::new(), Box::new(|j| j + 1)),
    };
    let (one, many) = if lines.is_some() {
        ("the measurement on line", "those on lines")
    } else {
        ("measurement", "measurements")
    };
    let named = |js: &[usize]| {
        let numbers: Vec<usize> = js.iter().map(|&j| number(j)).collect();
        format!("{many} {}{source}", ranges(&numbers))
    };
    let mut parts = Vec::new();
    if !unsent.is_empty() {
        parts.push(format!(
            "{} were not (send only those again: an uploaded one sent again would count twice)",
            named(&unsent)
        ));
    }
    if !unknown.is_empty() {
        parts.push(format!(
            "{} may have been (an attempt's answer was lost, or was a server error: sending \
             them again may count them twice)",
            named(&unknown)
        ));
    }
    let last = parts.pop().unwrap_or_default();
    let mut outcome = format!("{uploaded} of {total} reports were uploaded");
    for part in parts {
        outcome += &format!(", {part}");
    }
    outcome += &format!(", and {last}");
    bail!(
        "uploading {one} {}{source} failed: {e}; {outcome}",
        number(*i)
    );
}

/// Why an upload worker stopped.
enum Failure {
    /// The upload failed.
    Upload(duet_client::ClientError),
    /// The measurement could not be read (its file changed after it was checked).
    Read(anyhow::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Upload(e) => e.fmt(f),
            Failure::Read(e) => e.fmt(f),
        }
    }
}

/// Ascending numbers as ranges of consecutive ones: "3, 7-9".
fn ranges(sorted: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            format!("{}", sorted[i])
        } else {
            format!("{}-{}", sorted[i], sorted[j])
        });
        i = j + 1;
    }
    out.join(", ")
}

/// Runs `duet upload`.
pub async fn run(args: Args) -> Result<ExitCode> {
    let params = crate::task::read_client_task_file(&args.task)?;
    let file = MeasurementsFile::check(&args.measurements, &params.vdaf)?;
    let n = file.len();
    let client = Arc::new(client_for(&params).await?);
    let lines: Vec<usize> = file.lines().to_vec();
    let lines = Some((args.measurements.as_path(), lines.as_slice()));
    upload_all(client, n, file.measurements()?, lines, args.concurrency).await?;
    eprintln!("uploaded {n} reports to {}", params.leader_endpoint);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use duet_core::hpke::HpkeKeypair;
    use duet_core::{RealClock, VdafInstance};
    use duet_messages::dap09::{HpkeConfigId, TaskId};

    use super::*;

    /// A Prio3Count client of the aggregators at `leader`, with keys of its own (no request).
    fn client_of(leader: url::Url) -> Client {
        let params = ClientParameters {
            task_id: TaskId([3; 32]),
            leader_endpoint: leader.clone(),
            helper_endpoint: leader,
            time_precision: Duration(3600),
        };
        let config = || HpkeKeypair::generate(HpkeConfigId(1)).config;
        Client::with_hpke_configs(
            params,
            VdafInstance::Prio3Count,
            reqwest::Client::new(),
            RealClock,
            config(),
            config(),
        )
        .expect("client")
    }

    /// A failed upload names the measurements not sent by their lines in the file they came
    /// from (comments and blank lines are not measurements), so that exactly those can be sent
    /// again.
    #[tokio::test]
    async fn a_failed_upload_names_the_lines_not_sent() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.txt");
        // Written by an editor that begins UTF-8 files with a byte-order mark.
        std::fs::write(&path, "\u{feff}# counts\n1\n0\n\n1\n").expect("write");
        let file = MeasurementsFile::check(&path, &VdafInstance::Prio3Count).expect("read");
        let lines = file.lines().to_vec();
        assert_eq!(lines, [2, 3, 5]);
        let leader = duet_core::http::testing::answer_once(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\n\
             connection: close\r\n\r\n\
             {\"type\":\"urn:ietf:params:ppm:dap:error:invalidMessage\",\"detail\":\"no\"}",
        )
        .await;
        let client = client_of(leader);
        let measurements = file.measurements().expect("reopen");
        let e = upload_all(Arc::new(client), 3, measurements, Some((&path, &lines)), 1)
            .await
            .expect_err("refused");
        let file = path.display();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "uploading the measurement on line 2 of {file} failed"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "0 of 3 reports were uploaded, and those on lines 2-3, 5 of {file} were not"
            )),
            "{text}"
        );
    }

    /// A measurement whose upload failed after an attempt that may have been stored (here the
    /// Leader answers 503 every time) is named apart from those not sent, as one that may have
    /// been uploaded.
    #[tokio::test]
    async fn an_upload_whose_answer_was_lost_is_named_apart() {
        let leader = duet_core::http::testing::answer_always(
            "HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        let client = client_of(leader);
        let measurements = Box::new(std::iter::repeat_with(|| {
            Ok(duet_core::Measurement::Count(true))
        }));
        let e = upload_all(Arc::new(client), 2, measurements, None, 1)
            .await
            .expect_err("refused");
        let text = e.to_string();
        assert!(
            text.contains(
                "0 of 2 reports were uploaded, measurements 2 were not (send only those again"
            ),
            "{text}"
        );
        assert!(text.contains("and measurements 1 may have been"), "{text}");
    }

    /// A measurements file that changes during the upload stops it where it changed, and the
    /// error names what was uploaded and what was not, by line.
    #[tokio::test]
    async fn a_file_changed_during_the_upload_stops_it() {
        let leader = duet_core::http::testing::answer_always(
            "HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        let client = client_of(leader);
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.txt");
        std::fs::write(&path, "1\n0\n1\n").expect("write");
        let file = MeasurementsFile::check(&path, &VdafInstance::Prio3Count).expect("read");
        let lines = file.lines().to_vec();
        std::fs::write(&path, "1\nyes\n1\n").expect("rewrite");
        let measurements = file.measurements().expect("reopen");
        let e = upload_all(Arc::new(client), 3, measurements, Some((&path, &lines)), 1)
            .await
            .expect_err("stopped");
        let file = path.display();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "uploading the measurement on line 2 of {file} failed: {file} changed after it \
                 was checked: line 2"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "1 of 3 reports were uploaded, and those on lines 2-3 of {file} were not"
            )),
            "{text}"
        );
    }

    #[test]
    fn unsent_measurements_are_named_as_ranges() {
        assert_eq!(super::ranges(&[1, 2, 3, 7, 10, 11]), "1-3, 7, 10-11");
        assert_eq!(super::ranges(&[5]), "5");
        assert_eq!(super::ranges(&[]), "");
    }
}
