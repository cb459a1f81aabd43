//! The embedded SQLite backend: one database file, WAL journal, every write one `BEGIN IMMEDIATE`
//! transaction.
//!
//! SQLite has a single writer at a time, so write transactions take the write lock up front
//! (`BEGIN IMMEDIATE`) and wait for it (busy timeout) instead of failing a lock upgrade half-way.
//! Readers never block thanks to WAL. The schema is in `migrations/sqlite/`; the module split
//! follows it: [`tasks`] (tasks, keys, batch aggregations), [`leader`] (reports and aggregation
//! jobs), [`collection`] (collection jobs), [`helper`] (Helper jobs and aggregate shares), and
//! [`replay`] (both roles' sets of report IDs taken in).

mod checkpoint;
mod collection;
mod durable;
mod helper;
mod leader;
mod replay;
mod tasks;
mod writer;

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use duet_core::hpke::HpkeKeypair;
use duet_core::{AggregatorRole, Task};
use duet_messages::dap09::{AggregationJobId, CollectionJobId, Interval, ReportId, TaskId, Time};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::rows::{col, col_array, col_interval, col_u64};
use crate::{
    AcquiredAggregationJob, AcquiredCollectionJob, AggregateShareJob, BatchAggregation, BatchSum,
    CollectionJob, CollectionJobBatch, CollectionJobState, Datastore, HelperAggregationJob,
    MergeFn, NewReport, StoreError,
};
use writer::Writer;
pub(crate) use writer::{CommitSync, Durability, WriteTx};

/// How long a statement waits for the write lock before failing.
const BUSY_TIMEOUT: StdDuration = StdDuration::from_secs(10);
/// Connections in the read pool (readers run in parallel). Writes have a connection of their own.
const MAX_CONNECTIONS: u32 = 8;
/// Prepared statements the writer connection keeps (sqlx's default is 100).
const WRITER_STATEMENT_CACHE: usize = 256;
/// Bytes of the database file read through a memory map instead of `pread` copies (about 5% more
/// reports/s). Mapped pages are the kernel's page cache, but they count in the process's RSS, so
/// the map is bounded.
const MMAP_SIZE: &str = "268435456";
/// Rows a connection's thread may hand over before the reading task takes them (sqlx's default
/// is 50). Every statement here reads its whole result, so this only bounds how often the two
/// threads wait for each other: at 50, a job's 1,000 reports take at least 20 hand-offs, each a
/// wait for the other thread to be scheduled on a busy machine.
const ROW_BUFFER: usize = 4096;
/// Bound parameters per statement in bulk statements; well under SQLite's limit (32766 since
/// 3.32, 999 before).
const MAX_BIND_PARAMS: usize = 900;
/// How often `connect` re-runs migrations that lost a race with another process migrating the
/// same file.
const MIGRATION_ATTEMPTS: usize = 5;
/// How often `connect` tries to open a connection that found the file busy, and the pause
/// before the first retry (it doubles each time).
const OPEN_ATTEMPTS: u32 = 6;
const OPEN_BACKOFF: StdDuration = StdDuration::from_millis(10);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// A [`Datastore`] over one SQLite database file, bound to one aggregator role.
#[derive(Clone, Debug)]
pub struct SqliteDatastore {
    /// Reads outside write transactions.
    pool: SqlitePool,
    /// Where writes go: one connection that writes, since SQLite has one writer at a time
    /// anyway, and a connection that no other connection of this process writes behind keeps
    /// its page cache across transactions (a write by another connection empties every other
    /// connection's cache).
    writer: Writer,
    role: AggregatorRole,
    /// The report IDs each role has taken in (see [`replay`]).
    replay: Arc<replay::ReplaySets>,
    /// A file database's checkpoints of its write-ahead log (see [`checkpoint`]).
    checkpointer: Option<Arc<checkpoint::Checkpointer>>,
}

/// When a file database's write-ahead log is synced, which decides what a commit survives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogSync {
    /// At every commit, before the commit returns (or, for a large upload batch, before its
    /// uploads are answered): a commit survives the machine crashing or losing power.
    #[default]
    Commit,
    /// Only around checkpoints (every 2 s or so under load): a commit survives the process
    /// crashing, but the last seconds of commits, acknowledged uploads among them, are lost if
    /// the machine crashes or loses power. 2–12 % faster end to end on a virtual disk.
    Checkpoint,
}

