//! `duet serve`: run a Leader, a Helper or both from a TOML config.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! database = "duet.sqlite"
//! sqlite_sync = "commit" # or "checkpoint": faster, but a machine crash loses the last commits
//! sqlite_page_size = 8192 # a new database's page size (8192 by default)
//! [leader]              # omit to not serve the Leader
//! path_prefix = "/leader"
//! [helper]              # omit to not serve the Helper
//! path_prefix = "/helper"
//! [aggregator]          # optional tunables
//! max_aggregation_job_size = 2500
//! ```
//! `DUET_LISTEN` and `DUET_DATABASE` override `listen` and `database`, and `--listen` and
//! `--database` override those. On PostgreSQL, `job_creation_delay_ms` defaults to 300 instead
//! of the aggregator's 100 (`POSTGRES_JOB_CREATION_DELAY_MS`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use duet_aggregator::server::{RoleConfig, Roles};
use duet_aggregator::AggregatorConfig;
use duet_core::{AggregatorRole, RealClock};
use serde::Deserialize;

use crate::open_files;

/// `duet serve` flags.
#[derive(clap::Args)]
pub struct Args {
    /// The TOML config file.
    #[arg(long, default_value = "duet.toml")]
    config: PathBuf,
    /// The database (a SQLite path or a `postgres://` URL); overrides the config's `database`.
    #[arg(long)]
    database: Option<String>,
    /// The address to listen on; overrides the config's `listen`.
    #[arg(long)]
    listen: Option<String>,
    /// Also shut down when standard input closes: a parent process that starts this server
    /// with a pipe on its standard input stops it by closing the pipe, or by exiting, however
    /// it exits.
    #[arg(long, hide = true)]
    exit_on_stdin_eof: bool,
}

/// The config file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Address to serve `/metrics` and `/healthz` on instead of `listen` (say a port only the
    /// operator's network reaches); without it they are served on `listen` with the DAP routes.
    #[serde(default)]
    pub admin_listen: Option<String>,
    /// Database: a SQLite path or a `postgres://` URL.
    #[serde(default)]
    pub database: String,
    /// SQLite only: when the write-ahead log is synced, `commit` (the default: every commit,
    /// and so every acknowledged upload, survives the machine crashing or losing power) or
    /// `checkpoint` (a commit survives the process crashing only; 2–12 % faster end to end).
    #[serde(default)]
    pub sqlite_sync: Option<SqliteSync>,
    /// SQLite only: the page size, in bytes, of a database `duet serve` creates (a power of two
    /// from 512 to 65536; 8192 by default, twice SQLite's own default). A database keeps the
    /// size it was created with (`duet task import --sqlite-page-size` sets it when an import
    /// creates the file). A 4 KiB page holds one Prio3Histogram(100) report of about 2.4 kB and
    /// wastes the rest, an 8 KiB page three.
    #[serde(default)]
    pub sqlite_page_size: Option<u32>,
    /// Serve the Leader.
    pub leader: Option<RoleSection>,
    /// Serve the Helper.
    pub helper: Option<RoleSection>,
    /// Tunables.
    #[serde(default)]
    pub aggregator: AggregatorConfig,
}

/// One role's section.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RoleSection {
    /// Path under which the role's DAP endpoints are served.
    #[serde(default)]
    pub path_prefix: String,
}

/// `sqlite_sync`'s values.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSync {
    /// The log synced at every commit.
    Commit,
    /// The log synced around checkpoints only.
    Checkpoint,
}

