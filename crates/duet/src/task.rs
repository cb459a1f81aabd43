//! `duet task`: provision tasks. A task is created once and handed out of band to the Leader,
//! the Helper and the collector; clients get its public part (`duet task client-file`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use duet_core::task::{QueryTypeConfig, Task, TaskParameters};
use duet_core::{AggregatorRole, AuthenticationToken};
use duet_messages::dap09::{Duration, HpkeConfig, TaskId, Time};
use duet_messages::Decode;

use crate::vdaf_args::VdafArgs;

/// Which aggregator a database serves.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RoleArg {
    /// The Leader.
    Leader,
    /// The Helper.
    Helper,
}

impl From<RoleArg> for AggregatorRole {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Leader => AggregatorRole::Leader,
            RoleArg::Helper => AggregatorRole::Helper,
        }
    }
}

/// Task commands.
#[derive(Subcommand)]
pub enum Command {
    /// Create a new task: prints its parameters as JSON (with fresh IDs, keys and tokens).
    Create {
        /// The Leader's DAP endpoint.
        #[arg(long)]
        leader_url: String,
        /// The Helper's DAP endpoint.
        #[arg(long)]
        helper_url: String,
        #[command(flatten)]
        vdaf: VdafArgs,
        /// The collector's key file (from `duet keys generate`).
        #[arg(long, conflicts_with = "collector_hpke_config")]
        collector_key: Option<PathBuf>,
        /// The collector's HPKE config, base64url-encoded.
        #[arg(long)]
        collector_hpke_config: Option<String>,
        /// Smallest batch that may be collected.
        #[arg(long, default_value_t = 100)]
        min_batch_size: u64,
        /// Granularity of report timestamps and batch intervals, in seconds.
        #[arg(long, default_value_t = 3600)]
        time_precision: u64,
        /// How often a batch may be collected.
        #[arg(long, default_value_t = 1)]
        max_batch_query_count: u64,
        /// Reports after this time (seconds since the epoch) are refused.
        #[arg(long)]
        task_expiration: Option<u64>,
        /// Reports older than this many seconds when they are uploaded are refused (at least
        /// --time-precision, since report times are rounded down to it).
        #[arg(long)]
        report_expiry_age: Option<u64>,
        /// Write the parameters here instead of standard output (readable by its owner only:
        /// they hold the task's tokens and verify key).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace the file if it exists.
        #[arg(long, requires = "out")]
        force: bool,
    },
    /// Write the part of a task file clients need, and nothing secret: the task ID, the
    /// aggregators' endpoints, the VDAF and the time precision. Hand clients this file; the
    /// task file itself holds the verify key and the aggregators' token, which let whoever
    /// holds them pass invalid measurements or pose as the Leader.
    ClientFile {
        /// The task file (from `duet task create`).
        task: PathBuf,
        /// Write it here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace the file if it exists.
        #[arg(long, requires = "out")]
        force: bool,
    },
    /// Store a task (a JSON file from `duet task create`) in an aggregator's database.
    Import {
        /// The task file.
        file: PathBuf,
        /// The database (SQLite path).
        #[arg(long, env = "DUET_DATABASE")]
        db: String,
        /// The role this database serves for the task.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The page size of a SQLite database this import creates, as `duet serve`'s
        /// `sqlite_page_size` (8192 by default; an existing database keeps its own).
        #[arg(long, value_parser = crate::db::parse_page_size)]
        sqlite_page_size: Option<u32>,
    },
    /// List the tasks in an aggregator's database.
    List {
        /// The database (SQLite path).
        #[arg(long, env = "DUET_DATABASE")]
        db: String,
        /// The role.
        #[arg(long, value_enum)]
        role: RoleArg,
    },
}

/// What a client needs of a task, and nothing secret (`duet task client-file`). A whole task
/// file reads as one too.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ClientTaskFile {
    /// Task ID (base64url, 32 bytes).
    pub task_id: String,
    /// Leader endpoint URL.
    pub leader_endpoint: String,
    /// Helper endpoint URL.
    pub helper_endpoint: String,
    /// VDAF.
    pub vdaf: duet_core::VdafInstance,
    /// Time precision, seconds: report times are rounded down to a multiple of it.
    pub time_precision: u64,
}

impl From<&TaskParameters> for ClientTaskFile {
    fn from(p: &TaskParameters) -> Self {
        Self {
            task_id: p.task_id.clone(),
            leader_endpoint: p.leader_endpoint.clone(),
            helper_endpoint: p.helper_endpoint.clone(),
            vdaf: p.vdaf.clone(),
            time_precision: p.time_precision,
        }
    }
}