/// How a SQLite store is opened, besides its path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SqliteSetup {
    /// When the log is synced.
    pub log_sync: LogSync,
    /// The page size, in bytes, of a database this opening creates: a power of two from 512 to
    /// 65,536, [`DEFAULT_PAGE_SIZE`] if `None`. A database keeps the size it was created with
    /// (opened with another size given here, it says so in a warning).
    pub page_size: Option<u32>,
}

/// The page size of a new database unless its opening says otherwise: 8 KiB, twice SQLite's
/// default. A 4 KiB page holds one Prio3Histogram(100) report of about 2.4 kB and wastes the
/// rest, an 8 KiB page three; Prio3Count's small reports lost nothing with larger pages.
pub const DEFAULT_PAGE_SIZE: u32 = 8192;

/// Whether SQLite takes `size` as a page size; the reason if not.
pub fn check_page_size(size: u32) -> Result<(), String> {
    if (512..=65_536).contains(&size) && size.is_power_of_two() {
        Ok(())
    } else {
        Err(format!(
            "a SQLite page size is a power of two from 512 to 65536 bytes, not {size}"
        ))
    }
}

impl SqliteDatastore {
    /// Opens (creating if missing) and migrates the database at a file path or a `sqlite:` URL
    /// (`sqlite::memory:` for a private in-memory database); the handle is bound to the Leader
    /// role. Commits are durable ([`LogSync::Commit`]).
    pub async fn connect(path_or_url: &str) -> Result<SqliteDatastore, StoreError> {
        Self::connect_with(path_or_url, LogSync::Commit).await
    }

    /// [`SqliteDatastore::connect`], with the log synced as `log_sync` says.
    pub async fn connect_with(
        path_or_url: &str,
        log_sync: LogSync,
    ) -> Result<SqliteDatastore, StoreError> {
        let setup = SqliteSetup {
            log_sync,
            ..SqliteSetup::default()
        };
        Self::connect_setup(path_or_url, setup).await
    }