impl From<SqliteSync> for duet_store::sqlite::LogSync {
    fn from(s: SqliteSync) -> Self {
        match s {
            SqliteSync::Commit => duet_store::sqlite::LogSync::Commit,
            SqliteSync::Checkpoint => duet_store::sqlite::LogSync::Checkpoint,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}

/// The job creator's wait after a wake-up on PostgreSQL, when the config does not set
/// `job_creation_delay_ms`. There each job costs more (a few commits), so letting more reports
/// arrive before a pass, which then cuts fewer partial jobs, pays: in BENCHMARKS.md's eighth set,
/// Prio3Count +9–11 % for 0.2–0.3 s more latency. On SQLite the default stays (it lost 3.7 %).
const POSTGRES_JOB_CREATION_DELAY_MS: u64 = 300;

/// Whether the config text sets `[aggregator] job_creation_delay_ms` itself.
fn sets_job_creation_delay(text: &str) -> bool {
    toml::from_str::<toml::Table>(text).is_ok_and(|t| {
        t.get("aggregator")
            .and_then(|a| a.get("job_creation_delay_ms"))
            .is_some()
    })
}

/// Reads and checks a config file, applying environment and command-line overrides.
pub fn load(
    path: &std::path::Path,
    database: Option<&str>,
    listen: Option<&str>,
) -> Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "could not read the config file {} (pass --config FILE)",
            path.display()
        )
    })?;
    let mut config: Config = toml::from_str(&text)
        .with_context(|| format!("{} is not a valid config", path.display()))?;
    if let Ok(v) = std::env::var("DUET_LISTEN") {
        config.listen = v;
    }
    if let Ok(v) = std::env::var("DUET_DATABASE") {
        config.database = v;
    }
    if let Some(v) = database {
        config.database = v.to_string();
    }
    if let Some(v) = listen {
        config.listen = v.to_string();
    }
    if config.database.is_empty() {
        bail!(
            "no database: set `database` in {} or pass --database",
            path.display()
        );
    }
    if crate::db::is_postgres(&config.database) && config.sqlite_sync.is_some() {
        bail!(
            "`sqlite_sync` in {} applies to a SQLite database, and `database` is PostgreSQL \
             (whose durability its own `synchronous_commit` decides): remove it",
            path.display()
        );
    }
    if crate::db::is_postgres(&config.database) && config.sqlite_page_size.is_some() {
        bail!(
            "`sqlite_page_size` in {} applies to a SQLite database, and `database` is PostgreSQL: \
             remove it",
            path.display()
        );
    }
    if let Some(size) = config.sqlite_page_size {
        duet_store::sqlite::check_page_size(size)
            .map_err(|e| anyhow::anyhow!("`sqlite_page_size` in {}: {e}", path.display()))?;
    }
    if crate::db::is_postgres(&config.database) && !sets_job_creation_delay(&text) {
        config.aggregator.job_creation_delay_ms = POSTGRES_JOB_CREATION_DELAY_MS;
    }
    if config.leader.is_none() && config.helper.is_none() {
        bail!(
            "{} serves no role: add a [leader] or [helper] section",
            path.display()
        );
    }
    config
        .aggregator
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: [aggregator] {e}", path.display()))?;
    for (section, role) in [("leader", &config.leader), ("helper", &config.helper)] {
        if let Some(role) = role {
            check_path_prefix(&role.path_prefix)
                .map_err(|e| anyhow::anyhow!("{}: [{section}] path_prefix {e}", path.display()))?;
        }
    }
    if let (Some(l), Some(h)) = (&config.leader, &config.helper) {
        if l.path_prefix.trim_end_matches('/') == h.path_prefix.trim_end_matches('/') {
            bail!("[leader] and [helper] need different path_prefix values, e.g. \"/leader\" and \"/helper\"");
        }
    }
    Ok(config)
}

/// A path prefix is empty or an absolute path of plain segments, as a router can mount it.
fn check_path_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Ok(());
    }
    if !prefix.starts_with('/') {
        return Err(format!(
            "\"{prefix}\" must start with / (say \"/{prefix}\")"
        ));
    }
    let plain =
        |segment: &str| !segment.starts_with([':', '*']) && !segment.contains(['{', '}', '?', '#']);
    if !prefix.split('/').all(plain) {
        return Err(format!(
            "\"{prefix}\" may not have segments starting with : or *, nor {{ }} ? #"
        ));
    }
    Ok(())
}

/// Listens on `addr`, the config's `setting`, or says why not.
async fn bind(addr: &str, setting: &str) -> Result<tokio::net::TcpListener> {
    duet_aggregator::server::listen(addr).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => "another process has the port".to_string(),
            std::io::ErrorKind::PermissionDenied => "ports below 1024 need privileges".to_string(),
            _ => format!("`{setting}` takes HOST:PORT, say 127.0.0.1:8080"),
        };
        anyhow::anyhow!("could not listen on {addr}: {e} ({hint})")
    })
}