/// Reads a client file (`duet task client-file`) or a whole task file, and checks what a client
/// uses of it as the aggregators would.
pub fn read_client_task_file(path: &std::path::Path) -> Result<ClientTaskFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("could not read {}", path.display()))?;
    let params: ClientTaskFile = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a task file (from `duet task client-file` or `duet task create`)",
            path.display()
        )
    })?;
    let invalid = |what: String| {
        anyhow::anyhow!(
            "{} is not a valid task: {what} (write a new one with `duet task create`)",
            path.display()
        )
    };
    params
        .task_id
        .parse::<TaskId>()
        .map_err(|_| invalid("task_id is not a base64url task ID".into()))?;
    for (name, url) in [
        ("leader_endpoint", &params.leader_endpoint),
        ("helper_endpoint", &params.helper_endpoint),
    ] {
        duet_core::task::parse_endpoint(url).map_err(|e| invalid(format!("{name}: {e}")))?;
    }
    if params.time_precision == 0 {
        return Err(invalid("time_precision must be at least 1".into()));
    }
    params
        .vdaf
        .instantiate()
        .map_err(|e| invalid(format!("vdaf: {e}")))?;
    Ok(params)
}

/// Reads a task file.
pub fn read_task_file(path: &std::path::Path) -> Result<TaskParameters> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("could not read {}", path.display()))?;
    let params: TaskParameters = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a task file written by `duet task create`",
            path.display()
        )
    })?;
    // Every command checks the task as the aggregators do: a client must not, say, round
    // report times to a precision of 0 or shard for a VDAF that cannot exist.
    Task::from_parameters(&params).with_context(|| {
        format!(
            "{} is not a valid task (write a new one with `duet task create`)",
            path.display()
        )
    })?;
    Ok(params)
}

/// The checks of `duet task create`'s flags that the task's own validation does not make: a
/// task that expires before it is created, a Leader that would be its own Helper, or endpoints
/// that carry credentials (aggregators authenticate with the task's tokens, and a URL's user
/// and password would be sent to whoever it names).
fn check_new_task_flags(leader: &str, helper: &str, expiration: Option<u64>) -> Result<()> {
    if let Some(at) = expiration {
        let now = duet_core::Clock::now(&duet_core::RealClock).0;
        if at <= now {
            bail!("--task-expiration {at} is in the past (now is {now}); give a later time");
        }
    }
    let leader_url = duet_core::task::parse_endpoint(leader)
        .with_context(|| format!("--leader-url {leader} is not a URL"))?;
    let helper_url = duet_core::task::parse_endpoint(helper)
        .with_context(|| format!("--helper-url {helper} is not a URL"))?;
    if leader_url == helper_url {
        bail!("--leader-url and --helper-url are the same; the Helper must be another endpoint");
    }
    for (flag, url) in [("--leader-url", &leader_url), ("--helper-url", &helper_url)] {
        if !url.username().is_empty() || url.password().is_some() {
            bail!("{flag} carries a user name or password; give the URL without them");
        }
    }
    Ok(())
}

/// Builds a new task's parameters with fresh secrets.
#[allow(clippy::too_many_arguments)]
pub fn new_task(
    leader_url: &str,
    helper_url: &str,
    vdaf: duet_core::VdafInstance,
    collector_hpke_config: HpkeConfig,
    min_batch_size: u64,
    time_precision: u64,
    max_batch_query_count: u64,
    task_expiration: Option<u64>,
) -> Result<Task> {
    let params = TaskParameters {
        task_id: TaskId::random().to_string(),
        leader_endpoint: leader_url.to_string(),
        helper_endpoint: helper_url.to_string(),
        query_type: QueryTypeConfig::TimeInterval,
        vdaf,
        vdaf_verify_key: {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
        },
        max_batch_query_count,
        task_expiration,
        report_expiry_age: None,
        min_batch_size,
        time_precision,
        tolerable_clock_skew: 60,
        collector_hpke_config: {
            use base64::Engine;
            use duet_messages::Encode;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(collector_hpke_config.get_encoded())
        },
        aggregator_auth_token: AuthenticationToken::random(),
        collector_auth_token: Some(AuthenticationToken::random()),
    };
    Ok(Task::from_parameters(&params)?)
}