    /// [`SqliteDatastore::connect`], set up as `setup` says.
    pub async fn connect_setup(
        path_or_url: &str,
        setup: SqliteSetup,
    ) -> Result<SqliteDatastore, StoreError> {
        let SqliteSetup {
            log_sync,
            page_size,
        } = setup;
        if let Some(size) = page_size {
            check_page_size(size).map_err(StoreError::Database)?;
        }
        let options = if path_or_url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(path_or_url).map_err(db)?
        } else {
            SqliteConnectOptions::new().filename(path_or_url)
        };
        // SQLite takes a page size only when it creates the database (a database in WAL mode
        // keeps its own): it must come before the first write, which sqlx's ordering of the
        // pragmas ensures.
        let options = options.page_size(page_size.unwrap_or(DEFAULT_PAGE_SIZE));
        let in_memory = path_or_url.contains(":memory:") || path_or_url.contains("mode=memory");
        if !in_memory {
            create_private(options.get_filename())?;
        }
        let options = options
            .create_if_missing(true)
            .journal_mode(if in_memory {
                SqliteJournalMode::Memory
            } else {
                SqliteJournalMode::Wal
            })
            // In WAL mode `FULL` syncs the log in every commit, `NORMAL` only around
            // checkpoints (write transactions and large upload batches commit under `NORMAL`
            // and wait for a shared sync: see [`durable`]).
            .synchronous(match log_sync {
                LogSync::Commit => SqliteSynchronous::Full,
                LogSync::Checkpoint => SqliteSynchronous::Normal,
            })
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            // The log is checkpointed by a task of its own (see [`checkpoint`]); the writer only
            // if that task falls far behind.
            .pragma("wal_autocheckpoint", checkpoint::WRITER_FALLBACK_PAGES)
            // Once the log starts over, its file is cut back to 128 MiB: a burst of large
            // reports does not leave a large log file behind for good, and the log the
            // checkpoint task starts over at about 64 MiB is overwritten, not cut and extended
            // again.
            .pragma("journal_size_limit", "134217728")
            // A small page cache (8 MiB per connection): reads of the database file go through
            // the memory map, a write by one connection empties every other connection's cache
            // anyway, and each commit walks the writer's whole cache (a 64 MiB cache cost about
            // 10% of the Leader's reports/s).
            .pragma("cache_size", "-8192")
            .pragma("temp_store", "memory")
            .pragma("mmap_size", MMAP_SIZE)
            .row_buffer_size(ROW_BUFFER);
        // An in-memory database is shared between connections through SQLite's shared cache,
        // whose table locks don't wait on the busy timeout: one connection avoids them.
        // No ping before each use of a pooled connection: a ping is a round trip to the
        // connection's worker thread, and a local file's connection does not go stale.
        let pool = open_pool(
            SqlitePoolOptions::new()
                .test_before_acquire(false)
                .max_connections(if in_memory { 1 } else { MAX_CONNECTIONS }),
            options.clone(),
        )
        .await?;
        run_migrations(&pool).await?;
        if let Some(wanted) = page_size {
            let size: i64 = sqlx::query_scalar("PRAGMA page_size")
                .fetch_one(&pool)
                .await
                .map_err(db)?;
            if size != i64::from(wanted) && !in_memory {
                tracing::warn!(
                    database = %options.get_filename().display(),
                    pages = size,
                    wanted,
                    "the database was created with pages of another size, which it keeps: a \
                     page size applies when a database is created"
                );
            }
        }
        let (writer, checkpointer) = if in_memory {
            (Writer::Pooled(pool.clone(), Arc::default()), None)
        } else {
            // Room for an upload statement per batch size besides the job statements.
            let writer = Writer::open(
                &options
                    .clone()
                    .statement_cache_capacity(WRITER_STATEMENT_CACHE),
                log_sync,
            )
            .await?;
            let checkpointer = checkpoint::Checkpointer::start(&options, writer.clone()).await?;
            (writer, Some(checkpointer))
        };
        // An in-memory database has one connection, which a filter's build would hold.
        let replay = Arc::new(replay::ReplaySets::new((!in_memory).then_some(&pool)));
        Ok(SqliteDatastore {
            pool,
            writer,
            role: AggregatorRole::Leader,
            replay,
            checkpointer,
        })
    }

    /// A handle on the same database bound to `role`.
    pub fn with_role(&self, role: AggregatorRole) -> SqliteDatastore {
        SqliteDatastore {
            pool: self.pool.clone(),
            writer: self.writer.clone(),
            role,
            replay: Arc::clone(&self.replay),
            checkpointer: self.checkpointer.clone(),
        }
    }

    /// The role this handle is bound to.
    pub fn role(&self) -> AggregatorRole {
        self.role
    }

    /// Closes the pool (all handles on it), waiting for connections to finish.
    pub async fn close(&self) {
        self.replay.stop();
        if let Some(checkpointer) = &self.checkpointer {
            checkpointer.close().await;
        }
        self.writer.close().await;
        self.pool.close().await;
    }

    /// The role as stored in `role` columns.
    fn role_str(&self) -> &'static str {
        match self.role {
            AggregatorRole::Leader => "leader",
            AggregatorRole::Helper => "helper",
        }
    }

    /// Starts a write transaction holding SQLite's write lock from its first statement.
    async fn begin_write(&self) -> Result<WriteTx, StoreError> {
        self.writer.begin().await
    }

    /// The writer connection, for one statement outside a transaction, durable when it
    /// returns.
    #[cfg(test)]
    async fn write_statement(&self) -> Result<writer::WriterGuard, StoreError> {
        self.writer.lock_synced().await
    }
}

/// Opens a pool, retrying while the file is busy (see [`retry_busy`]).
async fn open_pool(
    pool: SqlitePoolOptions,
    options: SqliteConnectOptions,
) -> Result<SqlitePool, StoreError> {
    retry_busy(|| pool.clone().connect_with(options.clone())).await
}