/// Raises the process's limit on open files to what `max_connections` connections and the
/// server's other files need, or warns that the hard limit is lower.
fn raise_open_files(max_connections: usize) {
    let connections = u64::try_from(max_connections).unwrap_or(u64::MAX);
    let wanted = connections.saturating_add(open_files::BESIDES_CONNECTIONS);
    match open_files::raise(wanted) {
        Ok(open_files::Outcome::Short { limit, wanted }) => tracing::warn!(
            "the limit on open files is {limit}, below the {wanted} that max_connections \
             ({max_connections}) and the server's other files may need, and connections past it \
             are refused: raise the hard limit (`ulimit -Hn`, or LimitNOFILE= in a systemd \
             unit) or lower max_connections"
        ),
        Ok(open_files::Outcome::Raised { from, to }) => {
            tracing::debug!("raised the limit on open files from {from} to {to}")
        }
        Ok(open_files::Outcome::Enough { .. }) => {}
        Err(e) => tracing::warn!("could not raise the limit on open files: {e}"),
    }
}

/// Runs `duet serve` until interrupted.
pub async fn run(args: Args) -> Result<ExitCode> {
    let config = load(
        &args.config,
        args.database.as_deref(),
        args.listen.as_deref(),
    )?;
    for warning in config.aggregator.warnings() {
        tracing::warn!("{}: [aggregator] {warning}", args.config.display());
    }
    raise_open_files(config.aggregator.max_connections);
    // The port first: a second server started by mistake stops here, before it opens (and
    // perhaps migrates) the database the first one is using.
    let listener = bind(&config.listen, "listen").await?;
    let admin = match &config.admin_listen {
        Some(addr) => Some(bind(addr, "admin_listen").await?),
        None => None,
    };
    let sqlite = duet_store::sqlite::SqliteSetup {
        log_sync: config.sqlite_sync.map(Into::into).unwrap_or_default(),
        page_size: config.sqlite_page_size,
    };
    let mut roles = Roles::default();
    if let Some(l) = &config.leader {
        let store = crate::db::open_with(&config.database, AggregatorRole::Leader, sqlite).await?;
        roles.leader = Some(RoleConfig {
            store,
            path_prefix: l.path_prefix.clone(),
        });
    }
    if let Some(h) = &config.helper {
        let store = crate::db::open_with(&config.database, AggregatorRole::Helper, sqlite).await?;
        roles.helper = Some(RoleConfig {
            store,
            path_prefix: h.path_prefix.clone(),
        });
    }
    let server = duet_aggregator::server::run_with_admin(
        listener,
        admin,
        roles,
        config.aggregator.clone(),
        Arc::new(RealClock),
        axum::Router::new(),
    )
    .await?;
    eprintln!("duet serving on http://{}", server.local_addr);
    if let Some(addr) = server.admin_addr {
        eprintln!("duet serving /metrics and /healthz on http://{addr}");
    }
    if args.exit_on_stdin_eof {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = stdin_closed() => {}
        }
    } else {
        shutdown_signal().await;
    }
    eprintln!("shutting down");
    server.shutdown().await?;
    Ok(ExitCode::SUCCESS)
}