/// Runs a task command.
pub async fn run(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Create {
            leader_url,
            helper_url,
            vdaf,
            collector_key,
            collector_hpke_config,
            min_batch_size,
            time_precision,
            max_batch_query_count,
            task_expiration,
            report_expiry_age,
            out,
            force,
        } => {
            let config = match (collector_key, collector_hpke_config) {
                (Some(path), _) => crate::keys::read_keypair(&path)?.config,
                (None, Some(b64)) => {
                    use base64::Engine;
                    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(b64.trim_end_matches('='))
                        .context("--collector-hpke-config is not base64url")?;
                    HpkeConfig::get_decoded(&bytes).context("--collector-hpke-config is not an HPKE config")?
                }
                (None, None) => bail!(
                    "the collector's HPKE config is needed: pass --collector-key FILE (make one with \
                     `duet keys generate --out collector.json`)"
                ),
            };
            check_new_task_flags(&leader_url, &helper_url, task_expiration)?;
            if let Some(age) = report_expiry_age {
                if age < time_precision {
                    bail!(
                        "--report-expiry-age {age} is shorter than --time-precision \
                         {time_precision}: report times are rounded down to the time precision, \
                         so fresh reports would be refused; give at least {time_precision}"
                    );
                }
            }
            let mut task = new_task(
                &leader_url,
                &helper_url,
                vdaf.instance()?,
                config,
                min_batch_size,
                time_precision,
                max_batch_query_count,
                task_expiration,
            )?;
            task.report_expiry_age = report_expiry_age.map(Duration);
            let json = serde_json::to_string_pretty(&task.to_parameters())? + "\n";
            match out {
                Some(p) => crate::keys::write_secret(&p, &json, force)?,
                None => out!("{json}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ClientFile { task, out, force } => {
            let params = read_task_file(&task)?;
            let json = serde_json::to_string_pretty(&ClientTaskFile::from(&params))? + "\n";
            match out {
                Some(p) => crate::keys::write_public(&p, &json, force)?,
                None => out!("{json}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Import {
            file,
            db,
            role,
            sqlite_page_size,
        } => {
            let params = read_task_file(&file)?;
            let mut task = Task::from_parameters(&params)?;
            task.check_new()?;
            if let QueryTypeConfig::FixedSize { .. } = task.query_type {
                // Its requests would be served as time-interval ones.
                bail!(
                    "the task in {} uses fixed_size batches, which Duet's aggregators do not \
                     serve; create it with time_interval batches",
                    file.display()
                );
            }
            let role: AggregatorRole = role.into();
            if role == AggregatorRole::Helper {
                // The Helper never sees the collector; it doesn't need that secret.
                task.collector_auth_token = None;
            } else if task.collector_auth_token.is_none() {
                bail!("the Leader needs collector_auth_token in the task file");
            }
            if sqlite_page_size.is_some() && crate::db::is_postgres(&db) {
                bail!("--sqlite-page-size applies to a SQLite database, and {db} is PostgreSQL");
            }
            let sqlite = duet_store::sqlite::SqliteSetup {
                page_size: sqlite_page_size,
                ..Default::default()
            };
            let store = crate::db::open_with(&db, role, sqlite).await?;
            store.put_task(&task).await.map_err(|e| match e {
                duet_store::StoreError::AlreadyExists => {
                    anyhow::anyhow!("a different task with ID {} is already in {db}", task.id)
                }
                e => e.into(),
            })?;
            outln!("imported task {} into {db} as {:?}", task.id, role);
            Ok(ExitCode::SUCCESS)
        }
        Command::List { db, role } => {
            // Listing never creates: a mistyped path is an error, not a new empty database.
            if !crate::db::is_postgres(&db)
                && !db.starts_with("sqlite:")
                && !std::path::Path::new(&db).exists()
            {
                bail!(
                    "there is no database at {db} (`duet task import` and `duet serve` create one)"
                );
            }
            let store = crate::db::open(&db, role.into()).await?;
            for t in store.list_tasks().await? {
                outln!(
                    "{}  {}  min_batch_size={}  time_precision={}s",
                    t.id,
                    t.vdaf,
                    t.min_batch_size,
                    t.time_precision.0
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The batch interval covering `[from, to]`, aligned to the task's time precision.
pub fn covering_interval(
    from: Time,
    to: Time,
    precision: Duration,
) -> duet_messages::dap09::Interval {
    let start = from.round_down(precision);
    let end = to.round_down(precision).0 + precision.0;
    duet_messages::dap09::Interval {
        start,
        duration: Duration(end - start.0),
    }
}