/// Runs `open` again while it finds the file busy: a connection to a new file switches it to WAL
/// mode, and while another process does the same, SQLite can refuse with `SQLITE_BUSY` without
/// waiting out the busy timeout.
async fn retry_busy<T, F, Fut>(mut open: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut backoff = OPEN_BACKOFF;
    for _ in 1..OPEN_ATTEMPTS {
        match open().await {
            Err(e) if is_busy(&e) => {
                tracing::debug!(error = %e, "opening the SQLite database found it busy; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            opened => return opened.map_err(db),
        }
    }
    open().await.map_err(db)
}

/// Whether an error is `SQLITE_BUSY` (or one of its extended codes).
fn is_busy(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(e)
        if e.code().and_then(|code| code.parse::<i32>().ok()).is_some_and(|code| code & 0xff == 5))
}

/// Creates a missing database file readable by its owner only: it holds the aggregators' HPKE
/// private keys and the tasks' secrets. SQLite gives its log and shared-memory files the
/// database file's permissions. An existing file is left as it is.
fn create_private(path: &std::path::Path) -> Result<(), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Database(format!(
            "could not create the database file {}: {e}",
            path.display()
        ))),
    }
}

/// Runs the embedded migrations, retrying when another connection migrated the same file at the
/// same time (the loser's `CREATE TABLE` fails once the winner commits; a re-run then sees the
/// migration applied).
async fn run_migrations(pool: &SqlitePool) -> Result<(), StoreError> {
    let mut last_error = None;
    for _ in 0..MIGRATION_ATTEMPTS {
        match MIGRATOR.run(pool).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "migrating the SQLite database failed; retrying");
                last_error = Some(e);
            }
        }
    }
    Err(StoreError::Database(format!(
        "migrations failed: {}",
        last_error.map(|e| e.to_string()).unwrap_or_default()
    )))
}

// ---- Conversions shared by the submodules ----

/// A statement with its arguments bound.
type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Maps a database error.
fn db(e: sqlx::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

/// A `u64` as SQLite's signed INTEGER; values past `i64::MAX` are refused rather than wrapped.
fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v)
        .map_err(|_| StoreError::Database(format!("{what} {v} does not fit in an SQLite INTEGER")))
}

/// A `u64` bound for range queries: values past `i64::MAX` clamp (no stored value exceeds it).
fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `(?, ?, …), (?, ?, …), …`: placeholders for a multi-row INSERT.
fn values_placeholders(rows: usize, columns: usize) -> String {
    let row = format!("({})", list_placeholders(columns));
    vec![row; rows].join(", ")
}

/// `?, ?, …`: `n` parameters, for an `IN (…)` list or one row of `VALUES`.
fn list_placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// A fresh lease token.
fn lease_token() -> [u8; 16] {
    rand::random()
}

#[async_trait]
impl Datastore for SqliteDatastore {
    async fn put_task(&self, task: &Task) -> Result<(), StoreError> {
        tasks::put_task(self, task).await
    }

    async fn get_task(&self, task_id: &TaskId) -> Result<Option<Task>, StoreError> {
        tasks::get_task(self, task_id).await
    }

    async fn list_tasks(&self) -> Result<Vec<Task>, StoreError> {
        tasks::list_tasks(self).await
    }

    async fn delete_task(&self, task_id: &TaskId) -> Result<bool, StoreError> {
        tasks::delete_task(self, task_id).await
    }

    async fn put_hpke_keypair(&self, keypair: &HpkeKeypair) -> Result<(), StoreError> {
        tasks::put_hpke_keypair(self, keypair).await
    }

    async fn get_hpke_keypairs(&self) -> Result<Vec<HpkeKeypair>, StoreError> {
        tasks::get_hpke_keypairs(self).await
    }

    async fn get_batch_aggregations(
        &self,
        task_id: &TaskId,
        interval: &Interval,
        aggregation_parameter: &[u8],
    ) -> Result<Vec<BatchAggregation>, StoreError> {
        tasks::get_batch_aggregations(self, task_id, interval, aggregation_parameter).await
    }

    async fn sum_batch_aggregations(
        &self,
        task_id: &TaskId,
        interval: &Interval,
        aggregation_parameter: &[u8],
        merge: MergeFn<'_>,
    ) -> Result<BatchSum, StoreError> {
        tasks::sum_batch_aggregations(self, task_id, interval, aggregation_parameter, merge).await
    }

    async fn collected_intervals(
        &self,
        task_id: &TaskId,
        within: &Interval,
    ) -> Result<Vec<Interval>, StoreError> {
        match self.role {
            AggregatorRole::Leader => collection::collected_intervals(self, task_id, within).await,
            AggregatorRole::Helper => helper::collected_intervals(self, task_id, within).await,
        }
    }