/// Completes when standard input reaches end of file (or fails).
async fn stdin_closed() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = tx.send(());
    });
    let _ = rx.await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `load` makes of a config file holding `text`.
    fn load_from(text: &str) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("duet.toml");
        std::fs::write(&path, text).expect("write");
        load(&path, None, None)
    }

    fn load_text(text: &str) -> Config {
        load_from(text).expect("load")
    }

    /// Settings that would break the server, and path prefixes a router cannot mount, are
    /// refused with one line naming the file, the section and the setting.
    #[test]
    fn broken_settings_are_refused_when_loaded() {
        for (text, expected) in [
            (
                "database = \"d.sqlite\"\n[leader]\n[aggregator]\nlease_duration_s = 0\n",
                "[aggregator] lease_duration_s must be at least 1",
            ),
            (
                "database = \"d.sqlite\"\n[leader]\npath_prefix = \"leader\"\n",
                "[leader] path_prefix \"leader\" must start with /",
            ),
            (
                "database = \"d.sqlite\"\n[helper]\npath_prefix = \"/:x\"\n",
                "[helper] path_prefix \"/:x\" may not have segments",
            ),
        ] {
            let Err(e) = load_from(text) else {
                panic!("accepted: {text}");
            };
            let e = e.to_string();
            assert!(e.contains(expected), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    /// `sqlite_sync` takes `commit` (the default) or `checkpoint`, and only with a SQLite
    /// database; anything else is refused naming the setting.
    #[test]
    fn sqlite_sync_is_read_for_sqlite_only() {
        assert_eq!(
            load_text("database = \"d.sqlite\"\n[leader]\n").sqlite_sync,
            None
        );
        let relaxed =
            load_text("database = \"d.sqlite\"\nsqlite_sync = \"checkpoint\"\n[leader]\n");
        assert_eq!(relaxed.sqlite_sync, Some(SqliteSync::Checkpoint));
        assert_eq!(
            duet_store::sqlite::LogSync::from(SqliteSync::Checkpoint),
            duet_store::sqlite::LogSync::Checkpoint
        );
        for (text, expected) in [
            (
                "database = \"d.sqlite\"\nsqlite_sync = \"never\"\n[leader]\n",
                "sqlite_sync",
            ),
            (
                "database = \"postgres://duet@db/duet\"\nsqlite_sync = \"commit\"\n[leader]\n",
                "`sqlite_sync` in",
            ),
        ] {
            let Err(e) = load_from(text) else {
                panic!("accepted: {text}");
            };
            assert!(format!("{e:#}").contains(expected), "{e:#}");
        }
    }

    /// `sqlite_page_size` takes a power of two from 512 to 65536, and only with a SQLite
    /// database; anything else is refused naming the setting and the rule.
    #[test]
    fn sqlite_page_size_is_checked_and_for_sqlite_only() {
        assert_eq!(
            load_text("database = \"d.sqlite\"\n[leader]\n").sqlite_page_size,
            None
        );
        assert_eq!(
            load_text("database = \"d.sqlite\"\nsqlite_page_size = 8192\n[leader]\n")
                .sqlite_page_size,
            Some(8192)
        );
        for (text, expected) in [
            (
                "database = \"d.sqlite\"\nsqlite_page_size = 8000\n[leader]\n",
                "`sqlite_page_size` in",
            ),
            (
                "database = \"d.sqlite\"\nsqlite_page_size = 131072\n[leader]\n",
                "a power of two from 512 to 65536 bytes, not 131072",
            ),
            (
                "database = \"d.sqlite\"\nsqlite_page_size = -1\n[leader]\n",
                "sqlite_page_size",
            ),
            (
                "database = \"postgres://duet@db/duet\"\nsqlite_page_size = 8192\n[leader]\n",
                "`sqlite_page_size` in",
            ),
        ] {
            let Err(e) = load_from(text) else {
                panic!("accepted: {text}");
            };
            assert!(format!("{e:#}").contains(expected), "{e:#}");
        }
    }

    /// PostgreSQL gets its own job-creation wait unless the config sets one; SQLite keeps the
    /// aggregator's default.
    #[test]
    fn job_creation_delay_defaults_by_backend() {
        let default = AggregatorConfig::default().job_creation_delay_ms;
        let sqlite = load_text("database = \"duet.sqlite\"\n[leader]\n");
        assert_eq!(sqlite.aggregator.job_creation_delay_ms, default);
        for url in ["postgres://duet@db/duet", "postgresql://duet@db/duet"] {
            let pg = load_text(&format!("database = \"{url}\"\n[leader]\n"));
            assert_eq!(
                pg.aggregator.job_creation_delay_ms,
                POSTGRES_JOB_CREATION_DELAY_MS
            );
        }
        let set = load_text(
            "database = \"postgres://duet@db/duet\"\n[leader]\n\
             [aggregator]\njob_creation_delay_ms = 50\n",
        );
        assert_eq!(set.aggregator.job_creation_delay_ms, 50);
        let other = load_text(
            "database = \"postgres://duet@db/duet\"\n[leader]\n\
             [aggregator]\npolling_interval_ms = 50\n",
        );
        assert_eq!(
            other.aggregator.job_creation_delay_ms,
            POSTGRES_JOB_CREATION_DELAY_MS
        );
    }
}
