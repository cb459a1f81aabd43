//! `duet collect`: collect a batch's aggregate from a task's Leader.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use duet_collector::CollectorError;
use duet_collector::{CollectionResult, Collector, CollectorParameters};
use duet_core::task::{parse_endpoint, TaskParameters};
use duet_core::AggregateResult;
use duet_messages::dap09::{CollectionJobId, Duration, Interval, Query, Time};

/// The exit status of a collection not ready within `--timeout` (the job goes on at the Leader).
const NOT_READY: u8 = 3;

/// `duet collect` flags.
#[derive(clap::Args)]
pub struct Args {
    /// The task file (from `duet task create`).
    #[arg(long)]
    task: PathBuf,
    /// The collector's key file (from `duet keys generate`).
    #[arg(long)]
    key: PathBuf,
    /// Start of the batch interval, seconds since the epoch (a multiple of the time precision).
    #[arg(long)]
    start: u64,
    /// Length of the batch interval in seconds (a multiple of the time precision).
    #[arg(long)]
    duration: u64,
    /// Print one JSON object.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// Print CSV.
    #[arg(long)]
    csv: bool,
    /// Give up after this many seconds (exit status 3: the job goes on at the Leader; poll it
    /// again with `--job`; 1 if the Leader answered the last poll with an error, which is shown).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// The collection job's ID (base64url, as a timed-out `duet collect` names it): polls that
    /// job again, or creates it under this ID. Without it, a new job with a random ID. (An ID
    /// may start with `-`.)
    #[arg(long, allow_hyphen_values = true)]
    job: Option<CollectionJobId>,
}

/// A collector for a task's parameters.
pub fn collector_for(
    params: &TaskParameters,
    keypair: duet_core::hpke::HpkeKeypair,
) -> Result<Collector> {
    let token = params
        .collector_auth_token
        .clone()
        .context("the task file has no collector_auth_token")?;
    let cp = CollectorParameters {
        task_id: params
            .task_id
            .parse()
            .map_err(|_| anyhow::anyhow!("bad task_id in the task file"))?,
        leader_endpoint: parse_endpoint(&params.leader_endpoint)?,
        auth_token: token,
        hpke_keypair: keypair,
    };
    // No redirects: requests carry the collector's token, which a redirect would send to
    // whatever host it names.
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("could not build the HTTP client")?;
    Ok(Collector::new(cp, params.vdaf.clone(), http)?)
}

/// The result as JSON.
pub fn result_json(result: &AggregateResult) -> serde_json::Value {
    match result {
        AggregateResult::Number(n) => number(*n),
        AggregateResult::Vector(v) => {
            serde_json::Value::Array(v.iter().map(|n| number(*n)).collect())
        }
    }
}

fn number(n: u128) -> serde_json::Value {
    match u64::try_from(n) {
        Ok(n) => serde_json::Value::from(n),
        // Larger than JSON numbers are safely read; give the exact digits.
        Err(_) => serde_json::Value::String(n.to_string()),
    }
}

fn print(result: &CollectionResult, json: bool, csv: bool) -> Result<()> {
    if json {
        let doc = serde_json::json!({
            "report_count": result.report_count,
            "interval_start": result.interval.start.0,
            "interval_duration": result.interval.duration.0,
            "result": result_json(&result.aggregate),
        });
        outln!("{doc}");
    } else if csv {
        match &result.aggregate {
            AggregateResult::Number(n) => outln!("value\n{n}"),
            AggregateResult::Vector(v) => {
                outln!("index,value");
                for (i, n) in v.iter().enumerate() {
                    outln!("{i},{n}");
                }
            }
        }
    } else {
        outln!("reports:  {}", result.report_count);
        outln!(
            "interval: {} to {} (seconds since the epoch)",
            result.interval.start.0,
            result.interval.start.0 + result.interval.duration.0
        );
        match &result.aggregate {
            AggregateResult::Number(n) => outln!("result:   {n}"),
            AggregateResult::Vector(v) => {
                outln!("{:>8}  {:>12}", "index", "value");
                for (i, n) in v.iter().enumerate() {
                    outln!("{i:>8}  {n:>12}");
                }
            }
        }
    }
    Ok(())
}

/// Runs `duet collect`.
pub async fn run(args: Args) -> Result<ExitCode> {
    let params = crate::task::read_task_file(&args.task)?;
    let keypair = crate::keys::read_keypair(&args.key)?;
    // Checked before any request: another key could not decrypt the result.
    if keypair.config != duet_core::Task::from_parameters(&params)?.collector_hpke_config {
        anyhow::bail!(
            "{} is not the collector key of the task in {}: pass the key file the task was \
             created with (`duet task create --collector-key`)",
            args.key.display(),
            args.task.display()
        );
    }
    let collector = collector_for(&params, keypair)?;
    let query = Query::TimeInterval {
        batch_interval: Interval {
            start: Time(args.start),
            duration: Duration(args.duration),
        },
    };
    let timeout = std::time::Duration::from_secs(args.timeout);
    let job = args.job.unwrap_or_else(CollectionJobId::random);
    let result = match collector.collect_as(job, query, timeout).await {
        Ok(result) => result,
        // The job goes on at the Leader: say how to come back for it.
        Err(e @ CollectorError::Timeout { .. }) => {
            let failed = matches!(
                e,
                CollectorError::Timeout {
                    last_error: Some(_),
                    ..
                }
            );
            let again = match (failed, args.job.is_some()) {
                (true, _) => format!(
                    "the job has probably failed; its polls answer so (`duet collect` with the \
                     same flags plus `--job {job}` shows it again)"
                ),
                (false, true) => "poll it again with the same command".to_string(),
                (false, false) => format!(
                    "poll it again with `duet collect` and the same flags plus `--job {job}`"
                ),
            };
            eprintln!("error: collection failed: {e}; {again}");
            return Ok(ExitCode::from(timeout_status(&e)));
        }
        Err(e) => return Err(e).context("collection failed"),
    };
    print(&result, args.json, args.csv).map_err(|e| {
        // The job stays finished at the Leader: the result can be fetched again.
        let again = if args.job.is_some() {
            "run the same command again".to_string()
        } else {
            format!("run `duet collect` again with the same flags plus `--job {job}`")
        };
        anyhow::anyhow!("{e}; to get the result, {again}")
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The exit status of a collection that timed out: its own, so that a script can tell "not
/// yet" from a failure; but if the Leader answered the last poll with an error (as a job it gave
/// up on answers every poll), a failure's.
fn timeout_status(e: &CollectorError) -> u8 {
    match e {
        CollectorError::Timeout {
            last_error: Some(_),
            ..
        } => 1,
        _ => NOT_READY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A timeout after pending polls is "not ready" (3); after a failed poll, a failure (1).
    #[test]
    fn a_timeout_after_a_failed_poll_is_a_failure() {
        let timeout = |last_error: Option<&str>| CollectorError::Timeout {
            job: None,
            timeout: std::time::Duration::from_secs(1),
            last_error: last_error.map(str::to_string),
        };
        assert_eq!(timeout_status(&timeout(None)), NOT_READY);
        assert_eq!(timeout_status(&timeout(Some("500"))), 1);
    }
}