    async fn put_reports(&self, reports: &[NewReport]) -> Result<Vec<bool>, StoreError> {
        let (fresh, durability) = leader::put_reports(self, reports).await?;
        durability.wait().await?;
        Ok(fresh)
    }

    async fn put_reports_pipelined(
        &self,
        reports: &[NewReport],
    ) -> Result<(Vec<bool>, crate::Durable), StoreError> {
        let (fresh, durability) = leader::put_reports(self, reports).await?;
        Ok((fresh, durability.into_durable()))
    }

    async fn create_sized_aggregation_jobs(
        &self,
        sizes: &crate::JobSizes,
        now: Time,
    ) -> Result<crate::CreatedJobs, StoreError> {
        leader::create_aggregation_jobs(self, sizes, now).await
    }

    async fn acquire_aggregation_jobs(
        &self,
        now: Time,
        lease_duration: u64,
        limit: usize,
    ) -> Result<Vec<AcquiredAggregationJob>, StoreError> {
        leader::acquire_aggregation_jobs(self, now, lease_duration, limit).await
    }

    async fn finish_aggregation_job(
        &self,
        job: &AcquiredAggregationJob,
        deltas: &[BatchAggregation],
        merge: MergeFn<'_>,
    ) -> Result<(), StoreError> {
        leader::finish_aggregation_job(self, job, deltas, merge).await
    }

    async fn release_aggregation_job(
        &self,
        job: &AcquiredAggregationJob,
        retry_at: Time,
    ) -> Result<(), StoreError> {
        leader::release_aggregation_job(self, job, retry_at).await
    }

    async fn abandon_aggregation_job(
        &self,
        job: &AcquiredAggregationJob,
    ) -> Result<(), StoreError> {
        leader::abandon_aggregation_job(self, job).await
    }

    async fn count_unaggregated_reports(
        &self,
        task_id: &TaskId,
        interval: &Interval,
    ) -> Result<u64, StoreError> {
        leader::count_unaggregated_reports(self, task_id, interval).await
    }

    async fn has_unaggregated_reports(
        &self,
        task_id: &TaskId,
        interval: &Interval,
    ) -> Result<bool, StoreError> {
        leader::has_unaggregated_reports(self, task_id, interval).await
    }

    async fn put_collection_job(&self, job: &CollectionJob) -> Result<(), StoreError> {
        collection::put_collection_job(self, job).await
    }

    async fn get_collection_job(
        &self,
        task_id: &TaskId,
        id: &CollectionJobId,
    ) -> Result<Option<CollectionJob>, StoreError> {
        collection::get_collection_job(self, task_id, id).await
    }

    async fn collection_job_batches(
        &self,
        task_id: &TaskId,
        overlapping: &Interval,
    ) -> Result<Vec<CollectionJobBatch>, StoreError> {
        collection::collection_job_batches(self, task_id, overlapping).await
    }

    async fn delete_collection_job(
        &self,
        task_id: &TaskId,
        id: &CollectionJobId,
    ) -> Result<bool, StoreError> {
        collection::delete_collection_job(self, task_id, id).await
    }

    async fn acquire_collection_jobs(
        &self,
        now: Time,
        lease_duration: u64,
        limit: usize,
    ) -> Result<Vec<AcquiredCollectionJob>, StoreError> {
        collection::acquire_collection_jobs(self, now, lease_duration, limit).await
    }

    async fn release_collection_job(
        &self,
        job: &AcquiredCollectionJob,
        retry_at: Time,
        attempt: bool,
    ) -> Result<(), StoreError> {
        collection::release_collection_job(self, job, retry_at, attempt).await
    }

    async fn finish_collection_job(
        &self,
        job: &AcquiredCollectionJob,
        state: &CollectionJobState,
    ) -> Result<(), StoreError> {
        collection::finish_collection_job(self, job, state).await
    }

    async fn get_helper_aggregation_job(
        &self,
        task_id: &TaskId,
        id: &AggregationJobId,
    ) -> Result<Option<HelperAggregationJob>, StoreError> {
        helper::get_helper_aggregation_job(self, task_id, id).await
    }

    async fn seen_report_ids(
        &self,
        task_id: &TaskId,
        ids: &[ReportId],
    ) -> Result<HashSet<ReportId>, StoreError> {
        helper::seen_report_ids(self, task_id, ids).await
    }

    async fn put_helper_aggregation_job(
        &self,
        job: &HelperAggregationJob,
        report_ids: &[ReportId],
        deltas: &[BatchAggregation],
        merge: MergeFn<'_>,
    ) -> Result<(), StoreError> {
        helper::put_helper_aggregation_job(self, job, report_ids, deltas, merge).await
    }

    async fn delete_old_helper_aggregation_jobs(
        &self,
        older_than_s: u64,
        limit: usize,
    ) -> Result<u64, StoreError> {
        helper::delete_old_helper_aggregation_jobs(self, older_than_s, limit).await
    }

    async fn get_aggregate_share_job(
        &self,
        task_id: &TaskId,
        batch_interval: &Interval,
        aggregation_parameter: &[u8],
    ) -> Result<Option<AggregateShareJob>, StoreError> {
        helper::get_aggregate_share_job(self, task_id, batch_interval, aggregation_parameter).await
    }

    async fn list_aggregate_share_jobs(
        &self,
        task_id: &TaskId,
        overlapping: &Interval,
    ) -> Result<Vec<AggregateShareJob>, StoreError> {
        helper::list_aggregate_share_jobs(self, task_id, overlapping).await
    }

    async fn put_aggregate_share_job(&self, job: &AggregateShareJob) -> Result<(), StoreError> {
        helper::put_aggregate_share_job(self, job).await
    }

    async fn close(&self) {
        SqliteDatastore::close(self).await;
    }

    async fn warm_up(&self) -> Result<(), StoreError> {
        self.replay.of(self.role).warm_up().await
    }

    async fn health_check(&self) -> Result<(), StoreError> {
        sqlx::query("-- health_check\nSELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn settings(&self) -> Result<Vec<(String, String)>, StoreError> {
        // Every connection, the writer's too, is opened with the same options (the writer
        // commits its transactions and large upload batches under `NORMAL`, each then waiting
        // for a sync of the log: see [`durable`]).
        let mut conn = self.pool.acquire().await.map_err(db)?;
        let version: String = sqlx::query_scalar("SELECT sqlite_version()")
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
        let log_sync = match self.writer.log_sync() {
            Some(LogSync::Commit) => "commit",
            Some(LogSync::Checkpoint) => "checkpoint",
            None => "none (in memory)",
        };
        let mut settings = vec![
            ("engine".to_string(), "sqlite".to_string()),
            ("sqlite_version".to_string(), version),
            ("log_sync".to_string(), log_sync.to_string()),
        ];
        for pragma in [
            "journal_mode",
            "synchronous",
            "page_size",
            "cache_size",
            "mmap_size",
            "wal_autocheckpoint",
            "journal_size_limit",
        ] {
            // An in-memory database has no memory map: that pragma returns no row.
            let Some(value): Option<sqlx::sqlite::SqliteRow> =
                sqlx::query(&format!("PRAGMA {pragma}"))
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(db)?
            else {
                continue;
            };
            let value = match value.try_get::<i64, _>(0) {
                Ok(n) if pragma == "synchronous" => match n {
                    0 => "OFF".to_string(),
                    1 => "NORMAL".to_string(),
                    2 => "FULL".to_string(),
                    3 => "EXTRA".to_string(),
                    n => n.to_string(),
                },
                Ok(n) => n.to_string(),
                Err(_) => value.try_get::<String, _>(0).map_err(db)?,
            };
            settings.push((pragma.to_string(), value));
        }
        Ok(settings)
    }
}

/// A new store on the file `name` in a temporary directory, which is removed when the returned
/// directory handle is dropped.
#[cfg(test)]
async fn temp_store(name: &str) -> (tempfile::TempDir, SqliteDatastore) {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir.path().join(name);
    // 4 KiB pages: the checkpoint tests count the log in pages of one 4,000-byte row each.
    let setup = SqliteSetup {
        log_sync: LogSync::Commit,
        page_size: Some(4096),
    };
    let store = SqliteDatastore::connect_setup(&path.display().to_string(), setup)
        .await
        .expect("connect");
    (dir, store)
}

#[cfg(test)]
mod tests;
